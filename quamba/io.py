"""Atomic file output and provenance: nothing half-written is ever left under a final name."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from quamba.errors import ConfigError

PROVENANCE_PACKAGES = ("quamba-flow", "torch", "transformers", "safetensors", "numpy", "lm-eval")


def _default_mode(directory: bool) -> int:
    """What open()/mkdir() would give under the current umask (mkstemp/mkdtemp give 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _temp_prefix(final: Path) -> str:
    """Temp names beside `final` carry the writer's host and pid, so a later writer can tell a
    leftover of a killed one (same host, pid gone) from a writer still at work."""
    return f".{final.name}.{socket.gethostname()}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(final: Path) -> list[Path]:
    """Delete the temp files and dirs a killed writer of `final` left beside it (same host, its
    process gone); returns what was removed. Temps of live writers and other hosts stay."""
    host, removed = socket.gethostname(), []
    for path in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        owner = path.name[len(final.name) + 2:].removesuffix(".tmp").rpartition(".")[0]  # "{host}-{pid}"
        name, _, pid = owner.rpartition("-")
        if name == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_output_dir(final: Path, marker: str) -> None:
    """An output dir replaces only an earlier output of its kind (a dir holding `marker`) or an
    empty dir, never a file or someone's other files: asked before any work, and again on writing."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise ConfigError(f"{final}: exists and is not a directory; the output must be a directory (choose another "
                          f"--out)")
    if final.is_dir() and not (final / marker).is_file() and any(final.iterdir()):
        raise ConfigError(f"{final}: a non-empty directory that is no earlier output of this kind (it has no "
                          f"{marker}); the output replaces its directory whole, so choose another --out or "
                          f"empty it yourself")


@contextlib.contextmanager
def atomic_dir(final: Path, marker: str) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` in one rename (only an
    earlier output holding `marker`, or an empty dir: `check_output_dir`). Leftovers of a killed
    earlier writer of `final` are removed first."""
    final = Path(final)
    check_output_dir(final, marker)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), suffix=".tmp", dir=final.parent))
    tmp.chmod(_default_mode(directory=True))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp file path beside `final`; on success it is renamed onto `final` (leftovers of a
    killed earlier writer removed first)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(final), suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(_default_mode(directory=False))
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, keys sorted, so equal data gives byte-identical files."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: Iterable[Path]) -> str:
    """One hash over several files, by name and content, independent of their order."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


def package_versions(names: Iterable[str] = PROVENANCE_PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def first_non_finite(value: Any, path: tuple = ()) -> tuple | None:
    """The key path of the first NaN or infinite number in a parsed JSON / YAML document, or None:
    schemas' bounds let NaN through (every comparison with it is false), so readers ask this."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found = first_non_finite(child, (*path, key))
        if found is not None:
            return found
    return None


def check_finite_document(doc: Any, source: str, error: type[Exception]) -> None:
    """Raise `error` naming the file and the key path of the first NaN or infinite number in doc."""
    where = first_non_finite(doc)
    if where is not None:
        raise error(f"{source}: {'/'.join(str(k) for k in where)} is {_value_at(doc, where)!r}; "
                    f"NaN and infinity are not allowed (an edited or damaged file: rebuild it)")


def _value_at(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc
