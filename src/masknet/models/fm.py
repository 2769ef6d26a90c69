"""FM: factorization machine (Rendle 2010) on one-hot fields.

With one active category per field (x_i = 1), Rendle's degree-2 model is

    y = w_0 + Σ_i w[x_i] + Σ_{i<j} <v_i, v_j>                   v_i = e_i, the field's k-vector

and the pairwise sum is computed in O(f k) instead of O(f² k) (Rendle 2010, Lemma 3.1):

    Σ_{i<j} <v_i, v_j> = ½ Σ_d [ (Σ_i v_{i,d})² − Σ_i v_{i,d}² ]

Shapes: B = batch, f = fields, k = embedding size.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import ModelConfig
from ..data.batch import MultiValuedField
from .base import CTRModel
from .layers import FieldEmbedding
from .lr import PRIOR_PATH, LinearTerm
from .search import EMBEDDING, TRAINING, Float, SearchSpace


def fm_pairwise(e: torch.Tensor) -> torch.Tensor:
    """Σ_{i<j} <e_i, e_j> by the sum-square trick. e: [B, f, k] -> [B]."""
    square_of_sum = e.sum(dim=1).pow(2)  # [B, k]
    sum_of_square = e.pow(2).sum(dim=1)  # [B, k]
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)  # [B]


# FM's phase-2 path (`train.factor_prior`): priors on the factors alone, strong to weak, after LR's path.
# Chosen on the selection sets (docs/model.md, "FM: LR first")
FACTOR_PATH = [50.0, 17.0, 5.0, 1.7, 0.5, 0.17, 0.05]
# std of the factors' draw when phase 2 starts (the tables' own init is 1e-4). 1e-1 was no better
# on Frappe-8k (docs/model.md, "FM: LR first"); not otherwise tuned
FACTOR_INIT_STD = 1e-2


@torch.no_grad()
def draw_factors(table: FieldEmbedding, generator: torch.Generator) -> None:
    """Phase 2 of LR first: a factor table held at zero starts from N(0, FACTOR_INIT_STD²)."""
    draw = torch.randn(table.weight.shape, generator=generator) * FACTOR_INIT_STD
    table.weight.copy_(draw.to(table.weight.device))
    if table.multi_valued:  # the padding row stays zero
        table.weight[table.pad_row].zero_()


class FM(CTRModel):
    """FM: logit = w_0 + Σ_i w[x_i] + Σ_{i<j} <e_i, e_j>.

    Parameters: Σ cardinalities (first order) + 1 (w_0) + k Σ cardinalities (factors).
    """

    config_fields = ("embedding_dim",)

    search_space: SearchSpace = {**TRAINING, "train.lr": Float(1e-3, 1e-1, log=True), **EMBEDDING}
    # LR first, then the factors (docs/model.md, "FM: LR first"): phase 1 is LR's run (its rate and prior
    # path) with the factors held at zero, phase 2 a prior path on the factors alone (training.factor_phase)
    train_defaults = {"lr": 1e-2, "l2_prior": PRIOR_PATH, "factor_prior": FACTOR_PATH, "min_batches_per_epoch": 0}

    def __init__(self, cardinalities: Sequence[int], cfg: ModelConfig, multi_valued: Sequence[MultiValuedField] = ()):
        super().__init__(cardinalities, cfg, multi_valued)
        self.linear = LinearTerm(self.cardinalities, self.multi_valued)
        self.embedding = FieldEmbedding(self.cardinalities, cfg.embedding_dim, multi_valued=self.multi_valued)

    def factor_tables(self) -> list[FieldEmbedding]:
        return [self.embedding]

    @torch.no_grad()
    def hold_second_phase(self) -> None:
        self.embedding.weight.zero_()  # every factor's gradient is then zero too: Adam leaves them there

    def release_second_phase(self, generator: torch.Generator) -> None:
        draw_factors(self.embedding, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + fm_pairwise(self.embedding(x))  # [B]
