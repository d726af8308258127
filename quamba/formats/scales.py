"""scales.json: one alpha's activation thresholds per tap, derived from a calibration dir
(schemas/scales.schema.yaml). Written by the `scales` stage, read by assembly."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

from quamba.errors import ConfigError
from quamba.io import check_finite_document, write_json
from quamba.shipped import SCHEMAS

SCALES_FILE = "scales.json"
SCHEMA_VERSION = 2  # 2: each tap's scale_dtype
SCHEMA_PATH = SCHEMAS / "scales.schema.yaml"


def validate_scales(doc: dict, source: str = SCALES_FILE) -> dict:
    check_finite_document(doc, source, ConfigError)
    try:
        jsonschema.validate(doc, yaml.safe_load(SCHEMA_PATH.read_text()))
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ConfigError(f"{source}: {where}: {err.message}") from None
    return doc


def read_scales(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such scales file; derive it with `quamba scales CALIB_DIR --alpha A --out FILE`")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    return validate_scales(doc, str(path))


def write_scales(path: str | Path, doc: dict) -> None:
    """Atomically, keys sorted: equal thresholds give equal bytes."""
    write_json(Path(path), validate_scales(doc))
