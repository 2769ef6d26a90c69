"""DNN: the field embeddings concatenated and fed to a ReLU MLP (the "deep" part shared by
DeepFM and xDeepFM, and the plain DNN baseline of the MaskNet paper).

    h_0 = concat(e_1..e_f)                  [B, m], m = f*k
    h_l = Dropout(ReLU(W_l h_{l-1} + b_l))  widths cfg.dnn_hidden (paper: 3 x 400)
    y   = w^T h_L (+ b)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..data.batch import MultiValuedField
from .base import CTRModel
from .layers import MLP, FieldEmbedding, dense
from .search import DNN as DNN_SPACE
from .search import EMBEDDING, TRAINING, SearchSpace


class DNNTower(nn.Module):
    """MLP (cfg.dnn_hidden, cfg.dropout) + a linear output unit. [B, m] -> [B].

    bias=False when the tower's logit is summed with a part that already has a global bias
    (DeepFM, xDeepFM): two biases added together are one parameter written twice.
    """

    def __init__(self, input_dim: int, cfg: ModelConfig, bias: bool = True):
        super().__init__()
        self.mlp = MLP(input_dim, cfg.dnn_hidden, cfg.dropout)
        self.output = nn.Linear(self.mlp.output_dim, 1, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return dense(self.output, self.mlp(h)).squeeze(-1)


class DNN(CTRModel):
    """Embeddings -> MLP -> logit. No explicit interaction term: the MLP must learn them all."""

    config_fields = ("embedding_dim", "dnn_hidden", "dropout")

    search_space: SearchSpace = {**TRAINING, **EMBEDDING, **DNN_SPACE}

    def __init__(self, cardinalities: Sequence[int], cfg: ModelConfig, multi_valued: Sequence[MultiValuedField] = ()):
        super().__init__(cardinalities, cfg, multi_valued)
        self.embedding = FieldEmbedding(self.cardinalities, cfg.embedding_dim, multi_valued=self.multi_valued)
        self.tower = DNNTower(self.num_fields * cfg.embedding_dim, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower(self.embedding(x).flatten(1))  # [B, f, k] -> [B, m] -> [B]
