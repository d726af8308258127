"""The `quamba` command line: every stage of the study, usable without Snakemake."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quamba.errors import QuambaError


def _normalize(args: argparse.Namespace) -> None:
    from quamba.models.checkpoint import normalize

    out = normalize(args.source, args.tokenizer or args.source, args.out)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quamba", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    normalize = commands.add_parser(
        "normalize", help="write a normalized FP16 checkpoint (safetensors, config, tokenizer, source.json)")
    normalize.add_argument("source", help="local model dir (state-spaces or transformers format) or hub id")
    normalize.add_argument("--tokenizer", help="tokenizer dir or hub id (default: the source)")
    normalize.add_argument("--out", type=Path, required=True, help="output directory")
    normalize.set_defaults(run=_normalize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except QuambaError as err:
        print(f"quamba {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
