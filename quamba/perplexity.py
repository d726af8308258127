"""The `perplexity` task: held-out perplexity of a text file as a regular lm-eval task.

lm-eval scores each document with `loglikelihood_rolling` (the adapter's rolling windows of
max_length tokens: every token predicted exactly once, a document's first from the prefix token)
and aggregates with its own metrics: word_perplexity and byte_perplexity (weighted_perplexity),
bits_per_byte. `perplexity` is per token: the same weighted_perplexity, weighted by each
document's token count, which the dataset carries (counted with the model's tokenizer when the
task is built). So per-sample logging, limits and every lm-eval feature apply to it as to any task.

The dataset is the file's documents (.txt: separated by blank lines; .jsonl: a `text` field per
line), each stripped; `max_tokens` keeps the first tokens only: the document that crosses the
budget is cut at a token and its trailing whitespace dropped, later ones are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets

from quamba.data import read_documents
from quamba.errors import ConfigError
from quamba.shipped import HELD_OUT_TEXT, shown

if TYPE_CHECKING:
    from quamba.lm_eval_model import QuambaLM

TASK = "perplexity"
VERSION = 2  # 2: an lm-eval task (1 was scored by code of our own, to the same numbers)
METRICS = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def task_name(data: str | Path | None) -> str:
    """The user-facing name: `perplexity` for the shipped held-out text, else `perplexity:FILE`."""
    return TASK if data is None else f"{TASK}:{data}"


def documents(lm: QuambaLM, data: str | Path, max_tokens: int | None) -> tuple[list[dict[str, Any]], str]:
    """The task's rows ({"text", "tokens"}) and the file's content hash."""
    if not Path(data).is_file():
        raise ConfigError(f"perplexity: {data} is not a file; expected a .txt or .jsonl file")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"perplexity: max_tokens={max_tokens} is not allowed; expected an integer >= 1 or None")
    texts, digest = read_documents(data)
    rows, budget = [], max_tokens
    for text in (text.strip() for text in texts):  # the blank lines between documents are the file's format
        ids = lm.tok_encode(text)
        if budget is not None and len(ids) >= budget:
            text = lm.tok_decode(ids[:budget]).rstrip()
            rows.append({"text": text, "tokens": len(lm.tok_encode(text))})
            break
        rows.append({"text": text, "tokens": len(ids)})
        budget = None if budget is None else budget - len(ids)
    return rows, digest


class Rows:
    """lm-eval's custom_dataset hook: called (with the task's metadata, unused), the rows as a test
    split. Its repr is what lm-eval writes into the results' task config: stable, and short."""

    def __init__(self, rows: list[dict[str, Any]], digest: str) -> None:
        self.rows, self.digest = rows, digest

    def __call__(self, **_metadata) -> datasets.DatasetDict:
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(self.rows)})

    def __repr__(self) -> str:
        return f"quamba.perplexity.Rows({len(self.rows)} documents of sha256 {self.digest[:16]})"


def process_results(doc: dict[str, Any], results: list[float]) -> dict[str, tuple[float, int]]:
    """lm-eval's own rolling-loglikelihood scores (words and bytes counted as lm-eval counts
    them), plus the per-token one from the document's token count."""
    from lm_eval.api.task import ConfigurableTask

    (loglikelihood,) = results
    words, size = ConfigurableTask.count_words(doc["text"]), ConfigurableTask.count_bytes(doc["text"])
    return {"perplexity": (loglikelihood, doc["tokens"]), "word_perplexity": (loglikelihood, words),
            "byte_perplexity": (loglikelihood, size), "bits_per_byte": (loglikelihood, size)}


def task_config(lm: QuambaLM, data: str | Path | None = None, max_tokens: int | None = None) -> dict[str, Any]:
    """The lm-eval task config (a dict, as lm-eval's `tasks=[...]` takes it) of perplexity on
    `data` (None: the shipped held-out text) for this model's tokenizer."""
    rows, digest = documents(lm, data or HELD_OUT_TEXT, max_tokens)
    aggregation = {"perplexity": "weighted_perplexity", "word_perplexity": "weighted_perplexity",
                   "byte_perplexity": "weighted_perplexity", "bits_per_byte": "bits_per_byte"}
    return {
        "task": task_name(data),
        "custom_dataset": Rows(rows, digest),
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "process_results": process_results,
        "metric_list": [{"metric": name, "aggregation": aggregation[name], "higher_is_better": False}
                        for name in METRICS],
        "metadata": {"version": VERSION, "data": shown(data or HELD_OUT_TEXT), "data_sha256": digest,
                     "max_tokens": max_tokens, "tokens": sum(row["tokens"] for row in rows)},
    }
