"""A calibration dir: what one calibration pass keeps, as persistent, versioned formats.

- stats.json (schemas/stats.schema.yaml): the alpha-free summary a person reads: per tap its
  observer, moments and extremes; the recipe, model, data and settings; the reorder plan.
- calibration.safetensors: what any alpha >= min_alpha needs after the fact, exactly as the
  in-pass observer would have computed it: per percentile tap and calibration sample the
  largest |x| (a descending tail, in the activations' dtype) with the sample's numel; per tap
  the stream histogram. Never pickle.
- activations.npz: a uniform sample of each sampled tap's values (the seed note's file).
All are written atomically and deterministically: the same inputs and seed give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load, save

from quamba.errors import ConfigError
from quamba.io import atomic_path, check_finite_document
from quamba.shipped import SCHEMAS

SCHEMA_VERSION = 4  # 4: the sha256 of the files beside it; 3: each tap's observed dtype
STATS_FILE, STORE_FILE, ACTIVATIONS_FILE = "stats.json", "calibration.safetensors", "activations.npz"
SCHEMA_PATH = SCHEMAS / "stats.schema.yaml"
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class TapRecord:
    """What calibration.safetensors holds for one tap."""

    histogram_offset: int  # first bin of `histogram` in the full float32-bits histogram
    histogram: torch.Tensor  # int64 (bins,): counts from histogram_offset on
    tails: list[torch.Tensor] | None  # percentile taps: per sample the largest |x|, descending
    numels: list[int] | None  # percentile taps: per sample its number of values


def validate_stats(doc: dict, source: str = STATS_FILE) -> dict:
    """Check a stats document against schemas/stats.schema.yaml; name the offending key."""
    version = doc.get("schema_version") if isinstance(doc, dict) else None
    if version != SCHEMA_VERSION:
        raise ConfigError(f"{source}: schema_version {version!r}, but this quamba-flow reads version "
                          f"{SCHEMA_VERSION} (with each tap's observed dtype and the hashes of the files beside it); "
                          f"rebuild it: rerun `quamba calibrate`, or delete its calib dir and rerun snakemake")
    try:
        jsonschema.validate(doc, yaml.safe_load(SCHEMA_PATH.read_text()))
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ConfigError(f"{source}: {where}: {err.message}") from None
    return doc


def stats_path(path: str | Path) -> Path:
    """stats.json of a calibration dir, or the path itself when it names the file."""
    path = Path(path)
    return path / STATS_FILE if path.is_dir() else path


def read_stats(path: str | Path) -> dict:
    """A validated stats.json (given as the file or its calibration dir)."""
    path = stats_path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such stats file")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    check_finite_document(doc, str(path), ConfigError)
    return validate_stats(doc, str(path))


def _check_written_with(path: Path, stats: dict) -> bytes:
    """The bytes of a file beside stats.json, after checking they are the ones stats.json was
    written with: a calibration killed between its files, or files mixed from two calibrations,
    must not pass for one."""
    if not path.is_file():
        raise ConfigError(f"{path}: missing; a calibration dir needs it (rerun `quamba calibrate`)")
    payload = path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != stats["files"].get(path.name):
        raise ConfigError(f"{path}: not the file its stats.json was written with (a calibration interrupted between "
                          f"its files, or files of two calibrations); rerun `quamba calibrate`")
    return payload


def read_store(calib_dir: str | Path, taps: list[str], stats: dict) -> dict[str, TapRecord]:
    """The stored tails and histograms of `taps` from a calibration dir's calibration.safetensors
    (the one its stats.json, `stats`, was written with)."""
    path = Path(calib_dir) / STORE_FILE
    payload = _check_written_with(path, stats)
    try:
        tensors = load(payload)
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path}: unreadable ({err}); rerun `quamba calibrate`") from err
    records = {}
    for tap in taps:
        try:
            histogram = tensors[f"{tap}/histogram"]
            offset = int(tensors[f"{tap}/histogram_offset"])
        except KeyError:
            raise ConfigError(f"{path}: has no histogram of tap {tap}; rerun `quamba calibrate`") from None
        tails = numels = None
        if f"{tap}/tails" in tensors:
            lengths = tensors[f"{tap}/tail_lengths"].tolist()
            tails = list(tensors[f"{tap}/tails"].split(lengths))
            numels = tensors[f"{tap}/numels"].tolist()
        if (histogram < 0).any() or (tails is not None and not all(bool(torch.isfinite(t).all()) for t in tails)):
            raise ConfigError(f"{path}: tap {tap} has negative histogram counts or non-finite tail values (an "
                              f"edited or damaged file); rerun `quamba calibrate`")
        records[tap] = TapRecord(offset, histogram, tails, numels)
    return records


def store_bytes(records: dict[str, TapRecord]) -> bytes:
    """calibration.safetensors' bytes: per tap its histogram and, for percentile taps, its tails."""
    tensors = {}
    for tap, record in records.items():
        tensors[f"{tap}/histogram"] = record.histogram.to(torch.int64).contiguous()
        tensors[f"{tap}/histogram_offset"] = torch.tensor([record.histogram_offset], dtype=torch.int64)
        if record.tails is not None:
            tensors[f"{tap}/tails"] = torch.cat(record.tails).contiguous()
            tensors[f"{tap}/tail_lengths"] = torch.tensor([len(t) for t in record.tails], dtype=torch.int64)
            tensors[f"{tap}/numels"] = torch.tensor(record.numels, dtype=torch.int64)
    # one metadata key: safetensors writes a map of several in a random order
    return save(dict(sorted(tensors.items())), metadata={"format": "quamba-calibration-2"})


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


def read_activation_samples(path: Path, stats: dict, keep=lambda tap: True) -> dict[str, np.ndarray]:
    """activations.npz's samples of the taps `keep` accepts, each flat float64 (the file its
    stats.json, `stats`, was written with); a damaged or non-finite file is refused naming the tap
    (calibration never writes one: it fails on a non-finite activation)."""
    payload = _check_written_with(Path(path), stats)
    try:
        with np.load(io.BytesIO(payload)) as npz:
            samples = {tap: npz[tap].astype(np.float64).ravel() for tap in npz.files if keep(tap)}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ConfigError(f"{path}: unreadable activation samples ({err}); rerun the calibrate job that "
                          f"writes it") from None
    for tap, values in samples.items():
        if not np.isfinite(values).all():
            raise ConfigError(f"{path}: tap {tap} holds NaN or infinite samples (an edited or damaged file); rerun "
                              f"the calibrate job that writes it")
    return samples


def write_calibration(out_dir: Path, doc: dict, records: dict[str, TapRecord],
                      samples: dict[str, np.ndarray] | None) -> dict:
    """Write calibration.safetensors (and activations.npz), then stats.json, which records their
    sha256 (`files`), into out_dir; each file appears whole or not at all, and a reader refuses a
    file stats.json was not written with. Returns the stats document as written."""
    out_dir = Path(out_dir)
    payloads = {STORE_FILE: store_bytes(records)}
    if samples is not None:
        payloads[ACTIVATIONS_FILE] = npz_bytes(samples)
    doc = {**doc, "files": {name: hashlib.sha256(payload).hexdigest() for name, payload in payloads.items()}}
    validate_stats(doc)
    if samples is None:
        (out_dir / ACTIVATIONS_FILE).unlink(missing_ok=True)  # an earlier calibration's, not this one's
    for name, payload in [*payloads.items(), (STATS_FILE, stats_bytes(doc))]:  # stats.json last: it names the rest
        with atomic_path(out_dir / name) as tmp:
            tmp.write_bytes(payload)
    return doc
