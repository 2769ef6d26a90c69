"""Deep & Cross Network: DCN (Wang et al. 2017) and DCN-V2 (Wang et al. 2021).

Both run a cross network and a DNN in parallel on x_0 = concat(e_1..e_f) [B, m], m = f*k,
concatenate their outputs and read them with one linear output unit:

    DCN    cross layer: x_{l+1} = x_0 (x_l · w_l) + b_l + x_l      w_l, b_l ∈ R^m     (2m params)
    DCN-V2 cross layer: x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l      W_l ∈ R^{m×m}      (m² + m params)
    logit = w^T [x_L ; MLP(x_0)] + b

Layer l of a cross network holds polynomial interactions of x_0 up to degree l + 1; the
residual "+ x_l" keeps every lower degree. DCN's rank-one w_l makes x_0 (x_l · w_l) a scalar
re-weighting of x_0; DCN-V2's full W_l lets every bit of x_l reach every bit of the output.
Choices: the "parallel" structure of both papers (DCN-V2 also describes a stacked one, not
built here); DCN-V2's full-rank W_l (its low-rank mixture-of-experts variant is not built).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..data.batch import MultiValuedField
from .base import CTRModel
from .layers import MLP, FieldEmbedding, dense
from .search import DNN, EMBEDDING, TRAINING, Int, SearchSpace


class CrossLayer(nn.Module):
    """DCN (2017) Eq. 1: x_0 (x_l · w) + b + x_l. x_0, x_l: [B, m] -> [B, m]."""

    def __init__(self, dim: int):
        super().__init__()
        # w as an [m, 1] column (a weight matrix, so the dense L2 term sees it; CTRModel.dense_weights
        # takes parameters with ndim >= 2). Xavier-normal for an m x 1 kernel, as DCN's authors' code.
        self.weight = nn.Parameter(torch.randn(dim, 1) * (2.0 / (dim + 1)) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x0: torch.Tensor, xl: torch.Tensor) -> torch.Tensor:
        scale = xl @ self.weight  # [B, 1]: x_l · w per row (x_0 x_l^T w is a rescaled x_0)
        return x0 * scale + self.bias + xl  # [B, m]


class CrossLayerV2(nn.Module):
    """DCN-V2 Eq. 1: x_0 ⊙ (W x_l + b) + x_l. x_0, x_l: [B, m] -> [B, m]."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)  # W_l [m, m] and b_l [m]

    def forward(self, x0: torch.Tensor, xl: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(xl, x0, dense(self.linear, xl))  # x_0 ⊙ (W x_l + b) + x_l, one pass: [B, m]


class _CrossAndDeep(CTRModel):
    """Embedding -> (cross network ‖ DNN) -> concat -> linear output."""

    config_fields = ("embedding_dim", "dnn_hidden", "dropout", "cross_layers")

    cross_layer: type[nn.Module]
    search_space: SearchSpace = {**TRAINING, **EMBEDDING, **DNN, "model.cross_layers": Int(1, 6)}

    def __init__(self, cardinalities: Sequence[int], cfg: ModelConfig, multi_valued: Sequence[MultiValuedField] = ()):
        super().__init__(cardinalities, cfg, multi_valued)
        m = self.num_fields * cfg.embedding_dim
        self.embedding = FieldEmbedding(self.cardinalities, cfg.embedding_dim, multi_valued=self.multi_valued)
        self.cross = nn.ModuleList(self.cross_layer(m) for _ in range(cfg.cross_layers))
        self.mlp = MLP(m, cfg.dnn_hidden, cfg.dropout)
        self.output = nn.Linear(m + self.mlp.output_dim, 1)  # reads [x_L ; h_L]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.embedding(x).flatten(1)  # [B, m]
        return dense(self.output, cross_and_deep(self.cross, self.mlp, x0)).squeeze(-1)  # [B]


def cross_and_deep(cross: nn.ModuleList, mlp: MLP, x0: torch.Tensor) -> torch.Tensor:
    """x_0 [B, m] -> [x_L ; MLP(x_0)] [B, m + widths[-1]]: the cross network beside the DNN."""
    xl = x0
    for layer in cross:
        xl = layer(x0, xl)  # [B, m]
    return torch.cat([xl, mlp(x0)], dim=1)


class DCN(_CrossAndDeep):
    """Deep & Cross Network (2017): rank-one cross layers."""

    cross_layer = CrossLayer


class DCNV2(_CrossAndDeep):
    """DCN-V2 (2021), parallel structure: full-matrix cross layers."""

    cross_layer = CrossLayerV2
