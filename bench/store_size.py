"""Size of the alpha-free calibration store (calibration.safetensors) at Quamba's setting, 512
samples x 512 tokens, for real architectures: measured on a random-weight checkpoint of the real
width with a few layers and samples, then scaled to the full depth and 512 samples (the store grows
linearly in both: a tail per percentile tap and sample, a histogram per tap).

    python -m bench.store_size            # CPU, about a minute
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from safetensors import safe_open

from quamba.models.random_checkpoint import ARCHITECTURES, write_random_checkpoint
from quamba.recipe import Recipe
from quamba.stages.calibrate import CalibrationSettings, calibrate_model_dir


def measure(arch: str, layers: int, samples: int, seq_len: int, full_samples: int) -> dict:
    config = ARCHITECTURES[arch]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_random_checkpoint(arch, tmp / "model", n_layer=layers)
        settings = CalibrationSettings(num_samples=samples, seq_len=seq_len, save_activations=False)
        # packed windows: every sample has the full seq_len tokens, as a long Pile row truncated to 512 has
        calibrate_model_dir(model, tmp / "calib", settings, Recipe(calibration_data="packed"), device="cpu",
                            progress=False)
        tails = histograms = 0
        with safe_open(tmp / "calib" / "calibration.safetensors", "pt") as store:
            for key in store.keys():  # noqa: SIM118  (safe_open has no __iter__)
                tensor = store.get_tensor(key)
                nbytes = tensor.numel() * tensor.element_size()
                if key.endswith("/tails"):
                    tails += tensor.numel()  # values; stored in the activations' dtype
                elif key.endswith("/histogram"):
                    histograms += nbytes
    per_layer_sample = tails / (layers * samples)
    full_values = per_layer_sample * config.n_layer * full_samples
    model_bytes = 2 * sum(p.numel() for p in _shapes(config))
    return {"arch": arch, "n_layer": config.n_layer, "measured": f"{layers} layers x {samples} samples x {seq_len}",
            "tail_values_per_layer_and_sample": round(per_layer_sample),
            "full_store_fp16_MB": round((2 * full_values + histograms / layers * config.n_layer) / 1e6, 1),
            "full_store_fp32_MB": round((4 * full_values + histograms / layers * config.n_layer) / 1e6, 1),
            "model_fp16_MB": round(model_bytes / 1e6, 1)}


def _shapes(config):
    import torch

    from quamba.models.lm import MambaLMHeadModel

    with torch.device("meta"):
        model = MambaLMHeadModel(config)
    return list(model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["mamba-130m", "mamba2-2.7b"])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args()
    for arch in args.archs:
        print(json.dumps(measure(arch, args.layers, args.samples, 512, 512)), flush=True)


if __name__ == "__main__":
    main()
