"""Load the offline task data relative to this file, whatever the working directory.

lm-eval resolves ``dataset_kwargs.data_files`` of ``dataset_path: json``
against the current directory, so the task YAMLs point ``custom_dataset`` here
instead; lm-eval calls it with the task's ``metadata`` and ``dataset_kwargs``
as keyword arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(data_file: str, split: str = "test", **_metadata) -> datasets.DatasetDict:
    """A DatasetDict with one split read from ``data_file`` (relative to this directory)."""
    path = HERE / data_file
    if not path.is_file():
        raise FileNotFoundError(f"task data {path} is missing; rebuild it with resources/build/make_tasks.py")
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
