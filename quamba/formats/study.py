"""The study file (config.yaml, a study file): parsed with its YAML errors located, checked
against schemas/config.schema.yaml with one short error naming the key, its path and what is
allowed (Snakemake's own validation prints the whole schema), its defaults filled in.
quamba.study runs these first at the study's door."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from quamba.errors import ConfigError
from quamba.io import first_non_finite
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


def check_finite_numbers(config: dict[str, Any]) -> None:
    """Fail on the first NaN or infinite number (YAML's .nan, .inf), naming its path: the schema's
    bounds let NaN through (every comparison with it is false)."""
    where = first_non_finite(config)
    if where is not None:
        value = config
        for key in where:
            value = value[key]
        raise ConfigError(f"config{_where(where)}: {value!r} is not a finite number; NaN and infinity are not "
                          f"allowed anywhere in a study")
