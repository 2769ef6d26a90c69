"""AutoInt (Song et al. 2019): multi-head self-attention over the field embeddings.

Each interacting layer, for every field m and head h (paper Eq. 5-8):

    α^h_{m,j} = softmax_j( <W_Q^h e_m, W_K^h e_j> )           attention over the f fields
    ẽ^h_m     = Σ_j α^h_{m,j} W_V^h e_j                       [d'] per head
    ẽ_m       = ẽ^1_m ⊕ ... ⊕ ẽ^H_m                           [H d']
    e^Res_m   = ReLU(ẽ_m + W_Res e_m)                         residual projection, then ReLU

Layers are stacked (the output of one is the e of the next); the output layer reads all fields:
    logit = w^T (e^Res_1 ⊕ ... ⊕ e^Res_f) + b                (Eq. 9)

Sizes: cfg.attention_layers layers, cfg.attention_heads heads of d' = cfg.attention_dim each;
cfg.attention_residual=False drops W_Res (then e^Res_m = ReLU(ẽ_m)).
Choices: the score is the plain inner product of Eq. 5 (no 1/sqrt(d') scaling); W_Q, W_K, W_V,
W_Res have no biases (the paper writes none). AutoInt+ (AutoInt with a parallel DNN) is not built.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..data.batch import MultiValuedField
from .base import CTRModel
from .layers import FieldEmbedding, dense
from .search import EMBEDDING, TRAINING, Choice, Int, SearchSpace


class InteractingLayer(nn.Module):
    """One multi-head self-attention layer over fields.

    forward(e [B, f, d_in]) -> (e_res [B, f, H*d'], attention [B, H, f, f]); each attention
    row (query field m, head h) sums to 1 over the key fields j.
    """

    def __init__(self, input_dim: int, heads: int, head_dim: int, residual: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        width = heads * head_dim
        self.query = nn.Linear(input_dim, width, bias=False)
        self.key = nn.Linear(input_dim, width, bias=False)
        self.value = nn.Linear(input_dim, width, bias=False)
        self.residual = nn.Linear(input_dim, width, bias=False) if residual else None
        self.output_dim = width

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, f, _ = t.shape
        return t.view(B, f, self.heads, self.head_dim).transpose(1, 2)  # [B, H, f, d']

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (self._split_heads(dense(proj, e)) for proj in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2)  # [B, H, f, f]: <W_Q e_m, W_K e_j>
        attention = torch.softmax(scores, dim=-1)  # normalize over key fields j
        out = (attention @ v).transpose(1, 2).flatten(2)  # [B, H, f, d'] -> [B, f, H*d'] (heads concatenated)
        if self.residual is not None:
            out = out + dense(self.residual, e)
        return torch.relu(out), attention


class AutoInt(CTRModel):
    config_fields = ("embedding_dim", "attention_layers", "attention_heads", "attention_dim", "attention_residual")
    search_space: SearchSpace = {
        **TRAINING, **EMBEDDING, "model.attention_layers": Int(1, 4), "model.attention_heads": Choice((1, 2, 4)),
        "model.attention_dim": Choice((8, 16, 32, 64)),
    }

    def __init__(self, cardinalities: Sequence[int], cfg: ModelConfig, multi_valued: Sequence[MultiValuedField] = ()):
        super().__init__(cardinalities, cfg, multi_valued)
        self.embedding = FieldEmbedding(self.cardinalities, cfg.embedding_dim, multi_valued=self.multi_valued)
        layers, width = [], cfg.embedding_dim
        for _ in range(cfg.attention_layers):
            layers.append(InteractingLayer(width, cfg.attention_heads, cfg.attention_dim, cfg.attention_residual))
            width = layers[-1].output_dim
        self.layers = nn.ModuleList(layers)
        self.output = nn.Linear(self.num_fields * width, 1)  # Eq. 9

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """x [B, f] -> logits [B]; with return_attention, also each layer's attention [B, H, f, f]."""
        h = self.embedding(x)  # [B, f, k]
        attentions = []
        for layer in self.layers:
            h, attention = layer(h)  # [B, f, H*d']
            attentions.append(attention)
        logits = dense(self.output, h.flatten(1)).squeeze(-1)  # [B]
        return (logits, attentions) if return_attention else logits
