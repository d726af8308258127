"""Where the files quamba ships live: the config and file-format schemas, and resources/ (the
demo models, the tokenizer, the corpus and the offline lm-eval tasks)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "schemas"
RESOURCES = ROOT / "resources"
DEFAULT_CORPUS = RESOURCES / "corpus" / "train.txt"  # calibration and GPTQ text unless told otherwise
HELD_OUT_TEXT = RESOURCES / "corpus" / "test.txt"  # the perplexity task's text
DEFAULT_TOKENIZER = RESOURCES / "tokenizer"
TASKS_DIR = RESOURCES / "tasks"


def shown(path: str | Path) -> str:
    """A shipped file by its root-relative path, so records do not depend on the clone's location;
    any other path as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)
