"""Calibration and GPTQ data: text from a local file or a hub dataset, packed into token windows.

Mamba has no attention mask, so windows are never padded: documents are joined into one token
stream (each followed by end-of-text), cut into consecutive windows of seq_len tokens, and a
seeded permutation picks num_samples of them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from quamba.errors import ConfigError
from quamba.io import sha256_file
from quamba.shipped import DEFAULT_TOKENIZER, shown


@dataclass(frozen=True)
class TokenWindows:
    """num_samples x seq_len token ids, and where they came from."""

    ids: torch.Tensor  # (num_samples, seq_len), int64
    source: str
    source_sha256: str
    selection: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.ids.numpy().astype("<i8").tobytes()).hexdigest()


def read_documents(source: str | Path, split: str = "train", text_field: str = "text",
                   max_chars: int | None = None) -> tuple[list[str], str]:
    """Documents and a content hash. A local .txt holds documents separated by blank lines,
    a .jsonl one JSON object per line with `text_field`; anything else is a hub dataset id."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".jsonl":
            docs = [json.loads(line)[text_field] for line in path.read_text().splitlines() if line.strip()]
        else:
            docs = [d for d in path.read_text().split("\n\n") if d.strip()]
        if not docs:
            raise ConfigError(f"{path}: calibration corpus is empty")
        return docs, sha256_file(path)
    if path.exists() or str(source).startswith((".", "/")):
        raise ConfigError(f"{path}: calibration data must be a .txt/.jsonl file or a hub dataset id")
    return _hub_documents(str(source), split, text_field, max_chars)


def _hub_documents(dataset_id: str, split: str, text_field: str,
                   max_chars: int | None) -> tuple[list[str], str]:
    """Stream documents of a hub dataset in its stored order (the seeded pick happens later).
    `id:config` names a configuration, e.g. `wikitext:wikitext-2-raw-v1` (GPTQ's data)."""
    import datasets  # only needed for hub data

    name, _, config_name = dataset_id.partition(":")
    try:
        stream = datasets.load_dataset(name, config_name or None, split=split, streaming=True)
        docs, chars = [], 0
        for row in stream:
            docs.append(row[text_field])
            chars += len(row[text_field])
            if max_chars is not None and chars >= max_chars:
                break
    except Exception as err:  # network, missing split or field: all name the dataset
        raise ConfigError(f"{dataset_id}: cannot read split {split!r} field {text_field!r} from the hub: {err}") from err
    digest = hashlib.sha256("\n\n".join(docs).encode()).hexdigest()
    return docs, digest


def load_tokenizer(model_dir: Path | None):
    """The model dir's tokenizer when it has one, else the shipped demo tokenizer."""
    from transformers import AutoTokenizer

    source = model_dir if model_dir is not None and (Path(model_dir) / "tokenizer_config.json").is_file() else DEFAULT_TOKENIZER
    return AutoTokenizer.from_pretrained(str(source))


def token_windows(source: str | Path, tokenizer, num_samples: int, seq_len: int, seed: int,
                  split: str = "train") -> TokenWindows:
    """num_samples distinct, unpadded windows of seq_len tokens, picked by a seeded permutation."""
    if num_samples <= 0 or seq_len <= 0:
        raise ConfigError(f"num_samples and seq_len must be positive, got {num_samples} and {seq_len}")
    # ~4 characters per token; read twice what is needed from a hub stream
    docs, digest = read_documents(source, split=split, max_chars=8 * num_samples * seq_len)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc)["input_ids"])
        if eos is not None:
            stream.append(eos)
    available = len(stream) // seq_len
    if available < num_samples:
        raise ConfigError(f"{source}: holds {available} windows of {seq_len} tokens, "
                          f"fewer than the {num_samples} samples asked for")
    windows = torch.tensor(stream[: available * seq_len], dtype=torch.long).view(available, seq_len)
    pick = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:num_samples]
    selection = (f"documents joined with end-of-text, cut into {available} consecutive windows of "
                 f"{seq_len} tokens, {num_samples} picked by torch.randperm(seed={seed})")
    return TokenWindows(windows[pick], shown(source), digest, selection)



def random_windows(source: str | Path, tokenizer, num_samples: int, seq_len: int, seed: int,
                   split: str = "train") -> TokenWindows:
    """GPTQ's sampling: windows of seq_len tokens at random offsets of the joined token stream,
    drawn from a generator seeded by `seed` (the official loader seeds Python's random; the
    seed note's runs drew them unseeded, the cause of its irreproducible weights)."""
    if num_samples <= 0 or seq_len <= 0:
        raise ConfigError(f"nsamples and seqlen must be positive, got {num_samples} and {seq_len}")
    docs, digest = read_documents(source, split=split, max_chars=None if Path(source).is_file() else 4_000_000)
    stream = tokenizer("\n\n".join(docs), return_tensors="pt")["input_ids"][0]  # (n_tokens,)
    if stream.numel() <= seq_len:
        raise ConfigError(f"{source}: {stream.numel()} tokens, fewer than one window of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (num_samples,), generator=generator)
    ids = stream[starts[:, None] + torch.arange(seq_len)]  # (num_samples, seq_len)
    selection = (f"documents joined with blank lines, {num_samples} windows of {seq_len} tokens at "
                 f"offsets from torch.randint(seed={seed})")
    return TokenWindows(ids, shown(source), digest, selection)
