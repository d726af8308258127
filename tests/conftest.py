"""Shared fixtures. No test may reach the network: the hub clients are forced offline here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from quamba.models import MambaConfig, MambaLMHeadModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def random_model(config: MambaConfig, seed: int = 0) -> MambaLMHeadModel:
    """A model with mamba_ssm's initialisation plus noise, so no weight is trivially 0 or 1."""
    model = MambaLMHeadModel(config)
    model.reset_parameters(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture
def repo() -> Path:
    return REPO
