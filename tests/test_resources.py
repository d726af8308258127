"""The shipped text assets: corpus splits, tokenizer and offline lm-eval tasks."""

from __future__ import annotations

import collections
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESOURCES = REPO / "resources"
SPLITS = ("train", "valid", "test")
# Item counts and sizes of the shipped task data; resources/README.md states the same.
EXPECTED_ITEMS = {"quamba_cloze": 500, "quamba_mc": 500}
EXPECTED_BYTES = {"quamba_cloze": 451_518, "quamba_mc": 174_120}


def read_documents(split: str) -> list[str]:
    text = (RESOURCES / "corpus" / f"{split}.txt").read_text(encoding="utf-8")
    return text.strip("\n").split("\n\n")


def read_jsonl(name: str) -> list[dict]:
    with (RESOURCES / "tasks" / "data" / f"{name}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(RESOURCES / "tokenizer"))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict:
    """Both tasks loaded by lm-eval's TaskManager while the cwd is an unrelated directory."""
    from lm_eval.tasks import TaskManager, get_task_dict

    def leaves(task_dict: dict) -> dict:
        found = {}
        for key, value in task_dict.items():
            found.update(leaves(value) if isinstance(value, dict) else {getattr(key, "group_name", key): value})
        return found

    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    try:
        manager = TaskManager(include_path=str(RESOURCES / "tasks"))
        return leaves(get_task_dict(["quamba_offline"], manager))
    finally:
        os.chdir(previous)


def test_tokenizer_loads_with_endoftext_as_every_special_token(tokenizer):
    assert len(tokenizer) == 4096
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(tokenizer, name) == "<|endoftext|>", name


@pytest.mark.parametrize("text", [
    "Return the number of items in a container.",
    " starts with a space, ends with two  ",
    "tabs\tand\nnewlines\n\nand a , spaced . comma",
    "Unicode: “quotes”, café, 日本語, 🙂",
])
def test_tokenizer_round_trips_text_without_added_tokens(tokenizer, text):
    ids = tokenizer.encode(text)
    assert 0 not in ids  # no BOS/EOS added on encode
    assert tokenizer.decode(ids) == text


def test_tokenizer_round_trips_the_validation_split(tokenizer):
    text = (RESOURCES / "corpus" / "valid.txt").read_text(encoding="utf-8")
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_corpus_splits_are_nonempty_and_train_is_largest():
    sizes = {split: len(read_documents(split)) for split in SPLITS}
    assert all(count > 0 for count in sizes.values()), sizes
    assert sizes["train"] > sizes["valid"] + sizes["test"], sizes


def test_corpus_splits_share_no_document_or_paragraph():
    documents = {split: set(read_documents(split)) for split in SPLITS}
    paragraphs = {split: {p for doc in docs for p in doc.splitlines()} for split, docs in documents.items()}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not documents[a] & documents[b], (a, b)
        assert not paragraphs[a] & paragraphs[b], (a, b)


def test_corpus_lines_are_normalised_paragraphs():
    for split in SPLITS:
        for doc in read_documents(split):
            for line in doc.splitlines():
                assert line and line == " ".join(line.split()), (split, line[:80])


def test_corpus_fits_the_shipping_budget():
    total = sum((RESOURCES / "corpus" / f"{split}.txt").stat().st_size for split in SPLITS)
    assert total < 7_000_000


def test_tasks_load_from_another_cwd_with_expected_item_counts(tasks):
    assert set(tasks) == set(EXPECTED_ITEMS)
    for name, task in tasks.items():
        assert len(list(task.test_docs())) == EXPECTED_ITEMS[name] == len(read_jsonl(name)), name


def test_task_data_has_the_documented_size():
    for name, size in EXPECTED_BYTES.items():
        assert (RESOURCES / "tasks" / "data" / f"{name}.jsonl").stat().st_size == size, name


def test_task_data_rebuilds_byte_identical(tmp_path):
    subprocess.run([sys.executable, str(RESOURCES / "build" / "make_tasks.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in EXPECTED_ITEMS:
        shipped = (RESOURCES / "tasks" / "data" / f"{name}.jsonl").read_bytes()
        assert (tmp_path / f"{name}.jsonl").read_bytes() == shipped, name


def test_cloze_targets_are_one_word_right_after_the_context(tasks):
    task = tasks["quamba_cloze"]
    for doc in task.test_docs():
        context, target = task.doc_to_text(doc), task.doc_to_target(doc)
        assert re.fullmatch(r" [A-Za-z]{3,}", target), target
        assert context and not context[-1].isspace()
        assert context + target == doc["text"]
        assert 60 <= len(doc["text"].split()) <= 150


def test_cloze_requests_are_context_and_target(tasks):
    task = tasks["quamba_cloze"]
    task.build_all_requests(limit=5, rank=0, world_size=1)
    docs = list(task.test_docs())[:5]
    assert [inst.args for inst in task.instances] == [(d["context"], d["target"]) for d in docs]


def test_mc_items_have_four_distinct_choices_and_gold_in_range(tasks):
    task = tasks["quamba_mc"]
    for doc in task.test_docs():
        choices, gold = task.doc_to_choice(doc), task.doc_to_target(doc)
        assert len(choices) == 4 and len(set(choices)) == 4, choices
        assert isinstance(gold, int) and 0 <= gold < 4
        assert task.doc_to_text(doc) and all(c and not c[0].isspace() for c in choices)


def test_mc_choices_share_token_count_case_and_final_character(tokenizer):
    for doc in read_jsonl("quamba_mc"):
        choices = doc["choices"]
        assert len({len(tokenizer.encode(" " + c)) for c in choices}) == 1, choices
        assert len({c[0].islower() for c in choices}) == 1 and len({c[-1] for c in choices}) == 1, choices


def test_mc_context_free_baselines_stay_at_chance(tokenizer):
    """Neither a unigram model of the training split nor the choices' lengths find the true ending:
    what is left for a model is how each ending continues its context."""
    counts = collections.Counter(tokenizer.encode((RESOURCES / "corpus" / "train.txt").read_text(encoding="utf-8")))
    total = sum(counts.values()) + len(tokenizer)

    def unigram(choice: str) -> float:
        return sum(math.log((counts[t] + 1) / total) for t in tokenizer.encode(" " + choice))

    def hit_rate(score) -> float:
        """Accuracy of picking the top score, a tie shared among the tied choices."""
        rate = 0.0
        for doc in docs:
            scores = [score(c) for c in doc["choices"]]
            best = [i for i, s in enumerate(scores) if s == max(scores)]
            rate += (doc["label"] in best) / len(best)
        return rate / len(docs)

    docs = read_jsonl("quamba_mc")
    for name, score in {"unigram": unigram, "unigram per character": lambda c: unigram(c) / len(c),
                        "longest": len, "shortest": lambda c: -len(c)}.items():
        assert hit_rate(score) < 0.29, name  # chance: 0.25; 500 items give a standard error of 0.019


def test_task_text_comes_from_the_test_split_only():
    flat = {split: " ".join(" ".join(read_documents(split)).split()) for split in SPLITS}
    for doc in read_jsonl("quamba_cloze"):
        assert doc["text"] in flat["test"] and doc["text"] not in flat["train"]
    for doc in read_jsonl("quamba_mc"):
        gold = doc["choices"][doc["label"]]
        assert f"{doc['context']} {gold}" in flat["test"]
        assert all(choice in flat["test"] for choice in doc["choices"])
