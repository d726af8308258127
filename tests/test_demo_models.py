"""The shipped demo models are real: trained, small, loadable, and far better than chance."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import quamba
from conftest import REPO
from quamba.data import load_tokenizer

MODELS = REPO / "resources" / "models"


@pytest.mark.parametrize("name, layer", [("mamba1-demo", "Mamba1"), ("mamba2-demo", "Mamba2")])
def test_demo_model_is_trained_far_below_the_uniform_perplexity(name, layer):
    model = quamba.load(MODELS / name, device="cpu")
    assert model.config.layer == layer
    parameters = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= parameters <= 5_000_000
    tokenizer = load_tokenizer(MODELS / name)
    text = (REPO / "resources" / "corpus" / "test.txt").read_text()
    ids = torch.tensor(tokenizer(text)["input_ids"][: 8 * 128]).view(8, 128)  # held-out windows
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    perplexity = math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item())
    assert perplexity < len(tokenizer) / 10, perplexity  # uniform guessing gives 4096
    recorded = json.loads((MODELS / f"{name}.train.json").read_text())
    assert recorded["parameters"] == parameters
    assert recorded["valid_perplexity"] < len(tokenizer) / 10


def test_demo_models_are_small_fp16_safetensors():
    sizes = [(MODELS / name / "model.safetensors").stat().st_size for name in ("mamba1-demo", "mamba2-demo")]
    assert sum(sizes) < 10 * 2 ** 20
    for name in ("mamba1-demo", "mamba2-demo"):
        source = json.loads((MODELS / name / "source.json").read_text())
        assert source["dtype"] == "float16"
