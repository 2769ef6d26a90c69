"""Model zoo: every model maps LongTensor [B, f] -> logits [B] (see base.CTRModel)."""

from __future__ import annotations

from typing import Sequence

from ..config import ModelConfig
from .base import CTRModel
from .lr import LogisticRegression
from .masknet import ParallelMaskNet, SerialMaskNet

REGISTRY: dict[str, type[CTRModel]] = {
    "sermasknet": SerialMaskNet,
    "paramasknet": ParallelMaskNet,
    "lr": LogisticRegression,
}
MODEL_NAMES = tuple(REGISTRY)


def build_model(cfg: ModelConfig, cardinalities: Sequence[int]) -> CTRModel:
    """Instantiate `cfg.name` for fields with the given cardinalities."""
    return REGISTRY[cfg.name](cardinalities, cfg)


__all__ = ["CTRModel", "REGISTRY", "MODEL_NAMES", "build_model", "SerialMaskNet", "ParallelMaskNet", "LogisticRegression"]
