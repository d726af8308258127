"""The shipped demo models are real: trained, small, loadable, and far better than chance."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

import quamba
from quamba.data import load_tokenizer
from quamba.lm_eval_model import QuambaLM
from quamba.stages.evaluate import task_manager

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


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, two threads contending with other jobs ran
    this evaluation 5-15x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["mamba1-demo", "mamba2-demo"])
def test_demo_model_beats_chance_on_quamba_mc_by_several_standard_errors(name, one_thread):
    from lm_eval.evaluator import simple_evaluate

    lm = QuambaLM(MODELS / name, batch_size=8, device="cpu", progress=False)
    run = simple_evaluate(model=lm, tasks=["quamba_mc"], task_manager=task_manager(["quamba_mc"]), limit=200)
    scores = run["results"]["quamba_mc"]
    chance = 0.25  # four choices; context-free baselines score it too (test_resources.py)
    # Over the first 200 items (all 500): mamba1-demo acc 0.470 (0.420), mamba2-demo 0.565 (0.478), stderr ~0.035.
    assert scores["acc,none"] > chance + 4 * scores["acc_stderr,none"], scores
    assert scores["acc_norm,none"] > chance + 2 * scores["acc_norm_stderr,none"], scores
