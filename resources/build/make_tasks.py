"""Build the offline lm-eval task data from the held-out corpus split.

Why: the quantized models must be scored on tasks that run without network
access and whose text no model saw in training, so both tasks are cut from
``resources/corpus/test.txt`` only.

* ``quamba_cloze`` (LAMBADA-style): a passage of whole sentences from one
  document, 60-150 words, whose last word must be predicted.
* ``quamba_mc``: the opening of a paragraph and four candidate next sentences,
  the true one and three from other documents of similar length.

Items are chosen with a seeded ``random.Random``, so a rebuild from the same
corpus gives byte-identical JSONL files in ``resources/tasks/data/``.

    python resources/build/make_tasks.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# A sentence ends at . ! or ? (maybe inside a closing quote) followed by a
# space and a capital letter, unless the period closes an abbreviation.
SENTENCE_END = re.compile(r"[.!?][\"')”’]*\s+(?=[A-Z\"“(])")
ABBREVIATION = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|cf|al|approx|Mr|Mrs|Dr|No)|\b[A-Za-z])\.$")
FINAL_WORD = re.compile(r" ([A-Za-z][a-z]{2,})[.!?]$")
# Function words and other near-free guesses make a cloze item trivial.
TRIVIAL_WORDS = set(
    """the and for are but not you all any can had her was one our out his has how
    its may who did get him she too use way yes also been from have into just more
    most much must only other over same some such than that them then there these
    they this those very what when where which while will with would your could
    should being each both does done here made make many none once upon well were""".split()
)


def read_documents(path: Path) -> list[list[str]]:
    """Documents of a corpus file, each a list of paragraphs."""
    text = path.read_text(encoding="utf-8")
    return [block.splitlines() for block in text.strip("\n").split("\n\n")]


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a whitespace-normalised paragraph."""
    sentences, start = [], 0
    for match in SENTENCE_END.finditer(paragraph):
        if ABBREVIATION.search(paragraph[start : match.start() + 1]):
            continue
        sentences.append(paragraph[start : match.end()].strip())
        start = match.end()
    if paragraph[start:].strip():
        sentences.append(paragraph[start:].strip())
    return sentences


def cloze_items(documents: list[list[str]], count: int, min_words: int, max_words: int,
                rng: random.Random) -> list[dict]:
    """LAMBADA-style items: context ends right before " word", target is " word"."""
    candidates = []
    for paragraphs in documents:
        sentences = [s for paragraph in paragraphs for s in split_sentences(paragraph)]
        for end, sentence in enumerate(sentences):
            match = FINAL_WORD.search(sentence)
            if not match or match.group(1).lower() in TRIVIAL_WORDS:
                continue
            start, words = end, len(sentence.split())
            while words < min_words and start > 0:  # grow backwards by whole sentences
                start -= 1
                words += len(sentences[start].split())
            if min_words <= words <= max_words:
                passage = " ".join(sentences[start : end + 1])
                # match.group(0) is " word." - the context is everything before it.
                candidates.append((passage[: -len(match.group(0))], match.group(1)))
    chosen = sorted(rng.sample(range(len(candidates)), min(count, len(candidates))))
    items = []
    for number, index in enumerate(chosen):
        context, word = candidates[index]
        items.append({"id": f"quamba_cloze-{number:04d}", "text": f"{context} {word}",
                      "context": context, "target": " " + word})
    return items


def mc_items(documents: list[list[str]], count: int, rng: random.Random) -> list[dict]:
    """Next-sentence items: the paragraph so far, the true next sentence and 3 distractors."""
    def complete(sentence: str) -> bool:
        return len(sentence.split()) >= 4 and sentence.rstrip("\"')”’").endswith((".", "!", "?"))

    pool = []  # (document index, sentence) for distractors
    candidates = []
    for doc_index, paragraphs in enumerate(documents):
        for paragraph in paragraphs:
            sentences = split_sentences(paragraph)
            pool.extend((doc_index, s) for s in sentences if complete(s))
            for position in range(1, len(sentences)):
                if complete(sentences[position]):
                    candidates.append((doc_index, " ".join(sentences[:position]), sentences[position]))
    chosen = sorted(rng.sample(range(len(candidates)), min(count, len(candidates))))
    items = []
    for number, index in enumerate(chosen):
        doc_index, context, gold = candidates[index]
        length = len(gold.split())
        # Same length band and same capitalisation, so neither gives the answer away.
        similar = sorted({s for d, s in pool if d != doc_index and s != gold
                          and s[0].isupper() == gold[0].isupper()
                          and length / 2 <= len(s.split()) <= length * 2})
        assert len(similar) >= 3, f"too few distractors for {gold!r}"
        choices = rng.sample(similar, 3)
        label = rng.randrange(4)
        choices.insert(label, gold)
        items.append({"id": f"quamba_mc-{number:04d}", "context": context,
                      "choices": choices, "label": label})
    return items


def write_jsonl(path: Path, items: list[dict]) -> None:
    """Write one JSON object per line, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=REPO / "resources" / "corpus" / "test.txt")
    parser.add_argument("--out", type=Path, default=REPO / "resources" / "tasks" / "data")
    parser.add_argument("--cloze-items", type=int, default=500)
    parser.add_argument("--mc-items", type=int, default=500)
    parser.add_argument("--min-words", type=int, default=60, help="shortest cloze passage")
    parser.add_argument("--max-words", type=int, default=150, help="longest cloze passage")
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args()

    documents = read_documents(args.corpus)
    cloze = cloze_items(documents, args.cloze_items, args.min_words, args.max_words,
                        random.Random(args.seed))
    mc = mc_items(documents, args.mc_items, random.Random(args.seed + 1))
    for name, items, wanted in (("quamba_cloze", cloze, args.cloze_items), ("quamba_mc", mc, args.mc_items)):
        write_jsonl(args.out / f"{name}.jsonl", items)
        note = "" if len(items) == wanted else f" (only {len(items)} candidates in the corpus)"
        print(f"{name}: {len(items)} items{note}")


if __name__ == "__main__":
    main()
