"""The `quamba` command line: every stage of the study, usable without Snakemake.

Defaults come from the settings dataclasses (CalibrationSettings, GPTQSettings, Recipe), so the
command line and the library never disagree; `--help` shows them.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from quamba.errors import ConfigError, QuambaError


def _normalize(args: argparse.Namespace) -> None:
    from quamba.models.checkpoint import normalize

    out = normalize(args.source, args.tokenizer or args.source, args.out)
    print(f"wrote {out}")


def _random_checkpoint(args: argparse.Namespace) -> None:
    from quamba.models.random_checkpoint import write_random_checkpoint

    out = write_random_checkpoint(args.arch, args.out, seed=args.seed, n_layer=args.layers, tokenizer=args.tokenizer)
    print(f"wrote {out}")


def _recipe(args: argparse.Namespace):
    """The Recipe of the options given; each one not given is Quamba's."""
    from quamba.recipe import OPTIONS, Recipe

    given = {key: getattr(args, f"recipe_{key}", None) for key in OPTIONS}
    return Recipe(**{key: value for key, value in given.items() if value is not None})


def _calibrate(args: argparse.Namespace) -> None:
    from quamba.stages.calibrate import CalibrationSettings, calibrate_model_dir

    settings = CalibrationSettings(
        num_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
        min_alpha=args.min_alpha, activation_layers=None if args.activation_layers is None else tuple(args.activation_layers),
        activation_samples=args.activation_samples, save_activations=args.save_activations)
    calibrate_model_dir(args.model_dir, args.out, settings, _recipe(args), data=args.data, device=args.device)
    print(f"wrote {args.out}: stats.json, calibration.safetensors" + (", activations.npz" if args.save_activations else ""))


def _scales(args: argparse.Namespace) -> None:
    from quamba.stages.scales import scales_file

    doc = scales_file(args.calib_dir, args.alpha, args.out, alpha_one=args.recipe_alpha_one or "quamba")
    print(f"wrote {args.out} ({len(doc['taps'])} taps at alpha {doc['alpha']})")


def _compare(args: argparse.Namespace) -> None:
    from quamba.report.compare import render

    if args.effect is not None and not (math.isfinite(args.effect) and args.effect > 0):
        raise ConfigError(f"compare: --effect {args.effect} is not allowed; expected a positive number (points of "
                          f"accuracy, or percent of perplexity)")
    print(render(args.results, args.task, args.metric, args.schemes.split(",") if args.schemes else None,
                 args.effect))


def _merge(base: dict, update: dict) -> dict:
    """update layered on base, key by key into nested mappings (Snakemake's --configfile order)."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _check_study(args: argparse.Namespace) -> None:
    from quamba.formats.study import read_study_file
    from quamba.study import check_study

    config: dict = {}
    for path in args.files:
        config = _merge(config, read_study_file(path))
    check_study(config)
    print(f"ok: {len(config['models'])} models, {len(config['calibrations'])} calibrations, schemes "
          f"{config['quantization']['schemes']}, alphas {config['quantization']['alphas']}, seeds "
          f"{config['quantization']['seeds']}, tasks {config['tasks']}")


def _view(args: argparse.Namespace) -> None:
    from quamba.report.view import render

    print(render(args.calib, args.alphas, args.recipe_alpha_one or "quamba", args.filter, args.compare))


def _gptq(args: argparse.Namespace) -> None:
    from quamba.stages.gptq import GPTQSettings, gptq_model_dir

    settings = GPTQSettings(w_bits=args.w_bits, group_size=args.group_size, percdamp=args.percdamp,
                            nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, act_order=args.act_order)
    result = gptq_model_dir(args.fp16_dir, args.out, settings, _recipe(args), data=args.data, device=args.device,
                            calib_dir=args.calib, dtype=args.dtype)
    print(f"wrote {args.out} in {sum(result['seconds'].values()):.1f} s of GPTQ")


def _quantize(args: argparse.Namespace) -> None:
    import tempfile

    from quamba.stages.assemble import quantize_model_dir
    from quamba.stages.scales import scales_file

    if args.scales is not None and args.alpha is not None:  # the file's own alpha would win, silently
        raise QuambaError("quantize: give --scales FILE (its alpha is the file's) or --alpha A (derived from "
                          "--calib), not both")
    with tempfile.TemporaryDirectory() as tmp:
        scales = args.scales
        if scales is None and args.alpha is not None:  # derive this alpha's scales on the way
            if args.calib is None:
                raise QuambaError("quantize: --alpha needs --calib CALIB_DIR to derive the scales from")
            scales = Path(tmp) / "scales.json"
            scales_file(args.calib, args.alpha, scales, alpha_one=args.recipe_alpha_one or "quamba")
        quantize_model_dir(args.fp16_dir, args.out, args.gptq, args.scheme, _recipe(args), args.calib, scales)
    print(f"wrote {args.out}")


def _eval(args: argparse.Namespace) -> None:
    from quamba.stages.evaluate import evaluate, summary

    doc = evaluate(args.model_dir, [t for t in args.tasks.split(",") if t], args.out, batch_size=args.batch_size,
                   limit=args.limit, device=args.device, dtype=args.dtype, num_fewshot=args.num_fewshot,
                   seed=args.seed, perplexity_tokens=args.perplexity_tokens, softmax_dtype=args.softmax_dtype)
    print("\n".join(summary(doc)))
    print(f"wrote {args.out}")


def add_recipe_options(parser: argparse.ArgumentParser, stage: str) -> None:
    """One flag per recipe option the stage reads; not given means Quamba's value."""
    from quamba.recipe import OPTIONS

    group = parser.add_argument_group("recipe options (each departs from Quamba's code; default: Quamba's value)")
    for key, option in OPTIONS.items():
        if stage not in option.stages:
            continue
        flag, dest = "--" + key.replace("_", "-"), f"recipe_{key}"
        help_text = f"{option.option_does} (Quamba: {option.quamba!r})"
        if option.allowed == (True, False) or option.allowed == (False, True):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif option.allowed is None:
            group.add_argument(flag, dest=dest, type=int, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=dest, choices=option.allowed, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    from quamba.recipe import OPTIONS
    from quamba.stages.calibrate import CalibrationSettings
    from quamba.stages.gptq import GPTQSettings

    calib_defaults, gptq_defaults = CalibrationSettings(), GPTQSettings()
    parser = argparse.ArgumentParser(prog="quamba", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    command = lambda name, **kw: commands.add_parser(  # noqa: E731
        name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)

    normalize = command("normalize", help="write a normalized FP16 checkpoint (safetensors, config, tokenizer, source.json)")
    normalize.add_argument("source", help="local model dir (state-spaces or transformers format) or hub id")
    normalize.add_argument("--tokenizer", help="tokenizer dir or hub id (default: the source)")
    normalize.add_argument("--out", type=Path, required=True, help="output directory")
    normalize.set_defaults(run=_normalize)

    random = command("random-checkpoint", help="a random-weight checkpoint of a published architecture "
                                                "(offline real-size studies and benchmarks)")
    random.add_argument("arch", help="mamba-130m, mamba-370m, mamba-790m, mamba-1.4b, mamba-2.8b, mamba2-130m, "
                                     "mamba2-370m, mamba2-780m, mamba2-1.3b or mamba2-2.7b")
    random.add_argument("--seed", type=int, default=0, help="draws every tensor (same seed: same bytes)")
    random.add_argument("--layers", type=int, help="write only this many layers (default: the published depth)")
    random.add_argument("--tokenizer", help="tokenizer dir or hub id to ship with it (default: the shipped one)")
    random.add_argument("--out", type=Path, required=True, help="output directory")
    random.set_defaults(run=_random_checkpoint)

    calibrate = command("calibrate", help="one calibration pass: statistics that answer every alpha >= --min-alpha "
                                          "(stats.json, calibration.safetensors, activations.npz)")
    calibrate.add_argument("model_dir", help="FP model dir or hub id")
    calibrate.add_argument("--samples", type=int, default=calib_defaults.num_samples,
                           help="calibration samples (Quamba: 512; the default study uses 32)")
    calibrate.add_argument("--seq-len", type=int, default=calib_defaults.seq_len,
                           help="tokens per sample: rows are truncated to it, packed windows have it")
    calibrate.add_argument("--batch-size", type=int, default=calib_defaults.batch_size,
                           help="samples per forward; Quamba's percentile EMA runs per forward (it used 1); "
                                ">1 needs --calibration-data packed")
    calibrate.add_argument("--min-alpha", type=float, default=calib_defaults.min_alpha,
                           help="the lowest percentile alpha the stored tails can answer later")
    calibrate.add_argument("--seed", type=int, default=calib_defaults.seed,
                           help="seeds the activation sample (and the order with --calibration-order seeded)")
    calibrate.add_argument("--save-activations", action="store_true", help="also write activations.npz")
    calibrate.add_argument("--activation-layers", type=int, nargs="+", default=None,
                           help="layers sampled into activations.npz (default: the first min(3, n_layer))")
    calibrate.add_argument("--activation-samples", type=int, default=calib_defaults.activation_samples,
                           help="values sampled uniformly per tap from the whole stream")
    calibrate.add_argument("--data", help="text file (.txt, .jsonl) or hub dataset ID[:CONFIG][?data_files=...] "
                                          "(default: the shipped corpus)")
    calibrate.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    calibrate.add_argument("--out", type=Path, required=True, help="output directory")
    add_recipe_options(calibrate, "calibrate")
    calibrate.set_defaults(run=_calibrate)

    scales = command("scales", help="one alpha's thresholds per tap from a calibration dir (scales.json), in seconds")
    scales.add_argument("calib_dir", type=Path, help="a calibration dir (stats.json + calibration.safetensors)")
    scales.add_argument("--alpha", type=float, required=True, help="percentile alpha in [min_alpha, 1]")
    scales.add_argument("--out", type=Path, required=True, help="scales.json to write")
    add_recipe_options(scales, "scales")
    scales.set_defaults(run=_scales)

    view = command("view", help="a calibration dir as a table: per alpha the threshold, the stream percentile, "
                                "the share clipped")
    view.add_argument("calib", help="a calibration dir or its stats.json")
    view.add_argument("--alphas", type=float, nargs="+", help="alphas to show (default: 0.9995 1.0)")
    view.add_argument("--filter", help="only taps whose name contains this text")
    view.add_argument("--compare", help="a second calibration dir to set beside the first")
    add_recipe_options(view, "scales")
    view.set_defaults(run=_view)

    gptq = command("gptq", help="GPTQ weights of in_proj/out_proj (seeded sampling), shared by every alpha")
    gptq.add_argument("fp16_dir", help="FP16 model dir")
    gptq.add_argument("--w-bits", type=int, default=gptq_defaults.w_bits,
                      help="4 (group-wise int4) or 8 (per-tensor int8)")
    gptq.add_argument("--seed", type=int, default=gptq_defaults.seed, help="draws the GPTQ windows")
    gptq.add_argument("--nsamples", type=int, default=gptq_defaults.nsamples, help="windows (Quamba: 128)")
    gptq.add_argument("--seqlen", type=int, default=gptq_defaults.seqlen, help="tokens per window (Quamba: 1024)")
    gptq.add_argument("--group-size", type=int, default=gptq_defaults.group_size,
                      help="input columns per int4 scale (Quamba: 128)")
    gptq.add_argument("--percdamp", type=float, default=gptq_defaults.percdamp,
                      help="damping added to the Hessian diagonal, as a share of its mean")
    gptq.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal")
    gptq.add_argument("--calib", type=Path, help="calibration dir whose reorder plan to use (with --reorder)")
    gptq.add_argument("--data", help="text file or hub dataset id, e.g. wikitext:wikitext-2-raw-v1 "
                                     "(default: the shipped corpus)")
    gptq.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    gptq.add_argument("--dtype", help="the model's while GPTQ runs: float16 (Quamba's), float32 or bfloat16 "
                                      "(default: float16 on CUDA, float32 on CPU)")
    gptq.add_argument("--out", type=Path, required=True, help="output directory")
    add_recipe_options(gptq, "gptq")
    gptq.set_defaults(run=_gptq)

    quantize = command("quantize", help="assemble a quantized model dir from FP16 + GPTQ + one alpha's scales")
    quantize.add_argument("fp16_dir", type=Path, help="FP16 model dir")
    quantize.add_argument("--gptq", type=Path, required=True, help="GPTQ output dir of the same model")
    quantize.add_argument("--scheme", required=True, choices=["w8a8", "w4a8", "w4a16"], help="quantization scheme")
    quantize.add_argument("--calib", type=Path, help="calibration dir (needed by w8a8/w4a8 and by --reorder)")
    quantize.add_argument("--scales", type=Path, help="one alpha's scales.json (from `quamba scales`)")
    quantize.add_argument("--alpha", type=float, help="or: derive the scales at this alpha from --calib on the way")
    quantize.add_argument("--out", type=Path, required=True, help="output directory")
    add_recipe_options(quantize, "assemble")
    quantize.add_argument("--alpha-one", dest="recipe_alpha_one", choices=OPTIONS["alpha_one"].allowed, default=None,
                          help=f"with --alpha 1.0: {OPTIONS['alpha_one'].option_does}")
    quantize.set_defaults(run=_quantize)

    evaluate = command("eval", help="lm-eval tasks (and held-out perplexity) on any model dir")
    evaluate.add_argument("model_dir", help="FP16 or quantized model dir, or hub id")
    evaluate.add_argument("--tasks", required=True,
                          help="comma-separated lm-eval tasks, e.g. quamba_cloze,quamba_mc,lambada_openai,perplexity")
    evaluate.add_argument("--batch-size", type=int, default=8, help="requests per forward")
    evaluate.add_argument("--limit", type=int, help="at most this many items per task (default: all)")
    evaluate.add_argument("--perplexity-tokens", type=int, help="perplexity: score only the first this many tokens")
    evaluate.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per item")
    evaluate.add_argument("--seed", type=int, help="all four of lm-eval's seeds (default: lm-eval's own, random 0 "
                                                   "and numpy, torch, few-shot 1234, as Quamba's evaluation)")
    evaluate.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    evaluate.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float16 on CUDA, float32 on CPU)")
    evaluate.add_argument("--softmax-dtype", help="the log-softmax's and the loglikelihood sums' dtype (default: the "
                                                  "logits', as HFLM and so Quamba; float32 is finer on fp16)")
    evaluate.add_argument("--out", type=Path, required=True,
                          help="results JSON to write; the per-item results go beside it (NAME.samples.json.gz)")
    evaluate.set_defaults(run=_eval)

    compare = command("compare", help="model x scheme x alpha: a task's metric mean +- std over seeds, delta to "
                                      "FP16, SSM-input clipping")
    compare.add_argument("results", type=Path, nargs="?", default=Path("results"), help="a study's results/ dir")
    compare.add_argument("--task", help="task to compare (default: an accuracy task; perplexity only when there "
                                         "is no other)")
    compare.add_argument("--metric", help="metric of that task (default: acc, else perplexity, else the first)")
    compare.add_argument("--schemes", help="comma-separated schemes to show (default: all)")
    compare.add_argument("--effect", type=float, help="also say how many seeds would detect an effect this large "
                                                       "(points of accuracy, or percent of perplexity)")
    compare.set_defaults(run=_compare)

    check = command("check-study", help="run the study's door on study files without Snakemake: a YAML error "
                                        "with its file and line, every bad setting naming its key")
    check.add_argument("files", type=Path, nargs="+", help="study files, later ones updating earlier ones as "
                                                           "snakemake --configfile does")
    check.set_defaults(run=_check_study)
    return parser


def _version() -> str:
    from quamba import __version__

    return __version__


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
