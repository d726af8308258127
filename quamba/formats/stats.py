"""stats.json and activations.npz: the calibration statistics as a persistent, versioned format.

Both files are written atomically and deterministically: the same inputs and seed give
byte-identical files (sorted JSON keys; zip entries with a fixed timestamp).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import jsonschema
import numpy as np
import yaml

from quamba.errors import ConfigError
from quamba.io import atomic_path
from quamba.shipped import SCHEMAS

SCHEMA_VERSION = 1
SCHEMA_PATH = SCHEMAS / "stats.schema.yaml"
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def validate_stats(doc: dict, source: str = "stats.json") -> dict:
    """Check a stats document against schemas/stats.schema.yaml; name the offending key."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    try:
        jsonschema.validate(doc, schema)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ConfigError(f"{source}: {where}: {err.message}") from None
    return doc


def read_stats(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such stats file")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    return validate_stats(doc, str(path))


def stats_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """np.savez_compressed's format, but with fixed zip timestamps so reruns are byte-identical."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            array_buffer = io.BytesIO()
            np.lib.format.write_array(array_buffer, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            archive.writestr(info, array_buffer.getvalue())
    return buffer.getvalue()


def write_calibration(out_dir: Path, doc: dict, samples: dict[str, np.ndarray] | None) -> None:
    """Write stats.json (and activations.npz) into out_dir; each file appears whole or not at all."""
    validate_stats(doc)
    out_dir = Path(out_dir)
    payloads = {"stats.json": stats_bytes(doc)}
    if samples is not None:
        payloads["activations.npz"] = npz_bytes(samples)
    for name, payload in payloads.items():
        with atomic_path(out_dir / name) as tmp:
            tmp.write_bytes(payload)
