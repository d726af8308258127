"""The recipe: what the official Quamba code does (the default), and every named departure from it.

Users study Quamba, so by default every stage does what enyac-group/Quamba does (facts with
file:line in ../shared/QUAMBA.md), quirks included. Each place where this project offers
something else is an option with a name, a Quamba value and the values allowed; nothing departs
silently. A `Recipe` is validated once, where it enters (the config schema and `from_mapping`,
or the CLI), travels as one frozen record through calibrate, gptq and assemble, is written into
stats.json, gptq.json, quant_config.json and provenance, and is compared once
(`check_built_alike`) where a stage reads what another built.

Each artifact records only the options that acted on it (`record(stage)`), so flipping an option
changes exactly the files, and reruns exactly the jobs, that it names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from quamba.errors import ConfigError

RECIPES = ("quamba",)


@dataclass(frozen=True)
class Option:
    """One recipe option: its Quamba value, what else is allowed, and which stages read it."""

    quamba: Any
    allowed: tuple[Any, ...] | None  # None: any positive integer
    stages: frozenset[str]
    quamba_does: str
    option_does: str


MODEL = frozenset({"calibrate", "gptq", "assemble"})  # options that change the model every stage must share
OPTIONS: dict[str, Option] = {
    "alpha_one": Option(
        "quamba", ("quamba", "stream_max"), frozenset({"scales"}),
        "alpha 1.0 at a percentile tap is still its observer: the EMA of per-sample maxima, which clips",
        "stream_max: alpha 1.0 is the true maximum of the whole calibration stream (no clipping)"),
    "rotate_residual": Option(
        True, (True, False), MODEL,
        "the residual stream is always Hadamard-rotated (embedding, lm_head untied with norm_f folded "
        "in, block norms folded into in_proj, out_proj writing the rotated basis)",
        "false: only out_proj's input is rotated"),
    "hadamard": Option(
        "quamba", ("quamba", "extended"), MODEL,
        "Hadamard widths 2^k, 12 * 2^k and 40 * 2^k with its 12 x 12 and 40 x 40 base matrices",
        "extended: also 20 * 2^k (its own 20 x 20 base, also for 40 * 2^k) and 28 * 2^k"),
    "calibration_data": Option(
        "rows", ("rows", "packed"), frozenset({"calibrate"}),
        "each dataset row tokenized alone, truncated to seq_len, never padded; batch 1",
        "packed: rows joined with end-of-text into one stream cut into full seq_len windows"),
    "calibration_order": Option(
        "file", ("file", "seeded"), frozenset({"calibrate"}),
        "the first rows (windows) in file order",
        "seeded: a permutation drawn from the calibration seed"),
    "reorder": Option(
        False, (False, True), MODEL,
        "off in main.py's defaults (--group_heads); eval.sh turns it on for Mamba2",
        "true (Mamba2): Quamba2's head/channel reordering with grouped scales"),
    "reorder_method": Option(
        "quamba", ("quamba", "quamba_members", "absmax_kmeans1d"), MODEL,
        "the order from each channel's mean |x| (max over samples): per-head ascending channel sort, Ward "
        "clustering of the heads' normalized profiles, KMeans of the sorted positions over the heads at the "
        "cluster's rows of the original head order (scikit-learn; Quamba's slicing quirk)",
        "quamba_members: the KMeans over the cluster's own member heads; absmax_kmeans1d: heads and channels "
        "sorted by absmax and cut by exact 1-D k-means"),
    "head_clusters": Option(
        4, None, MODEL, "4 head groups per SSD group", "any positive number of head clusters"),
    "channel_clusters": Option(
        4, None, MODEL, "4 channel groups per head group", "any positive number of channel clusters"),
    "gptq": Option(
        True, (True, False), frozenset({"gptq"}),
        "GPTQ of in_proj and out_proj (its --apply_gptq; its own W8A8 script eval.sh runs none)",
        "false: round-to-nearest weights everywhere, Quamba's W8A8 paper setting"),
    "w8_gptq": Option(
        "quamba", ("quamba", "per_tensor"), frozenset({"gptq", "assemble"}),
        "8-bit GPTQ with groups of 128, then re-rounded to one per-tensor scale when the W8A8 layer is built",
        "per_tensor: GPTQ directly on the per-tensor int8 grid the W8A8 layer uses"),
    "int4_grid": Option(
        "quamba", ("quamba", "symmetric"), frozenset({"gptq"}),
        "int4 scale 2 absmax / 15 per group, levels -8..7",
        "symmetric: scale absmax / 7, levels -7..7"),
    "lm_head_gptq": Option(
        "quamba", ("quamba", "none", "w_bits"), frozenset({"gptq"}),
        "every GPTQ run also GPTQs lm_head at 4 bits (fp16 solve), even at w_bits 8 and when lm_head "
        "stays an fp16 layer (it then holds the 4-bit values)",
        "none: lm_head untouched; w_bits: lm_head GPTQ at the scheme's weight bits"),
    "quantize_lm_head": Option(
        False, (False, True), frozenset({"assemble"}),
        "off in main.py's defaults (--quantize_lm_head); eval.sh turns it on for W8A8",
        "true: lm_head an integer layer at the scheme's bits, its input quantized at lm_head:input (A8)"),
    "module_coverage": Option(
        "quamba", ("quamba", "projections"), frozenset({"assemble"}),
        "A8 schemes also store x_proj, dt_proj and the conv (weight and bias) as int8, A_log, D and "
        "(Mamba1) dt_bias as int8 per tensor, Mamba2's in_proj with one weight scale per split (z, x, B, "
        "C, dt); W4 schemes x_proj (Mamba1) as round-to-nearest int4",
        "projections: only in_proj and out_proj (and lm_head by its flag) get integer weights, one "
        "scale for Mamba2's whole in_proj"),
    "w4_layout": Option(
        "quamba", ("quamba", "gptq_codes"), frozenset({"assemble"}),
        "W4 layers as Marlin builds them: codes recovered from GPTQ's fp16 values, per channel on "
        "-7..7 where in_features <= 128; W4A8 turns the codes into int8 by QQQ's fp16 multiply",
        "gptq_codes: GPTQ's own codes and float32 scales as they are; W4A8 multiplies them dequantized"),
    "quantize_embedding": Option(
        False, (False, True), frozenset({"assemble"}),
        "off in main.py's defaults (--quantize_embedding); eval.sh turns it on for W8A8",
        "true: the embedding at the scheme's weight bits, per row by its signed maximum"),
    "rounding": Option(
        "quamba", ("quamba", "half_away"), frozenset({"gptq", "assemble"}),
        "ties to even for weights, norm and GEMM int8 outputs, Mamba2's prefill state and every decoding "
        "step's state; away from zero for the conv, the quantized Hadamard, Mamba1's prefill state and "
        "Mamba2's in_proj at one row (its GEMV)",
        "half_away: ties away from zero everywhere"),
}
REORDER_ONLY = ("reorder_method", "head_clusters", "channel_clusters")  # act only with reorder on


@dataclass(frozen=True)
class Recipe:
    """Recipe `name` plus its options; every field defaults to what Quamba's code does."""

    name: str = "quamba"
    alpha_one: str = "quamba"
    rotate_residual: bool = True
    hadamard: str = "quamba"
    calibration_data: str = "rows"
    calibration_order: str = "file"
    reorder: bool = False
    reorder_method: str = "quamba"
    head_clusters: int = 4
    channel_clusters: int = 4
    gptq: bool = True
    w8_gptq: str = "quamba"
    int4_grid: str = "quamba"
    lm_head_gptq: str = "quamba"
    quantize_lm_head: bool = False
    module_coverage: str = "quamba"
    w4_layout: str = "quamba"
    quantize_embedding: bool = False
    rounding: str = "quamba"

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ConfigError(f"recipe.name: {self.name!r} is not a recipe; allowed: {list(RECIPES)}")
        for key, option in OPTIONS.items():
            value = getattr(self, key)
            if option.allowed is None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"recipe.{key}: {value!r} is not allowed; allowed: a positive integer")
            elif not any(value is allowed or (type(value) is type(allowed) and value == allowed)
                         for allowed in option.allowed):
                raise ConfigError(f"recipe.{key}: {value!r} is not allowed; allowed: {list(option.allowed)}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, where: str = "recipe") -> Recipe:
        """A recipe from a config mapping (`name` plus options); unknown keys fail naming them."""
        mapping = dict(mapping or {})
        unknown = sorted(set(mapping) - {"name", *OPTIONS})
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; allowed: name, {', '.join(OPTIONS)}")
        try:
            return cls(**mapping)
        except ConfigError as err:
            raise ConfigError(str(err).replace("recipe.", f"{where}.", 1)) from None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Recipe:
        """The recipe a file records; options it does not record take Quamba's value."""
        return cls(name=record["name"], **record["options"])

    def options(self, stage: str | None = None) -> dict[str, Any]:
        """The options `stage` reads (all with stage None); the reorder settings only with reorder."""
        return {key: getattr(self, key) for key, option in OPTIONS.items()
                if (stage is None or stage in option.stages) and (self.reorder or key not in REORDER_ONLY)}

    def departures(self, stage: str | None = None) -> list[str]:
        """The options (of `stage`) that differ from what Quamba's code does."""
        return [key for key, value in self.options(stage).items() if value != OPTIONS[key].quamba]

    def record(self, stage: str | None = None) -> dict[str, Any]:
        """What an artifact records: the recipe name, the options that acted on it, the departures."""
        return {"name": self.name, "options": self.options(stage), "departures": self.departures(stage)}

    def for_model(self, layer: str) -> Recipe:
        """The recipe as it applies to one model: reordering is Quamba2's, so Mamba1 goes without."""
        return self if layer == "Mamba2" or not self.reorder else dataclasses.replace(self, reorder=False)

    def check_built_alike(self, record: Mapping[str, Any], what: str, stage: str) -> None:
        """Fail unless `what` (a file, by its record) was built with the same options wherever both
        this run's `stage` and that file read them: the model transforms, and e.g. w8_gptq."""
        built = Recipe.from_record(record)
        shared = [key for key in self.options(stage) if key in record["options"] or OPTIONS[key].stages == MODEL]
        for key in shared:
            asked, was = self.options(stage).get(key), built.options().get(key)
            if was != asked:
                raise ConfigError(f"recipe.{key}: {what} was built with {key}={was!r}, but this run asks for "
                                  f"{asked!r}; the stages must use the same {key}")


# Where this project still computes otherwise than Quamba with no option that does as it does
# (README, "Fidelity to Quamba"). Not options: nothing selects them, so they are listed, never
# hashed into a record; quant_config.json and each evaluation's results carry the ones that acted.
KNOWN_DEPARTURES: dict[str, str] = {
    "conv_scan_dequantized": "the quantized conv and scan compute with dequantized values in the model's dtype, "
                             "the taps rounding their outputs; Quamba's fused kernels keep float32 inside and "
                             "cast at their own points",
    "state_requantization": "a decoding step requantizes the state as v / s; Quamba's kernels divide (v k) / (s k) "
                            "with k = 1e2 or 1e6",
    "lm_eval_version": "lm-eval {version} scores the tasks; Quamba pins 0.4.2",
    "perplexity": "perplexity is lm-eval's rolling loglikelihood over the text; Quamba's ppl_eval scores "
                  "non-overlapping 2048-token windows with an fp16 loss",
}
QUAMBA_LM_EVAL = "0.4.2"


def known_departures(keys: list[str], **values: str) -> dict[str, str]:
    """The KNOWN_DEPARTURES entries of `keys`, their placeholders filled from `values`."""
    return {key: KNOWN_DEPARTURES[key].format(**values) for key in keys}


def merge_records(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One record of everything that acted on an artifact built from several inputs (each input's
    record holds the options of its stage). Two inputs that disagree on an option are an error."""
    options: dict[str, Any] = {}
    for record in records:
        if record["name"] != records[0]["name"]:
            raise ConfigError(f"recipe.name: inputs were built with recipes {records[0]['name']!r} and {record['name']!r}")
        for key, value in record["options"].items():
            if options.setdefault(key, value) != value:
                raise ConfigError(f"recipe.{key}: the inputs were built with {key}={options[key]!r} and {value!r}")
    ordered = {key: options[key] for key in OPTIONS if key in options}
    return {"name": records[0]["name"], "options": ordered,
            "departures": [key for key, value in ordered.items() if value != OPTIONS[key].quamba]}
