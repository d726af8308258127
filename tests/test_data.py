"""Calibration and GPTQ data: Quamba's rows and windows, packed windows, and the hub loader's
arguments (the hub itself is never reached: datasets.load_dataset is replaced)."""

import random
import sys
import types

import pytest
import torch
from conftest import REPO

from quamba.data import HubSource, calibration_samples, load_tokenizer, random_windows, read_documents
from quamba.errors import ConfigError

CORPUS = REPO / "resources" / "corpus" / "valid.txt"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def test_rows_are_the_first_rows_each_tokenized_alone_and_truncated(tokenizer):
    rows, _ = read_documents(CORPUS)
    samples = calibration_samples(CORPUS, tokenizer, 5, 64, seed=3)
    for sample, row in zip(samples.samples, rows):
        assert sample.tolist() == tokenizer(row)["input_ids"][:64]  # no padding, no end-of-text
    assert samples.selection.endswith("the first rows in file order")


def test_packed_windows_in_file_order_are_consecutive_full_windows(tokenizer):
    samples = calibration_samples(CORPUS, tokenizer, 3, 32, seed=0, data="packed", order="file")
    stream = []
    for row in read_documents(CORPUS)[0]:
        stream += tokenizer(row)["input_ids"] + [tokenizer.eos_token_id]
    assert [s.tolist() for s in samples.samples] == [stream[i * 32:(i + 1) * 32] for i in range(3)]
    assert samples.stacked().shape == (3, 32)


def test_gptq_windows_start_where_pythons_random_seeded_by_the_seed_says(tokenizer):
    rows, _ = read_documents(CORPUS)
    stream = tokenizer("\n\n".join(rows), return_tensors="pt")["input_ids"][0]
    draw = random.Random(7)
    starts = [draw.randint(0, stream.numel() - 16 - 1) for _ in range(4)]
    windows = random_windows(CORPUS, tokenizer, 4, 16, seed=7)
    assert torch.equal(windows.stacked(), torch.stack([stream[i:i + 16] for i in starts]))


def test_hub_source_names_data_files_split_and_field():
    source = HubSource.parse("monology/pile-uncopyrighted?data_files=val.jsonl.zst")
    assert (source.name, source.config, source.data_files, source.split, source.field) == (
        "monology/pile-uncopyrighted", None, "val.jsonl.zst", "train", "text")
    assert HubSource.parse("wikitext:wikitext-2-raw-v1").config == "wikitext-2-raw-v1"
    with pytest.raises(ConfigError, match=r"unknown keys \['file'\]"):
        HubSource.parse("org/name?file=x")


def test_hub_rows_stream_in_stored_order_with_quambas_arguments(monkeypatch, tokenizer):
    calls = []

    def load_dataset(name, config, split, streaming, **kwargs):
        calls.append((name, config, split, streaming, kwargs))
        return iter({"text": f"row {i} " * 40} for i in range(100))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    samples = calibration_samples("monology/pile-uncopyrighted?data_files=val.jsonl.zst", tokenizer, 3, 8, seed=0)
    assert calls == [("monology/pile-uncopyrighted", None, "train", True, {"data_files": "val.jsonl.zst"})]
    assert [s.tolist() for s in samples.samples] == [tokenizer(f"row {i} " * 40)["input_ids"][:8] for i in range(3)]


def test_gptq_windows_come_from_the_whole_hub_split_as_quambas_loader_joins_it(monkeypatch, tokenizer):
    """T depends on every row of the split: wikitext-2's train split is about 10.9 M characters,
    and a cut after the first few million (as this project once made) moved every window."""
    rows = [f"row {i} " * 250 for i in range(2_500)]  # 5 M characters
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda name, config, split, streaming, **kwargs: iter({"text": row} for row in rows)))
    windows = random_windows("wikitext:wikitext-2-raw-v1", tokenizer, 4, 16, seed=0)
    stream = tokenizer("\n\n".join(rows), return_tensors="pt")["input_ids"][0]
    draw = random.Random(0)
    starts = [draw.randint(0, stream.numel() - 16 - 1) for _ in range(4)]
    assert torch.equal(windows.stacked(), torch.stack([stream[i:i + 16] for i in starts]))


def test_a_data_file_of_another_format_is_refused_naming_it(tmp_path, tokenizer):
    """A .json array, a binary .txt or a .jsonl whose text is no string never becomes a corpus."""
    from quamba.data import check_data_source, local_row_count

    (tmp_path / "arr.json").write_text('["a", "b"]')
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00 binary")
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(ConfigError, match=r"arr.json: a data file must be .txt .* or .jsonl"):
        check_data_source(str(tmp_path / "arr.json"))
    with pytest.raises(ConfigError, match=r"arr.json: a data file must be .txt"):
        calibration_samples(tmp_path / "arr.json", tokenizer, 1, 8, 0, "rows", "file")
    with pytest.raises(ConfigError, match="bin.txt: not UTF-8 text"):
        local_row_count(tmp_path / "bin.txt")
    with pytest.raises(ConfigError, match="num.jsonl:1: its 'text' field is int, not text"):
        random_windows(tmp_path / "num.jsonl", tokenizer, 1, 8, 0)
