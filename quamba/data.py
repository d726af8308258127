"""Calibration and GPTQ data: text from a local file or a hub dataset, as token samples.

A source is a local .txt (documents separated by blank lines) or .jsonl (a `text` field per
line) file, where a document is a row, or a hub dataset: `ID[:CONFIG][?key=value&...]` with
keys data_files, split (default train) and field (default text), e.g. Quamba's calibration
data `monology/pile-uncopyrighted?data_files=val.jsonl.zst` and its GPTQ data
`wikitext:wikitext-2-raw-v1`.

Calibration samples follow the recipe (quamba.recipe):
- calibration_data rows (Quamba): each row tokenized alone and truncated to seq_len, never
  padded, so short documents stay short; one sample per forward. packed: the rows joined, each
  followed by end-of-text, into one token stream cut into consecutive full windows of seq_len.
- calibration_order file (Quamba): the first num_samples rows (windows) in the source's order.
  seeded: a permutation drawn from the calibration seed (of every row of a local file; of the
  first ROW_POOL x num_samples rows of a hub stream).
Mamba has no attention mask, so nothing is ever padded.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import torch

from quamba.errors import CheckpointError, ConfigError
from quamba.io import sha256_file
from quamba.shipped import DEFAULT_TOKENIZER, shown

ROW_POOL = 8  # a seeded order of a hub stream permutes its first ROW_POOL x num_samples rows
HUB_KEYS = ("data_files", "split", "field")


@dataclass(frozen=True)
class TokenSamples:
    """Token id samples (each (length,) int64; equal lengths unless rows) and where they came from."""

    samples: tuple[torch.Tensor, ...]
    source: str
    source_sha256: str
    selection: str

    @property
    def sha256(self) -> str:
        """A hash of the token ids, sample by sample (lengths included)."""
        digest = hashlib.sha256()
        for sample in self.samples:
            digest.update(len(sample).to_bytes(8, "little") + sample.numpy().astype("<i8").tobytes())
        return digest.hexdigest()

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        """Consecutive samples stacked into (b, length) batches; samples of a batch must be equally long."""
        out = []
        for start in range(0, len(self.samples), batch_size):
            group = self.samples[start:start + batch_size]
            if len({len(s) for s in group}) > 1:
                raise ConfigError(f"batch_size: {batch_size} stacks samples of different lengths "
                                  f"({sorted({len(s) for s in group})}); rows run one per forward (batch_size 1)")
            out.append(torch.stack(group))  # (b, length)
        return out

    def stacked(self) -> torch.Tensor:
        """All samples as one (n, length) tensor."""
        return self.batches(len(self.samples))[0]


@dataclass(frozen=True)
class HubSource:
    """A hub dataset: id, configuration, data files, split and text field."""

    name: str
    config: str | None = None
    data_files: str | None = None
    split: str = "train"
    field: str = "text"

    @classmethod
    def parse(cls, text: str) -> HubSource:
        base, _, query = text.partition("?")
        name, _, config = base.partition(":")
        options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)) if query else [])
        unknown = sorted(set(options) - set(HUB_KEYS))
        if unknown or not name:
            raise ConfigError(f"{text}: a hub dataset is ID[:CONFIG][?key=value&...] with keys {list(HUB_KEYS)}"
                              + (f"; unknown keys {unknown}" if unknown else ""))
        return cls(name, config or None, **options)


def _check_format(path: Path) -> None:
    """Only .txt and .jsonl files are read: a .json array or a file of another kind is no corpus."""
    if path.suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"{path}: a data file must be .txt (documents separated by blank lines) or .jsonl (a "
                          f"'text' field per line), not {path.suffix or 'a file without a suffix'}")


def _local_rows(path: Path, field: str = "text") -> list[str]:
    """A .txt file's documents (separated by blank lines) or a .jsonl file's `field` per line."""
    _check_format(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); a data file is text") from None
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)[field]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ConfigError(f"{path}:{number}: not a JSON object with a {field!r} field ({err})") from None
                if not isinstance(row, str):
                    raise ConfigError(f"{path}:{number}: its {field!r} field is {type(row).__name__}, not text")
                rows.append(row)
        return rows
    return [d for d in text.split("\n\n") if d.strip()]


def _hub_rows(source: HubSource) -> Iterator[str]:
    """Rows of a hub dataset streamed in their stored order."""
    import datasets  # only needed for hub data

    kwargs = {"data_files": source.data_files} if source.data_files else {}
    try:
        stream = datasets.load_dataset(source.name, source.config, split=source.split, streaming=True, **kwargs)
        for row in stream:
            yield row[source.field]
    except Exception as err:  # network, missing split or field: all name the dataset
        raise ConfigError(f"{source.name}: cannot read split {source.split!r} field {source.field!r} from the "
                          f"hub: {err}") from err


LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")  # what names a local file (only .txt and .jsonl are read)


def local_row_count(path: Path) -> int:
    """How many non-empty rows (documents) a local .txt/.jsonl file holds, as calibration reads them."""
    return len(_local_rows(Path(path)))


def check_data_source(source: str) -> None:
    """Fail now, naming the value, on data that is neither a local file nor a hub dataset id: a path
    (it exists but is no file, starts with . or /, or ends like a data file) that is not a file."""
    path = Path(source)
    if path.is_file():
        _check_format(path)
        return
    if path.exists():
        raise ConfigError(f"{source}: not a file; data must be a .txt/.jsonl file or a hub dataset id")
    if source.startswith((".", "/")) or path.suffix in LOCAL_SUFFIXES:
        raise ConfigError(f"{source}: no such data file; data must be a .txt/.jsonl file or a hub dataset id")
    HubSource.parse(source)


def read_documents(source: str | Path, max_rows: int | None = None,
                   max_chars: int | None = None) -> tuple[list[str], str]:
    """Rows in the source's order and a content hash: all of a local file (hashed whole), or the
    first of a hub stream until max_rows rows or max_chars characters (hashed as read)."""
    path = Path(source)
    if path.is_file():
        rows = _local_rows(path)
        if not rows:
            raise ConfigError(f"{path}: holds no documents")
        return rows, sha256_file(path)
    check_data_source(str(source))
    rows, chars = [], 0
    for row in _hub_rows(HubSource.parse(str(source))):
        rows.append(row)
        chars += len(row)
        if (max_rows is not None and len(rows) >= max_rows) or (max_chars is not None and chars >= max_chars):
            break
    if not rows:
        raise ConfigError(f"{source}: the hub dataset gave no rows")
    return rows, hashlib.sha256("\n\n".join(rows).encode()).hexdigest()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_has_tokenizer(model_dir: Path) -> None:
    """A model dir must hold its own tokenizer's files (calibration, GPTQ and evaluation ask)."""
    if not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{model_dir}: no tokenizer (expected tokenizer.json); write the dir with "
                              f"`quamba normalize SOURCE --tokenizer TOKENIZER --out DIR`")


def load_tokenizer(model_dir: Path | None):
    """The model dir's own tokenizer (None: the shipped demo tokenizer). A dir without one is
    refused: tokens of another tokenizer would calibrate and GPTQ the model on other text."""
    from transformers import AutoTokenizer

    source = DEFAULT_TOKENIZER if model_dir is None else Path(model_dir)
    check_has_tokenizer(source)
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as err:  # a damaged tokenizer.json / tokenizer_config.json: JSONDecodeError and others
        raise CheckpointError(f"{source}: its tokenizer does not load ({type(err).__name__}: {err}); rewrite "
                              f"the dir with `quamba normalize SOURCE --tokenizer TOKENIZER --out DIR`") from None


def _order(count: int, order: str, seed: int) -> list[int]:
    if order == "file":
        return list(range(count))
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


def calibration_samples(source: str | Path, tokenizer, num_samples: int, seq_len: int, seed: int,
                        data: str = "rows", order: str = "file") -> TokenSamples:
    """num_samples token samples for calibration, as the recipe's calibration_data and
    calibration_order say (module docstring)."""
    if num_samples <= 0 or seq_len <= 0:
        raise ConfigError(f"num_samples and seq_len must be positive, got {num_samples} and {seq_len}")
    if data not in ("rows", "packed") or order not in ("file", "seeded"):
        raise ConfigError(f"calibration_data {data!r} / calibration_order {order!r}: allowed rows|packed, file|seeded")
    if data == "rows":
        return _rows(source, tokenizer, num_samples, seq_len, seed, order)
    return _packed(source, tokenizer, num_samples, seq_len, seed, order)


def _rows(source, tokenizer, num_samples: int, seq_len: int, seed: int, order: str) -> TokenSamples:
    rows, digest = read_documents(source, max_rows=num_samples * (ROW_POOL if order == "seeded" else 1))
    samples, empty = [], 0
    for index in _order(len(rows), order, seed):
        ids = tokenizer(rows[index])["input_ids"][:seq_len]
        if not ids:  # nothing to run the model on; Quamba would fail here
            empty += 1
            continue
        samples.append(torch.tensor(ids, dtype=torch.long))
        if len(samples) == num_samples:
            break
    if len(samples) < num_samples:
        raise ConfigError(f"{source}: holds {len(samples)} non-empty rows, fewer than the {num_samples} samples "
                          f"asked for")
    picked = "the first rows in file order" if order == "file" else f"rows in torch.randperm(seed={seed}) order"
    selection = (f"{num_samples} rows, each tokenized alone and truncated to {seq_len} tokens, not padded: "
                 f"{picked}" + (f"; {empty} rows with no tokens skipped" if empty else ""))
    return TokenSamples(tuple(samples), shown(source), digest, selection)


def _packed(source, tokenizer, num_samples: int, seq_len: int, seed: int, order: str) -> TokenSamples:
    # ~4 characters per token; read twice what is needed from a hub stream
    rows, digest = read_documents(source, max_chars=8 * num_samples * seq_len)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for row in rows:
        stream.extend(tokenizer(row)["input_ids"])
        if eos is not None:
            stream.append(eos)
    available = len(stream) // seq_len
    if available < num_samples:
        raise ConfigError(f"{source}: holds {available} windows of {seq_len} tokens, "
                          f"fewer than the {num_samples} samples asked for")
    windows = torch.tensor(stream[: available * seq_len], dtype=torch.long).view(available, seq_len)
    pick = _order(available, order, seed)[:num_samples]
    picked = "the first in file order" if order == "file" else f"picked by torch.randperm(seed={seed})"
    selection = (f"documents joined with end-of-text, cut into {available} consecutive windows of "
                 f"{seq_len} tokens, {num_samples} {picked}")
    return TokenSamples(tuple(windows[pick]), shown(source), digest, selection)


def random_windows(source: str | Path, tokenizer, num_samples: int, seq_len: int, seed: int) -> TokenSamples:
    """GPTQ's windows as Quamba draws them: the rows joined with blank lines and tokenized as one
    stream, then per window a start random.randint(0, T - seq_len - 1) (inclusive) from Python's
    random seeded with `seed` (Quamba seeds 0), so seed 0 gives exactly Quamba's windows on the
    same text and tokenizer; the seed note's runs drew them unseeded. A hub split is read whole, as
    Quamba's loader joins all of wikitext-2's train rows (T, and so every start, depends on all of it)."""
    if num_samples <= 0 or seq_len <= 0:
        raise ConfigError(f"nsamples and seqlen must be positive, got {num_samples} and {seq_len}")
    rows, digest = read_documents(source)
    stream = tokenizer("\n\n".join(rows), return_tensors="pt")["input_ids"][0]  # (n_tokens,)
    if stream.numel() <= seq_len:
        raise ConfigError(f"{source}: {stream.numel()} tokens, fewer than one window of {seq_len}")
    draw = random.Random(seed)
    starts = [draw.randint(0, stream.numel() - seq_len - 1) for _ in range(num_samples)]
    ids = stream[torch.tensor(starts)[:, None] + torch.arange(seq_len)]  # (num_samples, seq_len)
    selection = (f"rows joined with blank lines, {num_samples} windows of {seq_len} tokens starting at "
                 f"random.Random({seed}).randint(0, T - {seq_len} - 1)")
    return TokenSamples(tuple(ids), shown(source), digest, selection)
