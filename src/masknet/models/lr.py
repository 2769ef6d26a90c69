"""Logistic regression on the fields: the first-order-only reference model."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..data.batch import MultiValuedField
from .base import CTRModel
from .layers import FieldEmbedding
from .search import TRAINING, Float, SearchSpace


class LinearTerm(nn.Module):
    """w_0 + Σ_i w[x_i]: one scalar weight per category. x [B, f] -> [B].

    A multi-valued field's term is its values' weights pooled like its embedding (e.g. their mean)."""

    def __init__(self, cardinalities: Sequence[int], multi_valued: Sequence[MultiValuedField] = ()):
        super().__init__()
        self.weights = FieldEmbedding(cardinalities, 1, init_std=0.0, multi_valued=multi_valued)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights(x).sum(dim=(1, 2)) + self.bias


class LogisticRegression(CTRModel):
    """LR: logit = w_0 + Σ_i w[x_i] (no embeddings of size k, no interactions)."""

    config_fields = ()  # one weight per category: no size to set

    # one weight per category: a linear model takes larger steps than a deep one
    search_space: SearchSpace = {**TRAINING, "train.lr": Float(1e-3, 1e-1, log=True)}
    # A linear model takes larger steps, and its L2 is found on validation along a path from strong
    # to weak (as scikit-learn users tune C): docs/model.md, "Training defaults"
    train_defaults = {"lr": 1e-2, "l2_prior": [10.0, 1.0, 0.1, 0.01], "min_batches_per_epoch": 0}

    def __init__(self, cardinalities: Sequence[int], cfg: ModelConfig, multi_valued: Sequence[MultiValuedField] = ()):
        super().__init__(cardinalities, cfg, multi_valued)
        self.linear = LinearTerm(self.cardinalities, self.multi_valued)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
