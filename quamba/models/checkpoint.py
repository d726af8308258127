"""Read Mamba checkpoints in the state-spaces or transformers format; write our normalized FP16 dir.

A model dir is found locally or on the Hugging Face hub. Every failure names the file (and key)
at fault: a missing config, an unknown architecture, corrupt or mismatched weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from quamba.errors import CheckpointError, ConfigError
from quamba.io import atomic_dir, check_finite_document, check_output_dir, package_versions, sha256_files, write_json
from quamba.models.config import MambaConfig
from quamba.models.lm import MambaLMHeadModel, as_fp16_dir

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN_FILE = "pytorch_model.bin"
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path_or_hub_id: str | Path) -> bool:
    """True for `org/name` that is not an existing local path: it will be fetched from the hub."""
    return not Path(path_or_hub_id).exists() and bool(_HUB_ID.match(str(path_or_hub_id)))


RANDOM_PREFIX = "random:"  # random:ARCH[:SEED[:LAYERS]], a random-weight checkpoint (quamba.models.random_checkpoint)


def random_source(source: str | Path) -> tuple[str, int, int | None] | None:
    """(arch, seed, layers or None: the published depth) of a `random:ARCH[:SEED[:LAYERS]]` source,
    else None. LAYERS keeps the first blocks' widths at a smaller depth (a real-width study on a CPU)."""
    if not str(source).startswith(RANDOM_PREFIX):
        return None
    arch, *rest = str(source).removeprefix(RANDOM_PREFIX).split(":")
    if len(rest) > 2 or not all(part.isdigit() for part in rest) or (len(rest) == 2 and int(rest[1]) == 0):
        raise CheckpointError(f"{source}: a random source is random:ARCH[:SEED[:LAYERS]] with an integer seed >= 0 "
                              f"and a number of layers >= 1")
    return arch, int(rest[0]) if rest else 0, int(rest[1]) if len(rest) == 2 else None


def check_source(path_or_hub_id: str | Path) -> None:
    """Fail early, without downloading, when a source is neither a local dir, a hub id nor random:ARCH."""
    if random_source(path_or_hub_id) is not None:
        from quamba.models.random_checkpoint import architecture

        architecture(random_source(path_or_hub_id)[0])  # fails naming the allowed architectures
        return
    path = Path(path_or_hub_id)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: is a file; expected a model directory holding {CONFIG_FILE}")
    if not path.exists() and not is_hub_id(path_or_hub_id):
        raise CheckpointError(f"{path}: no such model directory (and not a hub id of the form org/name)")


def resolve_model_dir(path_or_hub_id: str | Path, revision: str | None = None) -> Path:
    """A local model dir as is; otherwise a hub id (`org/name`) downloaded into the HF cache."""
    check_source(path_or_hub_id)
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # only needed for hub ids

    try:
        return Path(snapshot_download(str(path_or_hub_id), revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # network, auth, missing repo: all end here with the id named
        raise CheckpointError(f"{path_or_hub_id}: not a local directory, and the hub download failed: {err}") from err


def read_config(model_dir: Path) -> tuple[MambaConfig, str]:
    """The architecture and the format ('state-spaces' or 'transformers') of a model dir."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a model directory needs {CONFIG_FILE}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    check_finite_document(raw, str(path), CheckpointError)  # e.g. norm_epsilon NaN: a model of NaN logits
    try:
        if "model_type" in raw:
            return MambaConfig.from_transformers(raw, source=str(path)), "transformers"
        if "d_model" in raw:
            return MambaConfig.from_state_spaces(raw, source=str(path)), "state-spaces"
    except ConfigError as err:
        raise CheckpointError(str(err)) from err
    raise CheckpointError(f"{path}: unknown architecture: neither 'model_type' (transformers format) "
                          f"nor 'd_model' (state-spaces format) is present")


def require_fp16_dir(model_dir: Path, command: str) -> MambaConfig:
    """The config of an FP16 dir as `quamba normalize` writes it (state-spaces config.json and one
    model.safetensors), which the stages after calibration read directly; anything else is
    refused before any work, saying how to make one."""
    model_dir = Path(model_dir)
    config, fmt = read_config(model_dir)
    quantized = (model_dir / "quant_config.json").is_file()
    if fmt != "state-spaces" or quantized or not (model_dir / SAFETENSORS_FILE).is_file():
        kind = "a quantized dir" if quantized else (f"a {fmt} checkpoint" if fmt != "state-spaces"
                                                     else f"a checkpoint without {SAFETENSORS_FILE}")
        raise CheckpointError(f"{model_dir}: {kind}; `quamba {command}` takes an FP16 dir written by "
                              f"`quamba normalize` (run `quamba normalize {model_dir} --out DIR` first)")
    return config


def weight_files(model_dir: Path) -> list[Path]:
    """The files holding the weights, preferring safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from err
        return [model_dir / shard for shard in shards]
    for name in (SAFETENSORS_FILE, TORCH_BIN_FILE):
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise CheckpointError(f"{model_dir}: no weights; expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {TORCH_BIN_FILE}")


HASH_RECORD = "hash.json"  # written last when a dir is made: the hash of its files and their sizes


def _hashed_files(model_dir: Path) -> list[Path]:
    return [Path(model_dir) / CONFIG_FILE, *weight_files(Path(model_dir))]


def record_model_sha256(model_dir: Path) -> str:
    """Hash a dir being made (normalize, random checkpoints) once and record it with each file's
    size, so later stages need not read gigabytes again (`model_sha256`). The record's bytes
    depend on the files' contents only."""
    files = _hashed_files(model_dir)
    digest = sha256_files(files)
    write_json(Path(model_dir) / HASH_RECORD,
               {"sha256": digest, "sizes": {path.name: path.stat().st_size for path in files}})
    return digest


def model_sha256(model_dir: Path) -> str:
    """The one hash of a model dir: config.json and its weight files, by name and content. Taken
    from the dir's hash record while every file has its recorded size and is no newer than the
    record; hashed again otherwise (a file replaced, touched, or copied without its times)."""
    files = _hashed_files(model_dir)
    record_path = Path(model_dir) / HASH_RECORD
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
            recorded_at = record_path.stat().st_mtime_ns
            if (record["sizes"] == {path.name: path.stat().st_size for path in files}
                    and all(path.stat().st_mtime_ns <= recorded_at for path in files)):
                return record["sha256"]
        except (json.JSONDecodeError, KeyError, TypeError, OSError):
            pass  # an unreadable record is no record
    return sha256_files(files)


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {SAFETENSORS_INDEX} but missing")
        try:
            if path.suffix == ".safetensors":
                state.update(load_file(path))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt or unreadable weights ({err})") from err
    return state


def _to_state_spaces_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers names the embedding `backbone.embeddings`; mamba_ssm `backbone.embedding`."""
    return {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in state.items()}


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether a float tensor holds no NaN and no inf, from its min and max: torch's min and max
    propagate NaN, and an inf is the min or the max. One vectorized pass, about 60x faster than
    isfinite().all() over CPU fp16 tensors on one thread (bench/finite_check.py): 5.4 GB of
    mamba2-2.7b weights are checked in every job's load."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite(state: dict[str, torch.Tensor], source: str, what: str = "") -> None:
    """Non-finite weights are bad input: fail naming the first tensor that holds NaN or inf."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not _all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source}: weight {key!r} holds {bad} non-finite values (NaN or inf){what}; "
                                  f"fix or replace the checkpoint")


def build_model(config: MambaConfig, state: dict[str, torch.Tensor], source: str,
                replaced: frozenset[str] = frozenset()) -> MambaLMHeadModel:
    """An LM holding `state` (state-spaces key names), after checking every key and shape.
    `replaced`: weights the caller swaps in itself (a quantized dir's integer layers); they stay
    on the meta device, never materialized."""
    state = dict(state)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # mamba_ssm's .bin carries the tied copy; ours does not
    with torch.device("meta"):
        model = MambaLMHeadModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in replaced}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        quantized = not replaced and any(k.endswith((".qweight", ".scales")) for k in unexpected)
        hint = ("; its tensors are a quantized model's, but the dir has no quant_config.json (deleted or never "
                "written): rebuild it with `quamba quantize` (or rerun snakemake)") if quantized else ""
        raise CheckpointError(f"{source}: weights do not match {CONFIG_FILE}: missing keys {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}{hint}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, "
                                  f"but {CONFIG_FILE} implies {tuple(shape)}")
    check_finite(state, source)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    return model


def load_fp_model(model_dir: Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> MambaLMHeadModel:
    """The FP model of a state-spaces or transformers model dir, in eval mode."""
    config, fmt = read_config(model_dir)
    state = read_state_dict(model_dir)
    if fmt == "transformers":
        state = _to_state_spaces_keys(state)
    model = build_model(config, state, source=str(model_dir))
    return model.to_dtype(device, dtype).eval()


def save_fp16(model: MambaLMHeadModel, out_dir: Path, tokenizer: str | Path,
              source: dict | None = None) -> Path:
    """Write our normalized FP16 checkpoint: model.safetensors (fp16, Mamba1's A_log and D and
    Mamba2's D in float32, as Quamba's modules hold them), config.json (state-spaces format),
    the tokenizer, and source.json. Atomic: `out_dir` appears complete or not at all."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as err:
        raise CheckpointError(f"{tokenizer}: cannot load a tokenizer from it ({err})") from err
    state = as_fp16_dir(model.state_dict(), model.config.layer)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    check_finite(state, str(out_dir), " in float16 (a weight beyond 65504 overflows)")
    with atomic_dir(Path(out_dir), CONFIG_FILE) as tmp:
        save_file(state, tmp / SAFETENSORS_FILE, metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, model.config.to_state_spaces())
        tok.save_pretrained(tmp)
        write_json(tmp / "source.json", {"schema_version": 1, "dtype": "float16",
                                         "tokenizer": str(tokenizer), **(source or {}),
                                         "versions": package_versions()})
        record_model_sha256(tmp)
    return Path(out_dir)


def normalize(src: str | Path, tokenizer: str | Path, out_dir: Path) -> Path:
    """Any supported FP checkpoint (local dir, hub id, or random:ARCH[:SEED[:LAYERS]]) -> our FP16 dir, with
    the input's hash. A random checkpoint is written in that format directly (no fp32 copy)."""
    check_output_dir(Path(out_dir), CONFIG_FILE)
    if random_source(src) is not None:
        from quamba.models.random_checkpoint import write_random_checkpoint

        arch, seed, layers = random_source(src)
        return write_random_checkpoint(arch, Path(out_dir), seed=seed, n_layer=layers,
                                       tokenizer=None if str(tokenizer) == str(src) else tokenizer)
    model_dir = resolve_model_dir(src)
    _, fmt = read_config(model_dir)
    inputs = [model_dir / CONFIG_FILE, *weight_files(model_dir)]
    model = load_fp_model(model_dir, dtype=torch.float32)
    return save_fp16(model, out_dir, tokenizer,
                     source={"source": str(src), "format": fmt, "sha256": sha256_files(inputs),
                             "files": sorted(p.name for p in inputs)})
