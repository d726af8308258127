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


def _calibrate(args: argparse.Namespace) -> None:
    from quamba.stages.calibrate import CalibrationSettings, calibrate_model_dir

    settings = CalibrationSettings(
        num_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
        alphas=tuple(args.alphas), activation_layers=tuple(args.activation_layers),
        activation_samples=args.activation_samples, save_activations=args.save_activations,
        rotate_residual=args.rotate_residual, reorder=args.reorder, head_clusters=args.head_clusters,
        channel_clusters=args.channel_clusters)
    calibrate_model_dir(args.model_dir, args.out, settings, data=args.data, device=args.device)
    print(f"wrote {args.out / 'stats.json'}" + (" and activations.npz" if args.save_activations else ""))


def _compare(args: argparse.Namespace) -> None:
    from quamba.report.compare import render

    print(render(args.results, args.task, args.metric, args.schemes.split(",") if args.schemes else None))


def _view(args: argparse.Namespace) -> None:
    from quamba.report.view import render

    print(render(args.stats, args.filter, args.compare))


def _gptq(args: argparse.Namespace) -> None:
    from quamba.stages.gptq import GPTQSettings, gptq_model_dir

    settings = GPTQSettings(w_bits=args.w_bits, group_size=args.group_size, percdamp=args.percdamp,
                            nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, act_order=args.act_order,
                            rotate_residual=args.rotate_residual, reorder=args.reorder, lm_head=args.lm_head)
    result = gptq_model_dir(args.fp16_dir, args.out, settings, data=args.data, device=args.device, stats=args.stats)
    print(f"wrote {args.out} in {sum(result['seconds'].values()):.1f} s of GPTQ")


def _quantize(args: argparse.Namespace) -> None:
    from quamba.stages.assemble import quantize_model_dir

    quantize_model_dir(args.fp16_dir, args.out, args.gptq, args.scheme, args.alpha, args.stats,
                       reorder=args.reorder, rotate_residual=args.rotate_residual)
    print(f"wrote {args.out}")


def _eval(args: argparse.Namespace) -> None:
    from quamba.stages.evaluate import evaluate, summary

    doc = evaluate(args.model_dir, [t for t in args.tasks.split(",") if t], args.out, batch_size=args.batch_size,
                   limit=args.limit, device=args.device, dtype=args.dtype, num_fewshot=args.num_fewshot,
                   seed=args.seed, perplexity_tokens=args.perplexity_tokens)
    print("\n".join(summary(doc)))
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quamba", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    normalize = commands.add_parser(
        "normalize", help="write a normalized FP16 checkpoint (safetensors, config, tokenizer, source.json)")
    normalize.add_argument("source", help="local model dir (state-spaces or transformers format) or hub id")
    normalize.add_argument("--tokenizer", help="tokenizer dir or hub id (default: the source)")
    normalize.add_argument("--out", type=Path, required=True, help="output directory")
    normalize.set_defaults(run=_normalize)

    defaults = _calibration_defaults()
    calibrate = commands.add_parser(
        "calibrate", help="per-tap statistics for every percentile alpha from one pass (stats.json, activations.npz)")
    calibrate.add_argument("model_dir", help="FP model dir or hub id")
    calibrate.add_argument("--samples", type=int, default=defaults.num_samples, help="number of calibration windows")
    calibrate.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per window")
    calibrate.add_argument("--batch-size", type=int, default=defaults.batch_size,
                           help="windows per forward (Quamba's percentile EMA depends on it; Quamba used 1)")
    calibrate.add_argument("--alphas", type=float, nargs="+", default=list(defaults.alphas),
                           help="percentile alphas in (0, 1]; 1.0 means no clipping")
    calibrate.add_argument("--seed", type=int, default=defaults.seed, help="picks the windows and the activation sample")
    calibrate.add_argument("--save-activations", action="store_true", help="also write activations.npz")
    calibrate.add_argument("--activation-layers", type=int, nargs="+", default=list(defaults.activation_layers))
    calibrate.add_argument("--activation-samples", type=int, default=defaults.activation_samples,
                           help="values sampled uniformly per tap from the whole stream")
    calibrate.add_argument("--data", help="text file (.txt, .jsonl) or hub dataset id (default: the shipped corpus)")
    calibrate.add_argument("--rotate-residual", action="store_true",
                           help="Hadamard-rotate the residual stream first (must match across calibrate, gptq, quantize)")
    calibrate.add_argument("--reorder", action="store_true",
                           help="Mamba2: Quamba2's head/channel reordering, planned from a first pass over the data")
    calibrate.add_argument("--head-clusters", type=int, default=defaults.head_clusters,
                           help="reorder: head clusters per B/C group")
    calibrate.add_argument("--channel-clusters", type=int, default=defaults.channel_clusters,
                           help="reorder: channel clusters per head cluster")
    calibrate.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    calibrate.add_argument("--out", type=Path, required=True, help="output directory")
    calibrate.set_defaults(run=_calibrate)

    gptq = commands.add_parser("gptq", help="GPTQ weights of in_proj/out_proj (seeded sampling), shared by every alpha")
    gptq.add_argument("fp16_dir", help="FP16 model dir")
    gptq.add_argument("--w-bits", type=int, default=4, help="4 (group-wise int4) or 8 (per-tensor int8)")
    gptq.add_argument("--seed", type=int, default=0, help="draws the calibration windows")
    gptq.add_argument("--nsamples", type=int, default=128, help="windows (Quamba: 128)")
    gptq.add_argument("--seqlen", type=int, default=1024, help="tokens per window (Quamba: 1024)")
    gptq.add_argument("--group-size", type=int, default=128)
    gptq.add_argument("--percdamp", type=float, default=0.01)
    gptq.add_argument("--act-order", action="store_true")
    gptq.add_argument("--rotate-residual", action="store_true",
                      help="Hadamard-rotate the residual stream first (must match across calibrate, gptq, quantize)")
    gptq.add_argument("--reorder", action="store_true", help="Mamba2: GPTQ the model reordered by --stats' plan")
    gptq.add_argument("--stats", type=Path, help="stats.json calibrated with --reorder (needed by --reorder)")
    gptq.add_argument("--lm-head", action="store_true", help="also quantize lm_head (Quamba's last GPTQ step)")
    gptq.add_argument("--data", help="text file or hub dataset id, e.g. wikitext:wikitext-2-raw-v1 "
                                     "(default: the shipped corpus)")
    gptq.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    gptq.add_argument("--out", type=Path, required=True)
    gptq.set_defaults(run=_gptq)

    quantize = commands.add_parser("quantize", help="assemble a quantized model dir from FP16 + GPTQ + stats")
    quantize.add_argument("fp16_dir", type=Path, help="FP16 model dir")
    quantize.add_argument("--stats", type=Path, help="stats.json (needed by schemes with 8-bit activations)")
    quantize.add_argument("--gptq", type=Path, required=True, help="GPTQ output dir of the same model")
    quantize.add_argument("--scheme", required=True, help="w8a8, w4a8 or w4a16")
    quantize.add_argument("--alpha", type=float, default=0.9995, help="percentile alpha (must be in stats.json)")
    quantize.add_argument("--reorder", action="store_true",
                          help="Mamba2: stats and GPTQ were built with --reorder; x gets a scale per reorder cell")
    quantize.add_argument("--rotate-residual", action="store_true",
                          help="Hadamard-rotate the residual stream first (must match across calibrate, gptq, quantize)")
    quantize.add_argument("--out", type=Path, required=True)
    quantize.set_defaults(run=_quantize)

    evaluate = commands.add_parser("eval", help="lm-eval tasks (and held-out perplexity) on any model dir")
    evaluate.add_argument("model_dir", help="FP16 or quantized model dir, or hub id")
    evaluate.add_argument("--tasks", required=True,
                          help="comma-separated lm-eval tasks, e.g. quamba_cloze,quamba_mc,lambada_openai,perplexity")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--limit", type=int, help="at most this many items per task")
    evaluate.add_argument("--perplexity-tokens", type=int, help="perplexity: score only the first this many tokens")
    evaluate.add_argument("--num-fewshot", type=int, default=0)
    evaluate.add_argument("--seed", type=int, default=0, help="lm-eval's seeds (few-shot sampling)")
    evaluate.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    evaluate.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float16 on CUDA, float32 on CPU)")
    evaluate.add_argument("--out", type=Path, required=True, help="results JSON")
    evaluate.set_defaults(run=_eval)

    view = commands.add_parser("view", help="print a stats.json as a table, alphas side by side")
    view.add_argument("stats", help="stats.json")
    view.add_argument("--filter", help="only taps whose name contains this text")
    view.add_argument("--compare", help="a second stats.json to set beside the first")
    view.set_defaults(run=_view)

    compare = commands.add_parser(
        "compare", help="model x scheme x alpha: a task's metric mean +- std over seeds, delta to FP16, SSM-input clipping")
    compare.add_argument("results", type=Path, nargs="?", default=Path("results"), help="a study's results/ dir")
    compare.add_argument("--task", help="task to compare (default: the first in alphabetical order)")
    compare.add_argument("--metric", help="metric of that task (default: acc, else perplexity, else the first)")
    compare.add_argument("--schemes", help="comma-separated schemes to show (default: all)")
    compare.set_defaults(run=_compare)
    return parser


def _calibration_defaults():
    from quamba.stages.calibrate import CalibrationSettings

    return CalibrationSettings()


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
