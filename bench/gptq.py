"""GPTQ cost and quantized-model speed, as ratios against baselines run in the same process.

- GPTQ seconds per layer and in total, for the demo models (CPU) or a random-weight stack of
  the real mamba-130m size (GPU), against one plain forward over the same calibration tokens.
- Forward speed of the W8A8 / W4A16 models against the FP16 model on the same tokens.

    python -m bench.gptq                 # demo sizes
    python -m bench.gptq --size 130m     # real sizes (use a GPU)
    python -m bench.gptq --arch mamba2-2.7b --layers 4 --nsamples 128 --seqlen 1024   # the GPTQ stage at
        # a real architecture (random weights, a few layers): the column loop eager vs as CUDA graphs,
        # GPU busy share, byte-identical weights
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import quamba
from bench.forward import SIZES, seconds_per_forward
from bench.gpu_busy import GpuBusy
from quamba.models import MambaLMHeadModel
from quamba.models.checkpoint import save_fp16
from quamba.models.random_checkpoint import ARCHITECTURES, write_random_checkpoint
from quamba.numerics import gptq
from quamba.recipe import Recipe
from quamba.stages.assemble import quantize_model_dir
from quamba.stages.calibrate import CalibrationSettings, calibrate_model_dir
from quamba.stages.gptq import GPTQSettings, gptq_model_dir
from quamba.stages.scales import scales_file

TOKENIZER = Path(__file__).resolve().parents[1] / "resources" / "tokenizer"


def gptq_stage(arch: str, layers: int, nsamples: int, seqlen: int, w_bits: int) -> dict:
    """The gptq stage on a random checkpoint of `arch` cut to `layers`: eager column loop against
    CUDA graphs in one process, each with its wall time, solve time and GPU busy share."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    row = {"arch": arch, "layers": layers, "published_layers": ARCHITECTURES[arch].n_layer, "w_bits": w_bits,
           "windows": f"{nsamples} x {seqlen}", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        fp16 = write_random_checkpoint(arch, Path(tmp) / "fp16", n_layer=layers)
        outputs = {}
        for mode, graphs in (("eager", False), ("graphs", True)):
            gptq.GRAPHS_ON_CUDA = graphs
            out = Path(tmp) / mode
            start = time.perf_counter()
            with GpuBusy() as busy:
                result = gptq_model_dir(fp16, out, GPTQSettings(w_bits=w_bits, nsamples=nsamples, seqlen=seqlen),
                                        device=device, progress=False)
            total = time.perf_counter() - start
            solve = sum(s for name, s in result["seconds"].items() if name != "lm_head")
            row[mode] = {"total_s": round(total, 1), "solve_s_per_layer": round(solve / layers, 3),
                         "lm_head_s": round(result["seconds"].get("lm_head", 0.0), 1),
                         "gpu_busy": None if busy.fraction is None else round(busy.fraction, 2)}
            outputs[mode] = (out / "gptq.safetensors").read_bytes()
        gptq.GRAPHS_ON_CUDA = True
        row["solve_eager_over_graphs"] = round(row["eager"]["solve_s_per_layer"] / row["graphs"]["solve_s_per_layer"], 1)
        row["byte_identical"] = outputs["eager"] == outputs["graphs"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["demo", "130m"], default="demo")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), help="the gptq stage at a real architecture")
    parser.add_argument("--layers", type=int, default=4, help="with --arch: blocks of the random checkpoint")
    parser.add_argument("--w-bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    args = parser.parse_args()
    if args.arch:
        print(json.dumps(gptq_stage(args.arch, args.layers, args.nsamples, args.seqlen, args.w_bits)), flush=True)
        return
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    names = ["mamba1-demo", "mamba2-demo"] if args.size == "demo" else ["mamba-130m", "mamba2-130m"]
    for name in names:
        config = SIZES[name]
        model = MambaLMHeadModel(config)
        model.reset_parameters(0)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            fp16 = save_fp16(model, tmp / "fp16", TOKENIZER)
            ids = torch.randint(0, 4096, (args.nsamples, args.seqlen), device=device)
            fp_model = quamba.load(fp16, device=device, dtype=torch.float32)
            forward_s = seconds_per_forward(fp_model, ids, 2)
            start = time.perf_counter()
            result = gptq_model_dir(fp16, tmp / "w8", GPTQSettings(w_bits=8, nsamples=args.nsamples, seqlen=args.seqlen),
                                    device=device, progress=False)
            gptq_s = time.perf_counter() - start
            gptq_model_dir(fp16, tmp / "w4", GPTQSettings(w_bits=4, nsamples=args.nsamples, seqlen=args.seqlen),
                           device=device, progress=False)
            calibrate_model_dir(fp16, tmp / "calib", CalibrationSettings(num_samples=8, seq_len=args.seqlen,
                                save_activations=False), device=device, progress=False)
            scales_file(tmp / "calib", 1.0, tmp / "scales.json")
            row = {"model": name, "device": torch.cuda.get_device_name() if cuda else "cpu",
                   "tokens": args.nsamples * args.seqlen, "gptq_w8_total_s": round(gptq_s, 2),
                   "gptq_solve_s_per_layer": round(sum(result["seconds"].values()) / config.n_layer, 3),
                   "gptq_over_fp32_forward": round(gptq_s / forward_s, 1)}
            dtype = torch.float16 if cuda else torch.float32
            batch = ids[:16]
            base = seconds_per_forward(quamba.load(fp16, device=device, dtype=dtype), batch, 5)
            for scheme, gdir in (("w8a8", "w8"), ("w4a16", "w4")):
                quantize_model_dir(fp16, tmp / scheme, tmp / gdir, scheme, Recipe(), tmp / "calib", tmp / "scales.json")
                q = seconds_per_forward(quamba.load(tmp / scheme, device=device, dtype=dtype), batch, 5)
                row[f"{scheme}_over_fp16_forward_time"] = round(q / base, 2)
                row[f"{scheme}_size_ratio"] = json.loads((tmp / scheme / "provenance.json").read_text())["size_bytes"]["ratio"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
