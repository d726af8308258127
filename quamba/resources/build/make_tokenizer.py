"""Train the project's byte-level BPE tokenizer on the shipped training corpus.

Why our own: the demo models are tiny, so a 4096-entry vocabulary fitted to the
corpus keeps the embedding small, and a tokenizer built from shipped text can
be rebuilt offline. Byte-level BPE never needs an unknown token, and without a
prefix space or a post-processor, ``decode(encode(text)) == text``.

    python resources/build/make_tokenizer.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[2]
END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(corpus: Path, vocab_size: int, min_frequency: int) -> Tokenizer:
    """A byte-level BPE tokenizer with ``<|endoftext|>`` as id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],  # listed first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(corpus)], trainer)
    assert tokenizer.token_to_id(END_OF_TEXT) == 0
    assert tokenizer.get_vocab_size() == vocab_size, tokenizer.get_vocab_size()
    return tokenizer


def save_pretrained(tokenizer: Tokenizer, out: Path) -> None:
    """Write a transformers tokenizer directory, replacing ``out`` atomically."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        clean_up_tokenization_spaces=False,  # would rewrite " ," to "," on decode
        model_max_length=1_000_000,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    staging.chmod(0o755)
    wrapped.save_pretrained(str(staging))
    # transformers 5 names its own class here, which 4.x cannot resolve; both
    # versions load "PreTrainedTokenizerFast", and pyproject allows either.
    config_path = staging / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=REPO / "resources" / "corpus" / "train.txt")
    parser.add_argument("--out", type=Path, default=REPO / "resources" / "tokenizer")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--min-frequency", type=int, default=2)
    args = parser.parse_args()

    tokenizer = train_tokenizer(args.corpus, args.vocab_size, args.min_frequency)
    save_pretrained(tokenizer, args.out)
    for path in sorted(args.out.iterdir()):
        print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
