"""The `scales` stage: one alpha's thresholds per tap, derived from a calibration dir on the CPU in
seconds, equal to what the in-pass observer would have given at that alpha.

Percentile taps replay Quamba's observer from the stored per-sample tails (any alpha >= the
calibration's min_alpha, listed before or not); min/max taps take the stream absmax floored at
1e-5, which is exactly the running max of Quamba's per-sample floored absmax (in the observed dtype,
as its observer keeps it; the scale threshold / 127 is computed there too: `scale_dtype`). With the recipe's
alpha_one stream_max, alpha 1.0 at a percentile tap is the stream maximum instead. The stream
histogram says what each threshold really clips.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quamba.errors import ConfigError
from quamba.formats.calibration import read_stats, read_store, stats_path
from quamba.formats.scales import SCHEMA_VERSION, write_scales
from quamba.io import sha256_file
from quamba.numerics.observers import ABSMAX_FLOOR, StreamHistogram, replay_percentile
from quamba.numerics.quantizers import observed_dtype
from quamba.recipe import OPTIONS, Recipe


def check_alpha(alpha: float, min_alpha: float, where: str) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 < alpha <= 1.0:
        raise ConfigError(f"alpha: {alpha!r} is outside (0, 1]")
    if alpha < min_alpha:
        raise ConfigError(f"alpha: {alpha} is below the calibration's min_alpha {min_alpha} ({where}): its stored "
                          f"tails answer only alphas >= {min_alpha}; lower min_alpha (config "
                          f"calibrations.NAME.min_alpha, or `quamba calibrate --min-alpha`) and recalibrate")


def threshold(entry: dict, record, alpha: float, alpha_one: str) -> tuple[float, str, str]:
    """(threshold, how it was found, the dtype its scale threshold / 127 is computed in) of one tap
    at alpha. Quamba's percentile observer runs its EMA in float32; its min/max observer floors and
    keeps the running max in the observed dtype (fp16 on its fp16 model) and divides there."""
    if entry["observer"] == "percentile":
        if alpha == 1.0 and alpha_one == "stream_max":
            return entry["absmax"], "stream_max", "float32"
        return replay_percentile(record.tails, record.numels, alpha), "percentile", "float32"
    floored = torch.tensor(entry["absmax"], dtype=observed_dtype(entry["dtype"])).clamp(min=ABSMAX_FLOOR)
    return float(floored), "minmax", entry["dtype"]


def tap_scales(entry: dict, record, alpha: float, alpha_one: str, mantissa_bits: int) -> dict:
    """scales.json's entry for one tap: the threshold and what clipping there does to the stream."""
    value, observer, scale_dtype = threshold(entry, record, alpha, alpha_one)
    histogram = StreamHistogram.from_stored(record.histogram_offset, record.histogram, mantissa_bits)
    low, high = histogram.quantile_bracket(alpha)
    clipped_min, clipped_max = max(entry["min"], -value), min(entry["max"], value)
    fraction, error = histogram.fraction_above(value) if value < entry["absmax"] else (0.0, 0.0)
    value_range = entry["max"] - entry["min"]
    return {"observer": observer, "threshold": value, "scale_dtype": scale_dtype,
            "stream_percentile": {"low": min(low, entry["absmax"]), "high": min(high, entry["absmax"])},
            "clipped_min": clipped_min, "clipped_max": clipped_max, "clipped_range": clipped_max - clipped_min,
            "range_reduction": 1.0 - (clipped_max - clipped_min) / value_range if value_range > 0 else 0.0,
            "clipped_fraction": fraction, "clipped_fraction_error": error}


def derive_scales(calib_dir: str | Path, alpha: float, alpha_one: str = OPTIONS["alpha_one"].quamba,
                  taps: list[str] | None = None) -> dict:
    """scales.json's document for one alpha (all taps, or `taps`), from a calibration dir."""
    path = stats_path(calib_dir)
    stats = read_stats(path)
    check_alpha(alpha, stats["min_alpha"], str(path))
    recipe = Recipe.from_record({"name": stats["recipe"]["name"], "options": {"alpha_one": alpha_one}})
    names = list(stats["taps"]) if taps is None else taps
    records = read_store(path.parent, names, stats)
    mantissa_bits = stats["bins_per_octave"].bit_length() - 1
    entries = {name: tap_scales(stats["taps"][name], records[name], alpha, alpha_one, mantissa_bits)
               for name in names}
    # alpha_one acts only at alpha 1.0: elsewhere it is not recorded, so flipping it changes no other file
    record = recipe.record("scales") if alpha == 1.0 else {"name": recipe.name, "options": {}, "departures": []}
    return {"schema_version": SCHEMA_VERSION, "kind": "quamba-scales", "alpha": float(alpha), "recipe": record,
            "calibration": {"stats_sha256": sha256_file(path), "model_sha256": stats["model"]["sha256"],
                            "min_alpha": stats["min_alpha"]},
            "taps": entries}


def scales_file(calib_dir: str | Path, alpha: float, out: str | Path,
                alpha_one: str = OPTIONS["alpha_one"].quamba) -> dict:
    """`quamba scales`: derive one alpha's scales.json and write it atomically to `out`."""
    if Path(out).is_dir():
        raise ConfigError(f"out: {out} is a directory; give the path of the scales.json to write (e.g. "
                          f"{Path(out)}/pa{alpha}/scales.json)")
    doc = derive_scales(calib_dir, alpha, alpha_one)
    write_scales(out, doc)
    return doc

