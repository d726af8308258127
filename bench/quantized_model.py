"""Quantized models against their FP16 model, in one process: weight memory on the device,
prefill time (batch x seq tokens, one forward) and batch-1 decode tokens/s with the state cache
(Quamba's headline), each step a replayed CUDA graph (`quamba.models.decode`) and, beside it,
eager. Ratios are against the FP16 run of the same process.

    python -m bench.quantized_model --fp16 DIR --quantized W8A8_DIR W4A16_DIR --device cuda
    python -m bench.quantized_model ... --device cpu --prefill 2 64 --decode 8   # a smoke run
    python -m bench.quantized_model ... --compile    # also every model with compiled blocks
    python -m bench.quantized_model ... --fuse-hadamard    # also the rotated models with hadamard.FUSE_ON_CUDA
    python -m bench.quantized_model ... --int4-gemv    # also W4A16 with int4_matmul.GEMV_ON_CUDA (one-row GEMV)

With --compile each model also runs with `MambaLMHeadModel.compile_blocks()` (torch.compile per
block: taps, norms, Hadamard stages and glue fused); those rows' ratios are against the compiled
FP16 row, the others' against the eager FP16 row.

Build the dirs with bench/realsize_quantized.sh (random weights of the real architectures).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import quamba
from bench.profiling import profile
from quamba.formats.quantized_dir import QUANT_CONFIG
from quamba.models import decode as decoding
from quamba.models.decode import Decoder
from quamba.models.quantized import QuantLinear
from quamba.numerics import hadamard, int4_matmul, quantizers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds, plus QuantLinear's float copies."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    for layer in model.modules():
        if isinstance(layer, QuantLinear) and layer._reference is not None:
            total += layer._reference.numel() * layer._reference.element_size()
    return total


def best(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernels, allocator, any float copy a path makes
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def measure(model_dir: Path, device: torch.device, prefill: tuple[int, int], decode: int, repeats: int,
            fused: bool = True, profiled: bool = False, dtype: str | None = None,
            compile_blocks: bool = False, fused_hadamard: bool = False, int4_gemv: bool = False) -> dict:
    quantizers.FUSE_ON_CUDA = fused
    hadamard.FUSE_ON_CUDA = fused_hadamard
    int4_matmul.GEMV_ON_CUDA = int4_gemv
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
    model = quamba.load(model_dir, device=str(device), dtype=dtype)  # None: fp16 on CUDA, float32 on the CPU
    if compile_blocks:
        model.compile_blocks()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, prefill, generator=torch.Generator().manual_seed(0)).to(device)
    prefill_s = best(lambda: model(ids), device, repeats)

    def generate(decoder: Decoder) -> None:
        decoder.reset()
        logits = model(ids[:1, :16], cache=decoder.cache).logits
        for _ in range(decode):
            logits = decoder.step(logits[:, -1:].argmax(dim=-1))

    decode_s = {}
    for graphs in (True, False):  # a captured step per token (on CUDA), then eager launches
        decoding.GRAPHS_ON_CUDA = graphs
        decoder = Decoder(model, batch_size=1)
        decode_s[graphs] = best(lambda: generate(decoder), device, repeats)
    label = (f"{model_dir.name}{' (Hadamard fused)' if fused_hadamard else ''}{' (int4 GEMV)' if int4_gemv else ''}"
             f"{' (compiled blocks)' if compile_blocks else ''}")
    if profiled:  # where a step's device time goes: ten eager steps, then ten replays of the captured step
        for graphs in (False, True):
            decoding.GRAPHS_ON_CUDA = graphs
            decoder = Decoder(model, batch_size=1)
            model(ids[:1, :16], cache=decoder.cache)
            kind = "replayed graph" if graphs else "eager"
            profile(lambda: [decoder.step(ids[:1, :1]) for _ in range(10)], f"{label}: 10 {kind} decode steps")
        profile(lambda: model(ids), f"{label}: prefill {prefill[0]} x {prefill[1]}")
    decoding.GRAPHS_ON_CUDA = True
    held = weight_bytes(model)  # after the runs: includes any float copy a path made
    allocated = torch.cuda.memory_allocated() - before if device.type == "cuda" else None
    quant = json.loads((model_dir / QUANT_CONFIG).read_text()) if (model_dir / QUANT_CONFIG).is_file() else {}
    options = quant.get("recipe", {}).get("options", {})
    extras = [name for key, name in (("quantize_embedding", "quantized embedding"), ("quantize_lm_head", "quantized lm_head"))
              if options.get(key)]
    scheme = quant.get("scheme", "fp16") + ("" if not extras else f" + {', '.join(extras)}")
    scheme += "" if fused or not quant.get("a_bits") else " (quantizers unfused)"
    scheme += " (Hadamard fused)" if fused_hadamard else ""
    scheme += " (int4 GEMV)" if int4_gemv else ""
    scheme += " (compiled blocks)" if compile_blocks else ""
    return {"model": str(model_dir), "scheme": scheme, "compiled_blocks": compile_blocks,
            "dtype": str(model.dtype).removeprefix("torch."), "weight_bytes": held, "allocated_bytes": allocated, "prefill_s": prefill_s, "decode_tokens_per_s": decode / decode_s[True],
            "eager_decode_tokens_per_s": decode / decode_s[False]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp16", type=Path, required=True)
    parser.add_argument("--quantized", type=Path, nargs="+", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prefill", type=int, nargs=2, default=[16, 512], metavar=("BATCH", "SEQ"))
    parser.add_argument("--decode", type=int, default=64, help="tokens generated at batch 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--dtype", help="float16, float32, bfloat16 (default: float16 on CUDA, float32 on the CPU; "
                                        "float16 on the CPU gives the GPU's weight memory)")
    parser.add_argument("--compile", action="store_true", help="also each model with compiled blocks")
    parser.add_argument("--profile", action="store_true",
                        help="print (stderr) a torch profile of 10 decode steps (eager, then graphed) and a prefill per "
                             "model (not the rows with unfused quantizers)")
    parser.add_argument("--fuse-hadamard", action="store_true",
                        help="also the models with a rotated out_proj input with the Hadamard's stages as compiled "
                             "kernels (hadamard.FUSE_ON_CUDA; off by default in the library)")
    parser.add_argument("--int4-gemv", action="store_true",
                        help="also the W4A16 models with one-row GEMMs through the split-K GEMV kernel "
                             "(int4_matmul.GEMV_ON_CUDA; off by default in the library)")
    parser.add_argument("--no-unfused", action="store_true",
                        help="skip the A8 models with eager activation quantizers (on CUDA they run by default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    runs = [(d, {}) for d in [args.fp16, *args.quantized]]
    if device.type == "cuda" and not args.no_unfused:  # the A8 models with the quantizers as eager chains
        a8 = [d for d in args.quantized if json.loads((d / QUANT_CONFIG).read_text()).get("a_bits")]
        runs += [(d, {"fused": False}) for d in a8]
    if args.fuse_hadamard:  # every quantized model of the recipe rotates out_proj's input
        runs += [(d, {"fused_hadamard": True}) for d in args.quantized]
    if args.int4_gemv:  # the W4A16 dirs: their projections go through int4_linear
        w4a16 = [d for d in args.quantized if json.loads((d / QUANT_CONFIG).read_text()).get("scheme") == "w4a16"]
        runs += [(d, {"int4_gemv": True}) for d in w4a16]
        runs += [(d, {"int4_gemv": True, "fused_hadamard": True}) for d in w4a16] if args.fuse_hadamard else []
    if args.compile:
        runs += [(d, {"compile_blocks": True}) for d in [args.fp16, *args.quantized]]
    rows = []
    for model_dir, options in runs:
        try:
            row = measure(model_dir, device, tuple(args.prefill), args.decode, args.repeats, dtype=args.dtype,
                          profiled=args.profile and options.get("fused", True), **options)
        except Exception as err:  # e.g. a model torch.compile cannot take: say so, keep the other rows
            if not options.get("compile_blocks"):
                raise
            print(f"{model_dir}: compiled blocks failed: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
            continue
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # each row as soon as it is measured: a time limit keeps it
        if args.out:
            partial = args.out.with_name(args.out.name + ".tmp")
            partial.write_text(json.dumps(rows, indent=2))
            partial.replace(args.out)
    bases = {row["compiled_blocks"]: row for row in reversed(rows) if row["scheme"].startswith("fp16")}
    base = rows[0]
    name = f"{torch.cuda.get_device_name()}" if device.type == "cuda" else "cpu"
    print(f"device {name}, {base['dtype']}; prefill {args.prefill[0]} x {args.prefill[1]}; decode {args.decode} "
          f"tokens at batch 1")
    print("| scheme | weights (MB) | x FP16 | prefill (ms) | x FP16 time | decode tok/s | x FP16 "
          "| eager decode tok/s | x FP16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        base = bases.get(row["compiled_blocks"], rows[0])  # compiled rows against compiled FP16
        print(f"| {row['scheme']} | {row['weight_bytes'] / 1e6:.0f} | {row['weight_bytes'] / base['weight_bytes']:.2f} "
              f"| {row['prefill_s'] * 1e3:.1f} | {row['prefill_s'] / base['prefill_s']:.2f} "
              f"| {row['decode_tokens_per_s']:.1f} | {row['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f} "
              f"| {row['eager_decode_tokens_per_s']:.1f} "
              f"| {row['eager_decode_tokens_per_s'] / base['eager_decode_tokens_per_s']:.2f} |")


if __name__ == "__main__":
    main()
