"""Build the offline lm-eval task data from the held-out corpus split.

Why: the quantized models must be scored on tasks that run without network
access and whose text no model saw in training, so both tasks are cut from
``resources/corpus/test.txt`` only.

* ``quamba_cloze`` (LAMBADA-style): a passage of whole sentences from one
  document, 60-150 words, whose last word must be predicted.
* ``quamba_mc``: a paragraph up to the middle of a sentence and four candidate
  endings, the true one and three endings of sentences from other documents with
  as many tokens.

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

from tokenizers import Tokenizer

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


def sentence_endings(documents: list[list[str]], min_words: int, max_words: int,
                     rng: random.Random) -> list[tuple[int, str, str]]:
    """(document index, context, ending) for every complete sentence of min-max words.

    The sentence is cut after 40-60% of its words (at least 2 words before the cut and 3
    after); the context is the paragraph up to the cut, the ending is the rest."""
    endings = []
    for doc_index, paragraphs in enumerate(documents):
        for paragraph in paragraphs:
            sentences = split_sentences(paragraph)
            for position, sentence in enumerate(sentences):
                words = sentence.split()
                if not (min_words <= len(words) <= max_words
                        and sentence.rstrip("\"')”’").endswith((".", "!", "?"))):
                    continue
                low = max(2, int(0.4 * len(words)))
                cut = rng.randint(low, max(low, min(int(0.6 * len(words)), len(words) - 3)))
                context = " ".join(sentences[:position] + words[:cut])
                endings.append((doc_index, context, " ".join(words[cut:])))
    return endings


def mc_items(documents: list[list[str]], count: int, tokenizer: Tokenizer, rng: random.Random,
             min_words: int = 6, max_words: int = 40) -> list[dict]:
    """Sentence-ending items: a paragraph up to the middle of a sentence, the true ending and
    three endings of sentences from other documents.

    Why this form: a model of ~1M parameters barely links one sentence to the next, so a
    choice among whole next sentences measures mostly which sentence is more probable on
    its own. Here every choice is the second half of a real sentence, so each is fluent text
    of the same kind; what tells the true one apart is how it continues the half sentence
    (grammar at the cut) and the paragraph (topic, repeated words). Distractors have exactly
    as many tokens as the true ending, the same first-letter case and the same final
    character, so neither length nor such a surface cue gives the answer away (a tolerance
    on the length would leave the true ending as the middle one, itself a cue)."""
    endings = sentence_endings(documents, min_words, max_words, rng)
    tokens = [len(tokenizer.encode(" " + ending).ids) for _, _, ending in endings]

    def distractors(index: int) -> list[str]:
        doc_index, _, gold = endings[index]
        similar = {ending for (d, _, ending), n in zip(endings, tokens)
                   if d != doc_index and ending != gold and n == tokens[index]
                   and ending[0].islower() == gold[0].islower() and ending[-1] == gold[-1]}
        return sorted(similar)

    usable = [i for i in range(len(endings)) if len(distractors(i)) >= 3]
    chosen = sorted(rng.sample(usable, min(count, len(usable))))
    items = []
    for number, index in enumerate(chosen):
        _, context, gold = endings[index]
        choices = rng.sample(distractors(index), 3)
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
    parser.add_argument("--tokenizer", type=Path, default=REPO / "resources" / "tokenizer" / "tokenizer.json",
                        help="counts tokens to match the lengths of quamba_mc's choices")
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
    mc = mc_items(documents, args.mc_items, Tokenizer.from_file(str(args.tokenizer)), random.Random(args.seed + 1))
    for name, items, wanted in (("quamba_cloze", cloze, args.cloze_items), ("quamba_mc", mc, args.mc_items)):
        write_jsonl(args.out / f"{name}.jsonl", items)
        note = "" if len(items) == wanted else f" (only {len(items)} candidates in the corpus)"
        print(f"{name}: {len(items)} items{note}")


if __name__ == "__main__":
    main()
