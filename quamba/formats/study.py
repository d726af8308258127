"""The study config (config.yaml, a study file): checked against schemas/config.schema.yaml at
the door, with one short error naming the key, its path and what is allowed (Snakemake's own
validation prints the whole schema)."""

from __future__ import annotations

from typing import Any

import jsonschema
import yaml

from quamba.errors import ConfigError
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
