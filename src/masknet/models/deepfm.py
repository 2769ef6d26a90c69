"""DeepFM (Guo et al. 2017): an FM and a DNN side by side on ONE shared embedding.

    y = y_FM + y_DNN                                          (logits summed; sigmoid in the loss)
    y_FM  = w_0 + Σ_i w[x_i] + Σ_{i<j} <e_i, e_j>             (fm.FM)
    y_DNN = w^T MLP(concat(e_1..e_f))                         (dnn.DNNTower, 3 x 400 ReLU)

Sharing the embedding is DeepFM's point: the FM's factor vectors are the DNN's input, so no
pre-training is needed and both parts shape the same e_i.
Choice: the DNN's output unit has no bias; w_0 is the model's single global bias.

LR first (docs/model.md, "DeepFM: LR first"; not in the paper; opt-in, `model.linear_term=true`): the first-order part w_0 + Σ_i w[x_i] is fitted first, as LR's own run, with
the embedding and the tower's output unit at zero (then y_FM's pairwise term, y_DNN and both their
gradients are exactly zero: the model is LR); the embedding then starts from a small draw and the
tower's output from zero, so phase 2 starts at LR's logit (training.factor_phase).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..config import ModelConfig
from ..data.batch import MultiValuedField
from .base import CTRModel
from .dnn import DNNTower
from .fm import draw_factors, fm_pairwise
from .layers import FieldEmbedding
from .lr import LinearTerm
from .masknet import lr_first_train_defaults
from .search import DNN, EMBEDDING, TRAINING, SearchSpace


class DeepFM(CTRModel):
    config_fields = ("embedding_dim", "dnn_hidden", "dropout", "linear_term")
    search_space: SearchSpace = {**TRAINING, **EMBEDDING, **DNN}

    @classmethod
    def train_defaults_for(cls, cfg: Optional[ModelConfig]) -> dict:
        # opt-in (model.linear_term=true), not yet a size default: it gained valid AUC on 4 of 5 selection
        # draws (docs/model.md, "DeepFM: LR first"), but issue 16's evidence was measured without it
        return lr_first_train_defaults(cls.train_defaults) if cfg is not None and cfg.linear_term else cls.train_defaults

    def __init__(self, cardinalities: Sequence[int], cfg: ModelConfig, multi_valued: Sequence[MultiValuedField] = ()):
        super().__init__(cardinalities, cfg, multi_valued)
        self.linear = LinearTerm(self.cardinalities, self.multi_valued)
        self.embedding = FieldEmbedding(self.cardinalities, cfg.embedding_dim, multi_valued=self.multi_valued)
        self.tower = DNNTower(self.num_fields * cfg.embedding_dim, cfg, bias=False)
        self.second_active = True  # False in phase 1 of LR first: y_FM's pairwise term and y_DNN (then zero) are not run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.second_active:
            return self.linear(x)  # [B]
        e = self.embedding(x)  # [B, f, k], shared by both parts
        return self.linear(x) + fm_pairwise(e) + self.tower(e.flatten(1))  # [B]

    # LR first (training.factor_phase): the shared embedding is what phase 2 brings in
    def factor_tables(self) -> list[FieldEmbedding]:
        return [self.embedding] if self.cfg.linear_term else []

    @torch.no_grad()
    def hold_second_phase(self) -> None:
        self.embedding.weight.zero_()  # pairwise term and its gradient: zero
        self.tower.output.weight.zero_()  # y_DNN and every gradient through it: zero
        self.second_active = False

    def release_second_phase(self, generator: torch.Generator) -> None:
        draw_factors(self.embedding, generator)
        self.second_active = True

    def set_phase(self, second: bool) -> None:
        self.second_active = second or not self.cfg.linear_term

    def unused_in_first_phase(self) -> list[str]:
        return [name for name, _ in self.named_parameters() if not name.startswith("linear.")] if self.cfg.linear_term else []
