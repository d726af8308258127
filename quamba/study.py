"""The study's door, `check_study`: everything that can be wrong with a study fails there, before
any job (rules/common.smk runs it first; `quamba check-study` without Snakemake), with one short
error naming the key, its path and what is allowed. The door builds every setting the jobs will
build (recipe, calibration and GPTQ settings), so a study passes exactly when its jobs would
accept it, and the CLI's flags meet the same checks (the settings dataclasses validate both)."""

from __future__ import annotations

from typing import Any

from quamba.errors import ConfigError, QuambaError
from quamba.formats import layout
from quamba.formats.study import check_finite_numbers, check_study_config, fill_defaults


def _settings(config: dict[str, Any]) -> None:
    """Build every setting the jobs build from this study; each names its key when it fails."""
    from quamba.recipe import Recipe
    from quamba.schemes import get_scheme
    from quamba.stages.calibrate import CalibrationSettings
    from quamba.stages.gptq import GPTQSettings

    recipe = Recipe.from_mapping(config["recipe"], where="config: recipe")
    for name, setting in config["calibrations"].items():
        try:
            CalibrationSettings.from_config(setting).check(recipe)
        except ConfigError as err:
            raise ConfigError(f"config: calibrations.{name}: {err}") from None
    quantization = config["quantization"]
    bits = sorted({get_scheme(s).w_bits for s in quantization["schemes"]})
    for w_bits in bits:
        for seed in quantization["seeds"]:
            try:
                GPTQSettings.from_config(config["gptq"], w_bits=w_bits, seed=seed).validate()
            except ConfigError as err:
                raise ConfigError(f"config: gptq: {err}") from None
    calibration = quantization["calibration"]
    if calibration not in config["calibrations"]:
        raise ConfigError(f"config: quantization.calibration: {calibration!r} is not a calibration setting; "
                          f"allowed: {sorted(config['calibrations'])}")
    min_alpha = config["calibrations"][calibration]["min_alpha"]
    low = [a for a in quantization["alphas"] if a < min_alpha]
    if low:
        raise ConfigError(f"config: quantization.alphas: {low} are below calibrations.{calibration}.min_alpha "
                          f"{min_alpha}; lower min_alpha (that reruns the calibration) or pick alphas in "
                          f"[{min_alpha}, 1]")


def _sources_and_tasks(config: dict[str, Any]) -> None:
    """Every model source is a local dir or a hub id, every data value a local file or a hub dataset
    id, and every task is known, so a typo fails here."""
    from quamba.data import check_data_source
    from quamba.models.checkpoint import check_source
    from quamba.stages.evaluate import split_tasks

    for name, spec in config["models"].items():
        for key in ("source", "tokenizer"):
            if key in spec:
                try:
                    check_source(spec[key])
                except QuambaError as err:
                    raise ConfigError(f"config: models.{name}.{key}: {err}") from None
    data = [(f"calibrations.{name}.data", setting.get("data")) for name, setting in config["calibrations"].items()]
    for key, source in [*data, ("gptq.data", config["gptq"].get("data"))]:
        if source is not None:
            try:
                check_data_source(str(source))
            except QuambaError as err:
                raise ConfigError(f"config: {key}: {err}") from None
    _enough_rows(config)
    tasks = config["tasks"]
    try:
        split_tasks(tasks)
    except QuambaError as err:
        raise ConfigError(f"config: tasks: {err}") from None
    if len({layout.task_key(task) for task in tasks}) < len(tasks):
        raise ConfigError(f"config: tasks: {tasks} name two tasks that share a file name")
    limit = config["eval"]["limit"]
    unknown = sorted(set(limit) - set(tasks)) if isinstance(limit, dict) else []
    if unknown:
        raise ConfigError(f"config: eval.limit: {unknown} are not in tasks {tasks}")


def _offline_model_config(source: str):
    """A model source's architecture when it is known without a download (random:ARCH, a local
    dir), else None (a hub id: its job checks it once downloaded)."""
    from pathlib import Path

    from quamba.models.checkpoint import random_source, read_config

    if (random := random_source(source)) is not None:
        from quamba.models.random_checkpoint import architecture

        arch, _, layers = random
        return architecture(arch) if layers is None else architecture(arch).replace(n_layer=layers)
    return read_config(Path(source))[0] if (Path(source) / "config.json").is_file() else None


def _model_settings(config: dict[str, Any]) -> None:
    """What depends on a model's architecture, checked where the architecture is known offline:
    the Hadamard widths, the sampled layers, GPTQ's group size, Quamba2's reordering. Each job
    checks the same again (a hub model is checked only there)."""
    from quamba.recipe import Recipe
    from quamba.stages.calibrate import CalibrationSettings
    from quamba.stages.gptq import check_group_size
    from quamba.transforms.reorder import check_reorderable
    from quamba.transforms.rotation import check_widths

    study_recipe = Recipe.from_mapping(config["recipe"], where="config: recipe")
    for name, spec in config["models"].items():
        model = _offline_model_config(str(spec["source"]))
        if model is None:
            continue
        recipe = study_recipe.for_model(model.layer)
        try:
            check_widths(model, recipe.rotate_residual, recipe.hadamard)
            check_group_size(model, config["gptq"]["group_size"])
            if recipe.reorder:
                check_reorderable(model, recipe.head_clusters, recipe.channel_clusters, recipe.reorder_method)
            for calibration, setting in config["calibrations"].items():
                try:
                    CalibrationSettings.from_config(setting).validate(model.n_layer, recipe)
                except ConfigError as err:
                    raise ConfigError(f"calibrations.{calibration}: {err}") from None
        except QuambaError as err:
            raise ConfigError(f"config: models.{name} ({spec['source']}): {err}") from None


def _enough_rows(config: dict[str, Any]) -> None:
    """A calibration of one row per sample (recipe.calibration_data rows, Quamba's) from a local
    file needs that many rows: counted here (a read of the file), not an hour into the study.
    Hub data and packed windows are counted where the job reads them."""
    from pathlib import Path

    from quamba.data import local_row_count
    from quamba.shipped import DEFAULT_CORPUS

    if config["recipe"].get("calibration_data", "rows") != "rows":
        return
    for name, setting in config["calibrations"].items():
        source = Path(setting.get("data") or DEFAULT_CORPUS)
        if source.is_file() and (rows := local_row_count(source)) < setting["samples"]:
            raise ConfigError(f"config: calibrations.{name}.samples: {setting['samples']} samples, one per row, but "
                              f"{source} holds {rows} non-empty rows; allowed: 1..{rows}, or more data")


def check_study(config: dict[str, Any]) -> None:
    """The study's door: non-finite numbers, the schema, then every setting as its job builds it,
    the sources and the tasks. Fills in the schema's defaults in place; raises ConfigError."""
    check_finite_numbers(config)
    check_study_config(config)
    fill_defaults(config)
    _settings(config)
    _sources_and_tasks(config)
    _model_settings(config)
