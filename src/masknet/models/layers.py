"""Layers shared by every model: field embeddings, per-field LayerNorm, MLP.

Shapes: B = batch, f = number of fields, k = embedding size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FieldEmbedding(nn.Embedding):
    """One embedding table of size k per field (Eq. 4), stored as one concatenated table.

    Field i's rows live at `offsets[i] : offsets[i] + cardinalities[i]`, so a whole
    batch is looked up with a single gather; this is the same parameter set as f
    separate tables.

    x: LongTensor [B, f] of per-field indices, 0 <= x[:, i] < cardinalities[i]
    returns: [B, f, k]

    With `sparse = True` the backward pass yields a sparse gradient holding only the rows
    the batch looked up (the trainer sets it and pairs it with a sparse optimizer). It is
    an `nn.Embedding` so that DistributedDataParallel knows to expect sparse gradients.
    """

    def __init__(self, cardinalities: Sequence[int], dim: int, init_std: float = 1e-4):
        if not cardinalities or min(cardinalities) <= 0:
            raise ValueError(f"cardinalities must be positive, got {list(cardinalities)}")
        rows = sum(int(c) for c in cardinalities)
        super().__init__(rows, dim, _weight=torch.empty(rows, dim))  # initialised once, below
        self.cardinalities = [int(c) for c in cardinalities]
        self.num_fields = len(self.cardinalities)
        self.dim = dim
        offsets = torch.tensor([0] + self.cardinalities[:-1], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        # Small normal init as in FuxiCTR/DeepCTR (std 1e-4); the paper does not state one.
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x + self.offsets, self.weight, sparse=self.sparse)  # [B, f, k]


class FieldLayerNorm(nn.Module):
    """LN_EMB (Eq. 9): a separate LayerNorm on each field's embedding.

    Each field is normalized over its own k values and has its own gain and bias,
    so a change in field j's embedding never changes field i's output.

    x: [B, f, k] -> [B, f, k]
    """

    def __init__(self, num_fields: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(num_fields, dim))
        self.bias = nn.Parameter(torch.zeros(num_fields, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x, (self.dim,), eps=self.eps)  # per field: over its own k values (static k: exportable)
        return normed * self.weight + self.bias


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) for each hidden width. [B, in] -> [B, widths[-1]]."""

    def __init__(self, input_dim: int, widths: Sequence[int], dropout: float = 0.0):
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Linear(input_dim, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            input_dim = width
        super().__init__(*layers)
        self.output_dim = input_dim
