"""Where the files quamba ships live: the config and file-format schemas, and resources/ (the
demo models, the tokenizer, the corpus and the offline lm-eval tasks). They are package data
(importlib.resources), so a wheel install finds them as an editable one does; the checkout's
top-level schemas/ and resources/ are links to them."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

ROOT = Path(str(files("quamba"))).resolve()  # shipped files are shown relative to this, e.g. resources/corpus/test.txt
SCHEMAS = ROOT / "schemas"
RESOURCES = ROOT / "resources"
DEFAULT_CORPUS = RESOURCES / "corpus" / "train.txt"  # calibration and GPTQ text unless told otherwise
HELD_OUT_TEXT = RESOURCES / "corpus" / "test.txt"  # the perplexity task's text
DEFAULT_TOKENIZER = RESOURCES / "tokenizer"
TASKS_DIR = RESOURCES / "tasks"


def shown(path: str | Path) -> str:
    """A shipped file by its path relative to ROOT, so records do not depend on where quamba is
    installed; any other path as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)
