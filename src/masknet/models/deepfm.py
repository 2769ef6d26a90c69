"""DeepFM (Guo et al. 2017): an FM and a DNN side by side on ONE shared embedding.

    y = y_FM + y_DNN                                          (logits summed; sigmoid in the loss)
    y_FM  = w_0 + Σ_i w[x_i] + Σ_{i<j} <e_i, e_j>             (fm.FM)
    y_DNN = w^T MLP(concat(e_1..e_f))                         (dnn.DNNTower, 3 x 400 ReLU)

Sharing the embedding is DeepFM's point: the FM's factor vectors are the DNN's input, so no
pre-training is needed and both parts shape the same e_i.
Choice: the DNN's output unit has no bias; w_0 is the model's single global bias.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import ModelConfig
from ..data.batch import MultiValuedField
from .base import CTRModel
from .dnn import DNNTower
from .fm import fm_pairwise
from .layers import FieldEmbedding
from .lr import LinearTerm
from .search import DNN, EMBEDDING, TRAINING, SearchSpace


class DeepFM(CTRModel):
    config_fields = ("embedding_dim", "dnn_hidden", "dropout")
    search_space: SearchSpace = {**TRAINING, **EMBEDDING, **DNN}

    def __init__(self, cardinalities: Sequence[int], cfg: ModelConfig, multi_valued: Sequence[MultiValuedField] = ()):
        super().__init__(cardinalities, cfg, multi_valued)
        self.linear = LinearTerm(self.cardinalities, self.multi_valued)
        self.embedding = FieldEmbedding(self.cardinalities, cfg.embedding_dim, multi_valued=self.multi_valued)
        self.tower = DNNTower(self.num_fields * cfg.embedding_dim, cfg, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embedding(x)  # [B, f, k], shared by both parts
        return self.linear(x) + fm_pairwise(e) + self.tower(e.flatten(1))  # [B]
