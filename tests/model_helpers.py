"""Shared model set-up for the model and training tests (imported, not collected)."""

from __future__ import annotations

import torch

from masknet.config import ModelConfig
from masknet.models import build_model


def random_model(cfg: ModelConfig, cardinalities: list[int], seed: int = 0, scale: float = 0.3):
    """`cfg`'s model with every parameter drawn from N(0, scale²) by `seed`: far from the
    initialisers' special values (zero biases, unit LayerNorm gains), so a test sees every term."""
    torch.manual_seed(seed)
    model = build_model(cfg, cardinalities)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return model
