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


# The L2 prior path of LR and FM (`train.l2_prior`, strong to weak): c = 1 / (2C) for scikit-learn's
# C in 0.001, 0.003, ..., 10, the grid benchmarks/sklearn_lr.py searches. Chosen over [10, 1, 0.1, 0.01]
# on the selection sets (FM +0.019 / +0.025 on the two built-in 10k draws): docs/model.md
PRIOR_PATH = [500.0, 167.0, 50.0, 17.0, 5.0, 1.7, 0.5, 0.17, 0.05]


class LogisticRegression(CTRModel):
    """LR: logit = w_0 + Σ_i w[x_i] (no embeddings of size k, no interactions)."""

    config_fields = ()  # one weight per category: no size to set

    # one weight per category: a linear model takes larger steps than a deep one
    search_space: SearchSpace = {**TRAINING, "train.lr": Float(1e-3, 1e-1, log=True)}
    # A linear model takes larger steps, and its L2 is found on validation along a path from strong
    # to weak (as scikit-learn users tune C): docs/model.md, "Training defaults"
    train_defaults = {"lr": 1e-2, "l2_prior": PRIOR_PATH, "min_batches_per_epoch": 0}

    def __init__(self, cardinalities: Sequence[int], cfg: ModelConfig, multi_valued: Sequence[MultiValuedField] = ()):
        super().__init__(cardinalities, cfg, multi_valued)
        self.linear = LinearTerm(self.cardinalities, self.multi_valued)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
