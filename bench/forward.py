"""Forward speed of the model: CUDA kernels against the pure-PyTorch reference, same process.

Random weights at the real mamba-130m / mamba2-130m sizes, any real architecture (--arch, its
first N blocks with --layers) or the demo sizes (--small). Prints one JSON line per case: seconds
per forward, tokens/s, and kernels/reference ratio.

    python -m bench.forward                                        # on a CUDA box with the `cuda` extra
    python -m bench.forward --arch mamba2-2.7b --layers 8 --shapes 1x512
    python -m bench.forward --small                                # CPU: reference only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from quamba.models import MambaConfig, MambaLMHeadModel, kernels
from quamba.models.random_checkpoint import ARCHITECTURES, architecture

SIZES = {
    "mamba-130m": MambaConfig(d_model=768, n_layer=24, vocab_size=50277),  # vocab of GPT-NeoX
    "mamba2-130m": MambaConfig(d_model=768, n_layer=24, vocab_size=50277, layer="Mamba2", d_state=128,
                               headdim=64, chunk_size=256),
    "mamba1-demo": MambaConfig(d_model=128, n_layer=6, vocab_size=4096),
    "mamba2-demo": MambaConfig(d_model=128, n_layer=6, vocab_size=4096, layer="Mamba2", d_state=32,
                               headdim=32, chunk_size=64),
}


def seconds_per_forward(model: MambaLMHeadModel, ids: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        model(ids)  # warm-up: Triton JIT, allocator
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(ids)
        if ids.is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="demo-sized models")
    parser.add_argument("--shapes", default="1x512,16x512", help="batch x seqlen, comma separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), help="a real architecture, random weights")
    parser.add_argument("--layers", type=int, default=None, help="with --arch: its first N blocks")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    sizes = dict(SIZES)
    if args.arch:
        config = architecture(args.arch)
        sizes[args.arch] = dataclasses.replace(config, n_layer=args.layers or config.n_layer)
        names = [args.arch]
    else:
        names = ["mamba1-demo", "mamba2-demo"] if args.small else ["mamba-130m", "mamba2-130m"]
    for name in names:
        model = MambaLMHeadModel(sizes[name])
        model.reset_parameters(0)
        model = model.to(device=device, dtype=dtype).eval()
        for shape in args.shapes.split(","):
            batch, seqlen = (int(v) for v in shape.split("x"))
            ids = torch.randint(0, 50000 if not args.small else 4096, (batch, seqlen), device=device)
            row = {"model": name, "layers": sizes[name].n_layer, "batch": batch, "seqlen": seqlen, "device": torch.cuda.get_device_name() if cuda else "cpu",
                   "dtype": str(dtype).removeprefix("torch.")}
            ref = seconds_per_forward(model.use_kernels(False), ids, max(1, args.repeats // 2))
            row.update(reference_s=round(ref, 5), reference_tok_s=round(batch * seqlen / ref))
            if cuda and kernels.available():
                fast = seconds_per_forward(model.use_kernels(True), ids, args.repeats)
                row.update(kernels_s=round(fast, 5), kernels_tok_s=round(batch * seqlen / fast),
                           speedup_kernels_over_reference=round(ref / fast, 2))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
