"""The study config (config.yaml, a study file) and its door, `check_study`: everything that can
be wrong with a study fails there, before any job, with one short error naming the key, its path
and what is allowed (Snakemake's own validation prints the whole schema). The door builds every
setting the jobs will build (recipe, calibration and GPTQ settings), so a config passes exactly
when its jobs would accept it, and the CLI's flags meet the same checks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from quamba.errors import ConfigError, QuambaError
from quamba.formats import layout
from quamba.shipped import SCHEMAS

SCHEMA_PATH = SCHEMAS / "config.schema.yaml"
MAX_ALLOWED_SHOWN = 20  # one screen


def _where(path) -> str:
    return "".join(f".{part}" for part in path)


def _allowed(error: jsonschema.ValidationError) -> str:
    schema = error.schema
    if error.validator == "additionalProperties":
        keys = sorted(schema.get("properties", {}))
        return f"allowed keys: {', '.join(keys[:MAX_ALLOWED_SHOWN])}{' ...' if len(keys) > MAX_ALLOWED_SHOWN else ''}"
    if error.validator == "enum":
        return ""  # the message lists them
    description = " ".join(str(schema.get("description", "")).split())
    return description[:200]


def read_study_file(path: str | Path) -> dict[str, Any]:
    """A study file parsed, or one line naming the file, line and column of its YAML error
    (Snakemake's own message for a --configfile names neither)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: unreadable study file ({err.strerror})") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a study file is a mapping of keys (models, calibrations, ...), "
                          f"got {type(config).__name__}")
    return config


def check_study_config(config: dict[str, Any]) -> None:
    """Fail on the first schema violation (jsonschema's best match), in one line or a few."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is None:
        return
    if error.validator == "additionalProperties":
        known = set(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - known) if isinstance(error.instance, dict) else []
        message = f"unknown key{'s' if len(unknown) > 1 else ''} {unknown}"
    elif error.validator == "not":
        message = f"{error.instance!r} is not allowed here"
    else:
        message = error.message if len(error.message) <= 200 else error.message[:200] + " ..."
    hint = _allowed(error)
    raise ConfigError(f"config{_where(error.absolute_path)}: {message}" + (f"; {hint}" if hint else ""))


def _non_finite(value: Any, path: tuple) -> tuple | None:
    """The path of the first NaN or infinite number in a parsed YAML document (YAML's .nan, .inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found = _non_finite(child, (*path, key))
        if found is not None:
            return found
    return None


def _with_defaults() -> type:
    """A Draft 2020-12 validator that fills in each object's schema defaults (as Snakemake's
    validate(set_default=True) does), so later checks see the values the jobs will."""
    base = jsonschema.Draft202012Validator
    check_properties = base.VALIDATORS["properties"]

    def properties(validator, props, instance, schema):
        if isinstance(instance, dict):
            for key, sub in props.items():
                if isinstance(sub, dict) and "default" in sub:
                    instance.setdefault(key, sub["default"])
        yield from check_properties(validator, props, instance, schema)

    return jsonschema.validators.extend(base, {"properties": properties})


def fill_defaults(config: dict[str, Any]) -> None:
    """The schema's defaults written into `config` in place (after `check_study_config`)."""
    _with_defaults()(yaml.safe_load(SCHEMA_PATH.read_text())).validate(config)


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
    """Every source is a local dir or a hub id and every task is known, so a typo fails here."""
    from quamba.models.checkpoint import check_source
    from quamba.stages.evaluate import split_tasks

    for name, spec in config["models"].items():
        for key in ("source", "tokenizer"):
            if key in spec:
                try:
                    check_source(spec[key])
                except QuambaError as err:
                    raise ConfigError(f"config: models.{name}.{key}: {err}") from None
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


def check_study(config: dict[str, Any]) -> None:
    """The study's door: non-finite numbers, the schema, then every setting as its job builds it,
    the sources and the tasks. Fills in the schema's defaults in place; raises ConfigError."""
    where = _non_finite(config, ())
    if where is not None:
        raise ConfigError(f"config{_where(where)}: {config_value(config, where)!r} is not a finite number; "
                          f"NaN and infinity are not allowed anywhere in a study")
    check_study_config(config)
    fill_defaults(config)
    _settings(config)
    _sources_and_tasks(config)


def config_value(config: Any, path: tuple) -> Any:
    for key in path:
        config = config[key]
    return config
