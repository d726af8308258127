"""Build the shippable English corpus from text that CPython itself ships.

Why this source: the project needs a small train/valid/test corpus it may
redistribute and rebuild offline. Every CPython install carries the language
reference (``pydoc_data.topics``) and the standard library's docstrings and
comments, all under the PSF license, so nothing has to be downloaded.

Output: ``train.txt``, ``valid.txt``, ``test.txt`` in ``--out``. One paragraph
per line; documents separated by one blank line. The split is by document
(sha256 of the document title mod 100), so no document - and, after global
paragraph de-duplication, no paragraph - is shared between splits. Running it
again with the same Python gives byte-identical files.

    python resources/build/make_corpus.py
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib
import inspect
import io
import os
import pkgutil
import platform
import pydoc_data.topics
import re
import sys
import tokenize
import warnings
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Modules that act on import (antigravity opens a browser, this prints) or are
# GUI, demo, test or installer code rather than library prose.
SKIPPED_PARTS = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",
    "lib2to3", "ensurepip", "venv", "pydoc_data", "__main__",
}
HEADING_UNDERLINE = re.compile(r"^([=\-*~^])\1+$")
BULLET = re.compile(r"^(\*|-|\d+\.)\s+")
# Characters that are everywhere in code but rare in prose. "_" is not one:
# prose about Python mentions identifiers such as sys.path_hooks freely.
CODE_CHARS = set("()[]{}=<>*#|\\/@$%^~`;")
WORDLIKE = re.compile(r"[A-Za-z]{2}")
CODELIKE = re.compile(r"[=\[\]{}<>]")


def is_prose(paragraph: str, min_words: int) -> bool:
    """True for a paragraph that reads as English, not code, tables or doctests."""
    words = paragraph.split()
    if len(words) < min_words or not paragraph[0].isalpha():
        return False
    if ">>>" in paragraph or "::=" in paragraph or "..." in paragraph:
        return False
    if sum(ch in CODE_CHARS for ch in paragraph) > 0.04 * len(paragraph):
        return False
    wordlike = sum(bool(WORDLIKE.search(w)) and not CODELIKE.search(w) for w in words)
    return wordlike >= 0.85 * len(words)


def prose_paragraphs(text: str, min_words: int) -> Iterator[str]:
    """Split text into paragraphs and yield the prose ones, whitespace-normalised.

    Blank lines end a paragraph, and so does a change of indentation, because
    an indented run after a line is a code block or an argument table; a
    bullet item (with its hanging indent) is a paragraph of its own.
    """
    for block in re.split(r"\n\s*\n", text):
        groups: list[list[str]] = []
        indent = -1
        for line in block.splitlines():
            stripped = line.strip()
            if not stripped:
                continue
            bullet = BULLET.match(stripped)
            line_indent = len(line) - len(line.lstrip())
            if not groups or bullet or line_indent != indent:
                groups.append([])
                indent = line_indent + (bullet.end() if bullet else 0)
            groups[-1].append(stripped[bullet.end():] if bullet else stripped)
        for group in groups:
            paragraph = " ".join(" ".join(group).split())
            if is_prose(paragraph, min_words):
                yield paragraph


def reference_documents() -> Iterator[tuple[str, str]]:
    """Yield (title, text) for each section of the language reference topics."""
    for _, text in sorted(pydoc_data.topics.topics.items()):
        lines = text.splitlines()
        title, body = "", []
        for i, line in enumerate(lines):
            underline = lines[i + 1] if i + 1 < len(lines) else ""
            if HEADING_UNDERLINE.match(underline) and len(underline) == len(line):
                if title:
                    yield f"reference/{title}", "\n".join(body)
                title, body = line.strip(), []
            elif not HEADING_UNDERLINE.match(line):
                body.append(line)
        if title:
            yield f"reference/{title}", "\n".join(body)


def _skipped(name: str) -> bool:
    """Private, skipped or test-suite modules (unittest and doctest themselves stay)."""
    def is_tests(part: str) -> bool:
        return part in ("test", "tests") or part.startswith("test_") or part.endswith("_test")

    parts = name.split(".")
    return any(p.startswith("_") or p in SKIPPED_PARTS or is_tests(p) for p in parts)


def stdlib_module_names() -> list[str]:
    """Importable public stdlib modules and their submodules, sorted."""
    names = set()
    for top in sorted(sys.stdlib_module_names):
        if _skipped(top) or _import(top) is None:
            continue
        names.add(top)
        module = sys.modules[top]
        if hasattr(module, "__path__"):
            for info in pkgutil.walk_packages(module.__path__, top + ".", onerror=lambda _: None):
                if not _skipped(info.name):
                    names.add(info.name)
    return sorted(names)


def _import(name: str):
    """Import quietly; None when the module does not import on this platform."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means "not on this build"
        return None


def source_texts(source: str) -> list[str]:
    """Docstrings and comment blocks of a Python source file, in source order."""
    found: list[tuple[int, str]] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and node.body:
                found.append((node.body[0].lineno, doc))
    # Consecutive whole-line comments form one block; a bare "#" ends a paragraph.
    block: list[str] = []
    start = last = -2
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT or tok.line.strip() != tok.string.strip():
            continue
        row = tok.start[0]
        if row != last + 1 and block:
            found.append((start, "\n".join(block)))
            block = []
        if not block:
            start = row
        block.append(tok.string.lstrip("#").strip())
        last = row
    if block:
        found.append((start, "\n".join(block)))
    return [text for _, text in sorted(found, key=lambda item: item[0])]


def object_docstrings(module) -> list[str]:
    """Docstrings of a compiled module's public classes, functions and methods."""
    docs = [module.__doc__ or ""]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isroutine(obj):
            docs.append(obj.__doc__ or "")
        elif inspect.isclass(obj):
            docs.append(obj.__doc__ or "")
            for attr_name, attr in sorted(vars(obj).items()):
                if attr_name.startswith("_"):
                    continue
                if inspect.isroutine(attr) or isinstance(attr, property) or inspect.isdatadescriptor(attr):
                    docs.append(getattr(attr, "__doc__", None) or "")
    return [inspect.cleandoc(d) for d in docs if isinstance(d, str) and d.strip()]


def module_documents() -> Iterator[tuple[str, str]]:
    """Yield (title, text) per stdlib module: its docstrings and comments."""
    for name in stdlib_module_names():
        module = _import(name)
        if module is None:
            continue
        path = getattr(module, "__file__", None)
        if path and path.endswith(".py"):
            texts = source_texts(Path(path).read_text(encoding="utf-8"))
        else:
            texts = object_docstrings(module)
        yield f"module/{name}", "\n\n".join(texts)


def split_of(title: str) -> str:
    """Stable split for a document title: ~90% train, ~5% valid, ~5% test."""
    bucket = int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "valid" if bucket < 95 else "test"


def build(min_words: int) -> dict[str, list[list[str]]]:
    """Collect documents, keep first occurrences of prose paragraphs, group by split."""
    merged: dict[str, list[str]] = {}
    for title, text in [*reference_documents(), *module_documents()]:
        merged.setdefault(title, []).append(text)
    seen: set[str] = set()
    splits: dict[str, list[list[str]]] = {"train": [], "valid": [], "test": []}
    for title in sorted(merged):
        paragraphs = []
        for text in merged[title]:
            for paragraph in prose_paragraphs(text, min_words):
                if paragraph not in seen:
                    seen.add(paragraph)
                    paragraphs.append(paragraph)
        if paragraphs:
            splits[split_of(title)].append(paragraphs)
    return splits


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "resources" / "corpus")
    parser.add_argument("--min-words", type=int, default=6, help="shortest paragraph kept")
    args = parser.parse_args()

    splits = build(args.min_words)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, documents in splits.items():
        text = "\n\n".join("\n".join(doc) for doc in documents) + "\n"
        write_atomic(args.out / f"{split}.txt", text)
        sizes[split] = (len(documents), len(text.encode("utf-8")))
        print(f"{split}: {len(documents)} documents, {sizes[split][1]:,} bytes")
    write_atomic(args.out / "SOURCE.md", source_note(sizes, args.min_words))


def source_note(sizes: dict[str, tuple[int, int]], min_words: int) -> str:
    """The provenance note shipped next to the corpus."""
    rows = "\n".join(f"| {split}.txt | {docs} | {size:,} |" for split, (docs, size) in sizes.items())
    return f"""# Corpus source

English prose that CPython ships with every install: the language reference
topics (`pydoc_data.topics`) and the docstrings and comments of the public,
importable standard library modules (test suites, private modules, IDLE, tkinter,
turtle and installer packages left out). Paragraphs are whitespace-normalised,
kept only when they read as prose (at least {min_words} words, no doctests or code),
and de-duplicated; one paragraph per line, documents separated by a blank line.
Documents go to train/valid/test by sha256 of their title mod 100 (90/5/5).

Produced by Python {platform.python_version()} ({platform.python_implementation()}, {sys.platform}) with
`python resources/build/make_corpus.py`; the same Python rebuilds it byte-identically.

| file | documents | bytes |
| --- | --- | --- |
{rows}

License: the text is part of CPython, distributed under the PSF License
Agreement version 2; its text ships with CPython as `LICENSE.txt` in the
standard library directory (`python -c "import os; print(os.path.dirname(os.__file__))"`).
"""

if __name__ == "__main__":
    main()
