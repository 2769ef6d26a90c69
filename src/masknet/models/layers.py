"""Layers shared by every model: field embeddings, per-field LayerNorm, MLP.

Shapes: B = batch, f = number of fields, k = embedding size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batch import Batch, MultiValuedField


class FieldEmbedding(nn.Embedding):
    """One embedding table of size k per field (Eq. 4), stored as one concatenated table.

    Field i's rows live at `offsets[i] : offsets[i] + cardinalities[i]`, so a whole
    batch is looked up with a single gather; this is the same parameter set as f
    separate tables.

    x: LongTensor [B, f] of per-field indices, 0 <= x[:, i] < cardinalities[i], or a `Batch`
    returns: [B, f, k]

    Multi-valued fields (`multi_valued`, data.batch.MultiValuedField) get their rows after the
    single-valued ones and are pooled to one embedding each (`pool_multi_valued`), appended
    after the single-valued fields: the output is [B, f_s + f_m, k], so every model sees f
    fields whatever their kind.

    With `sparse = True` the backward pass yields a sparse gradient holding only the rows
    the batch looked up (the trainer sets it and pairs it with a sparse optimizer). It is
    an `nn.Embedding` so that DistributedDataParallel knows to expect sparse gradients.
    """

    def __init__(
        self, cardinalities: Sequence[int], dim: int, init_std: float = 1e-4, multi_valued: Sequence[MultiValuedField] = ()
    ):
        if not cardinalities or min(cardinalities) <= 0:
            raise ValueError(f"cardinalities must be positive, got {list(cardinalities)}")
        multi = tuple(multi_valued)
        single_rows = sum(int(c) for c in cardinalities)
        # multi-valued tables, then one all-zero padding row (never updated: padding_idx)
        rows = single_rows + (sum(m.cardinality for m in multi) + 1 if multi else 0)
        super().__init__(rows, dim, _weight=torch.empty(rows, dim))  # initialised once, below
        self.cardinalities = [int(c) for c in cardinalities]
        self.multi_valued = multi
        self.num_fields = len(self.cardinalities) + len(multi)
        self.dim = dim
        offsets = torch.tensor([0] + self.cardinalities[:-1], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        # Small normal init as in FuxiCTR/DeepCTR (std 1e-4); the paper does not state one.
        nn.init.normal_(self.weight, std=init_std)
        if multi:
            self._init_multi_valued(single_rows)

    def _init_multi_valued(self, single_rows: int) -> None:
        self.pad_row = self.num_embeddings - 1
        with torch.no_grad():
            self.weight[self.pad_row].zero_()
        starts = torch.tensor([0] + [m.cardinality for m in self.multi_valued[:-1]], dtype=torch.long).cumsum(0) + single_rows
        widths = [m.max_len for m in self.multi_valued]
        # per seq column: its field's first table row, and whether it is the field's first column
        self.register_buffer("seq_offsets", torch.repeat_interleave(starts, torch.tensor(widths)), persistent=False)
        first = torch.zeros(sum(widths), dtype=torch.bool)
        first[torch.tensor([0] + widths[:-1]).cumsum(0)] = True
        self.register_buffer("seq_first", first, persistent=False)

    def forward(self, x: torch.Tensor | Batch) -> torch.Tensor:
        batch = Batch.of(x)
        ids = batch.x + self.offsets  # [B, f_s]
        if not self.multi_valued:
            return F.embedding(ids, self.weight, sparse=self.sparse)  # [B, f_s, k]
        if batch.seq is None:
            raise ValueError(f"this model has multi-valued fields ({', '.join(m.name for m in self.multi_valued)}): pass a Batch with seq")
        valid = (batch.seq != 0) | self.seq_first  # an empty list keeps its first position: id 0, the missing row
        rows = torch.where(valid, batch.seq + self.seq_offsets, self.pad_row)  # [B, ΣL]
        # One gather for both kinds, so one sparse gradient: two lookups of the table cost a
        # sparse-gradient sum more, 8-14% of an FM/LR step (measured, docs/multivalued.md).
        emb = F.embedding(torch.cat([ids, rows], dim=1), self.weight, padding_idx=self.pad_row, sparse=self.sparse)
        fs = ids.shape[1]
        pooled = self.pool_multi_valued(emb[:, fs:], batch.seq, valid, batch.seq_weights)
        return torch.cat([emb[:, :fs], pooled], dim=1)  # [B, f_s + f_m, k]

    def pool_multi_valued(
        self, emb: torch.Tensor, seq: torch.Tensor, valid: torch.Tensor, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """One embedding per multi-valued field: the looked-up rows emb [B, ΣL, k] of seq [B, ΣL]
        (0 = padding; `valid` marks the positions that count) -> [B, f_m, k].

        Pooling over the field's values j (masked: padding never counts):
            mean  Σ_j w_j e_j / n        sum  Σ_j w_j e_j        max  max_j w_j e_j (per dimension)
        with w_j = 1 unless the field is weighted, n the number of values. An empty list is the
        field's missing value: its embedding is row 0 of the field's table (learnt, like a
        single-valued field's missing index), never a zero vector the model cannot tell apart.
        Padding positions look up the shared all-zero row with padding_idx, so their gradient is
        dropped from the sparse gradient and SparseAdam never touches that row.
        """
        pooled, start = [], 0
        for m in self.multi_valued:
            sl = slice(start, start + m.max_len)
            start += m.max_len
            e, ok = emb[:, sl], valid[:, sl]
            if m.weighted:
                if weights is None:
                    raise ValueError(f"multi-valued field {m.name!r} is weighted: pass a Batch with seq_weights")
                w = torch.where(seq[:, sl] != 0, weights[:, sl], torch.ones_like(weights[:, sl]))  # empty: weight 1
                e = e * w.unsqueeze(-1)
            if m.pooling == "max":
                pooled.append(e.masked_fill(~ok.unsqueeze(-1), float("-inf")).amax(dim=1))
            elif m.pooling == "sum":
                pooled.append(e.sum(dim=1))
            else:
                pooled.append(e.sum(dim=1) / ok.sum(dim=1, keepdim=True).to(e.dtype))
        return torch.stack(pooled, dim=1)


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
