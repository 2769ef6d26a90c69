"""The interface every model implements (MaskNets and baselines alike)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..data.batch import MultiValuedField
from .layers import FieldEmbedding, FieldLayerNorm
from .search import TRAINING, SearchSpace


class CTRModel(nn.Module):
    """A CTR model: per-field category indices in, one logit per row out.

    forward(x: LongTensor [B, f] or data.batch.Batch) -> logits [B]   (sigmoid lives in the loss and in `predict_proba`)

    `cardinalities` are the single-valued fields'; `multi_valued` (data.batch.MultiValuedField) the
    multi-valued ones, each pooled to one field embedding by FieldEmbedding: `num_fields` counts both.
    `config_fields`: the ModelConfig keys it reads. `search_space`: the config keys `masknet tune` varies for this model, and their ranges (models.search).
    """

    search_space: SearchSpace = TRAINING
    # the ModelConfig keys this model reads (every other key is ignored by it; tests/models/test_model_conformance.py checks both)
    config_fields: tuple[str, ...] = ("embedding_dim",)
    # what `train.lr` and `train.l2_prior` mean when a config leaves them unset (None); docs/model.md
    train_defaults: dict = {"lr": 1e-3, "l2_prior": [], "factor_prior": [], "min_batches_per_epoch": 32}

    @classmethod
    def train_defaults_for(cls, cfg: Optional[ModelConfig]) -> dict:
        """`train_defaults` for a model built from `cfg` (None: not known; the class's)."""
        return cls.train_defaults

    @classmethod
    def model_defaults(cls, train_rows: Optional[int]) -> dict[str, Any]:
        """What the ModelConfig settings a config leaves to the model (None) mean for a train split
        of `train_rows` rows (None: not known, e.g. a model built outside a run; the large-data value)."""
        return {"dropout": 0.0}

    def __init__(self, cardinalities: Sequence[int], cfg: ModelConfig, multi_valued: Sequence[MultiValuedField] = ()):
        super().__init__()
        self.cardinalities = [int(c) for c in cardinalities]
        self.multi_valued = tuple(multi_valued)
        self.num_fields = len(self.cardinalities) + len(self.multi_valued)
        self.cfg = cfg

    def embeddings(self) -> list[FieldEmbedding]:
        """The embedding tables (sparse rows; L2 is applied to the rows a batch looks up)."""
        return [m for m in self.modules() if isinstance(m, FieldEmbedding)]

    def factor_tables(self) -> list[FieldEmbedding]:
        """Tables phase 2 of a two-phase fit brings in, under `train.factor_prior` (training.factor_phase):
        FM's factors, a MaskNet's embedding when it has a first-order term; none here (one phase)."""
        return []

    def hold_second_phase(self) -> None:
        """Phase 1 of a two-phase fit: what phase 2 brings in contributes exactly zero (the model is LR)."""

    def release_second_phase(self, generator: torch.Generator) -> None:
        """Phase 2 begins: what phase 1 held at zero starts to train (a draw from `generator`, if any)."""

    def unused_in_first_phase(self) -> list[str]:
        """Names of the parameters phase 1 of a two-phase fit does not use (no gradient at all)."""
        return []

    def set_phase(self, second: bool) -> None:
        """A resumed two-phase fit: the phase it is in (for what the model does differently in phase 1)."""

    def dense_weights(self) -> list[nn.Parameter]:
        """Weight matrices outside the embeddings (the dense L2 term); biases and norms excluded."""
        excluded = {id(e.weight) for e in self.embeddings()}
        norms = (nn.LayerNorm, FieldLayerNorm)  # FieldLayerNorm's gain/bias are [f, k]: not weights
        excluded |= {id(p) for m in self.modules() if isinstance(m, norms) for p in m.parameters()}
        return [p for p in self.parameters() if p.ndim >= 2 and id(p) not in excluded]

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Click probabilities [B] (eval mode is the caller's business)."""
        return torch.sigmoid(self(x))
