"""MaskNet (Wang, She, Zhang 2021), read like section 3 of the paper.

Shapes (the names the code below uses): B = batch, f = fields, k = embedding size, m = f*k (width
of V_emb), q = block width, n = width of a block's input v_in, which its mask multiplies (the paper's
z: m for a block on the embedding, q for one on a block), t = r*n the aggregation width
(aggregation_width), u = num_blocks parallel blocks (ParaMaskNet).
f counts single- and multi-valued fields: a multi-valued field's values are pooled into its one
e_i (layers.FieldEmbedding), so every equation below keeps its shape.

    V_emb        = concat(e_1..e_f)                                   (Eq. 4)   [B, m]
    V_mask       = W_d2 ReLU(W_d1 V_emb + b_d1) + b_d2                (Eq. 5)   [B, n]
    block on EMB : ReLU(LN(W_i (V_mask ⊙ LN_EMB(V_emb))))             (Eq. 11-12)
    block on MB  : ReLU(LN(W_i (V_mask ⊙ V_output^p)))                (Eq. 13-14)
    SerMaskNet   : blocks stacked, the first on the embedding
    ParaMaskNet  : u blocks on the embedding, concat [B, u*q] (Eq. 15), ReLU FFNs (Eq. 16)
    prediction   : w_0 + Σ w_i x_i  (Eq. 17; the sigmoid is in the loss / predict path)

Ablation switches (ModelConfig): use_mask, emb_layernorm, block_layernorm, block_ffn.

How it is computed (the same function, docs/performance.md): every nn.Linear runs through
layers.dense (oneDNN GEMMs, the ReLU after W_d1 fused into its GEMM), and ParaMaskNet's blocks
share one per-field normalization of V_emb, each applying its own LN_EMB gain and bias.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..data.batch import MultiValuedField
from .base import CTRModel
from .layers import MLP, FieldEmbedding, FieldLayerNorm, dense
from .lr import PRIOR_PATH, LinearTerm
from .search import EMBEDDING, TRAINING, Choice, Float, Int, Layers, SearchSpace


def aggregation_width(z: int, reduction_ratio: float) -> int:
    """t = r * z (the paper's reduction ratio is relative to the masked width z)."""
    return max(1, int(round(reduction_ratio * z)))


class InstanceGuidedMask(nn.Module):
    """Eq. 5: aggregation layer (width t) + ReLU + projection layer (width z), no output activation.

    v_emb: [B, m] (always the raw, un-normalized embedding) -> V_mask [B, z]
    """

    def __init__(self, input_dim: int, output_dim: int, reduction_ratio: float):
        super().__init__()
        self.aggregation = nn.Linear(input_dim, aggregation_width(output_dim, reduction_ratio))
        self.projection = nn.Linear(self.aggregation.out_features, output_dim)

    def forward(self, v_emb: torch.Tensor) -> torch.Tensor:
        return dense(self.projection, dense(self.aggregation, v_emb, relu=True))


class MaskBlock(nn.Module):
    """One MaskBlock: instance-guided mask + feed-forward layer + layer normalization.

    on_embedding=True  -> MaskBlock on feature embedding (Eq. 11-12): the input is V_emb,
                          normalized per field (LN_EMB) before the mask multiplies it.
    on_embedding=False -> MaskBlock on MaskBlock (Eq. 13-14): the input is the previous block's output.

    forward(v_emb [B, m], v_in [B, n], normed) -> (V_output [B, output_dim], V_mask [B, n] or None)
    normed: optionally LN_EMB's normalization of v_in ([B, f, k], FieldLayerNorm.normalize),
    when blocks on the same embedding share it.
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        input_dim: int,
        cfg: ModelConfig,
        on_embedding: bool,
    ):
        super().__init__()
        self.num_fields, self.embedding_dim = num_fields, embedding_dim
        emb_width = num_fields * embedding_dim
        self.emb_norm = (
            FieldLayerNorm(num_fields, embedding_dim) if on_embedding and cfg.emb_layernorm else None
        )
        self.mask = InstanceGuidedMask(emb_width, input_dim, cfg.reduction_ratio) if cfg.use_mask else None
        if cfg.block_ffn:
            # With LayerNorm after it, a bias on W_i would be cancelled by the mean subtraction
            # (Eq. 10 writes LN(W_i X), no bias); without LayerNorm the layer keeps its bias.
            self.hidden = nn.Linear(input_dim, cfg.block_dim, bias=not cfg.block_layernorm)
            self.hidden_norm = nn.LayerNorm(cfg.block_dim) if cfg.block_layernorm else None
            self.output_dim = cfg.block_dim
        else:
            self.hidden, self.hidden_norm = None, None
            self.output_dim = input_dim
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def forward(
        self, v_emb: torch.Tensor, v_in: torch.Tensor, normed: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.emb_norm is not None:
            v_in = self.emb_norm(v_in.view(-1, self.num_fields, self.embedding_dim), normed).flatten(1)  # [B, m]
        v_mask = self.mask(v_emb) if self.mask is not None else None  # [B, n], from the RAW V_emb
        h = v_in * v_mask if v_mask is not None else v_in  # Eq. 6 / 11 / 13
        if self.hidden is None:
            return h, v_mask
        if self.hidden_norm is None:
            h = dense(self.hidden, h, relu=True)  # ReLU(W_i h + b_i)
        else:
            h = torch.relu_(self.hidden_norm(dense(self.hidden, h)))  # LN before ReLU (Eq. 10); in place: LN's backward keeps its input, not its output
        if self.dropout is not None:
            h = self.dropout(h)
        return h, v_mask


# MaskNet's own sizes (the paper's Tables 4-6 sweep embedding size, blocks and reduction ratio)
MASKNET_SPACE: SearchSpace = {
    **TRAINING, **EMBEDDING,
    "model.num_blocks": Int(1, 5),
    "model.block_dim": Choice((64, 128, 256, 400, 800)),
    "model.reduction_ratio": Float(0.5, 4.0),
    "model.dropout": Float(0.0, 0.5),
}


# Dropout on small data (docs/model.md, "Dropout on small data"): on small train splits the MaskNets
# find their best validation AUC within the first 60-230 steps (inside the warm-up) and overfit after;
# dropout 0.3 after every block (and top-MLP layer) gained valid AUC on 8 of 10 selection runs
# (5 draws of 6,400-16,000 train rows x 2 models; +0.007 on average; 0.5 was worse). On 25,000
# Frappe rows it cost 0.007, so it stops below that; large data (the paper's, the built-in 96,000
# train rows, Frappe's 69,105) keeps none.
SMALL_DATA_ROWS = 20_000
SMALL_DATA_DROPOUT = 0.3


# LR first (docs/model.md, "MaskNet: LR first"): below LINEAR_TERM_ROWS train rows a MaskNet adds a
# first-order term, fitted first as LR's own run (its rate, its prior path), and the deep part joins after;
# the best evaluation of either phase is kept (training.factor_phase). LR beat every MaskNet default on the
# small logs of issue 16; on the selection sets (6,400-96,000 train rows) the term gained 0.001-0.027 valid
# AUC on every one. Larger data is unmeasured, and phase 1 (LR's 9-value prior path, at least 36
# evaluations) costs more there: off from 100,000 rows
LINEAR_TERM_ROWS = 100_000
LINEAR_FIRST_LR = 1e-2  # phase 1's rate: LR's (models/lr.py)


def lr_first_train_defaults(base: dict) -> dict:
    """A deep model fitted LR first (MaskNet, DeepFM): phase 1 is LR's run (its rate, its prior path);
    phase 2 (the deep part) one stage with no prior on the embedding, with the warm-up again."""
    return {**base, "l2_prior": PRIOR_PATH, "factor_prior": [0.0], "first_phase_lr": LINEAR_FIRST_LR, "second_phase_warmup": True}


class _MaskNet(CTRModel):
    @classmethod
    def model_defaults(cls, train_rows: Optional[int]) -> dict:
        small = train_rows is not None and train_rows < SMALL_DATA_ROWS
        linear = train_rows is not None and train_rows < LINEAR_TERM_ROWS
        return {"dropout": SMALL_DATA_DROPOUT if small else 0.0, "linear_term": linear}

    @classmethod
    def train_defaults_for(cls, cfg: Optional[ModelConfig]) -> dict:
        return lr_first_train_defaults(cls.train_defaults) if cfg is not None and cfg.linear_term else cls.train_defaults

    config_fields = (
        "embedding_dim", "dropout", "num_blocks", "block_dim", "reduction_ratio", "use_mask", "emb_layernorm", "block_layernorm", "block_ffn",
        "linear_term",
    )  # the ModelConfig keys it reads
    search_space: SearchSpace = MASKNET_SPACE

    def __init__(self, cardinalities: Sequence[int], cfg: ModelConfig, multi_valued: Sequence[MultiValuedField] = ()):
        super().__init__(cardinalities, cfg, multi_valued)
        self.embedding = FieldEmbedding(self.cardinalities, cfg.embedding_dim, multi_valued=self.multi_valued)
        self.emb_width = self.num_fields * cfg.embedding_dim  # m
        self.linear = LinearTerm(self.cardinalities, self.multi_valued) if cfg.linear_term else None
        self.deep_active = True  # False in phase 1 of LR first: the deep part (then exactly zero) is not run

    def forward(self, x: torch.Tensor, return_masks: bool = False):
        """x: LongTensor [B, f] or a Batch -> logits [B]; with return_masks, also the list of each
        block's V_mask ([B, z_i], in block order; empty when the mask is switched off)."""
        if not self.deep_active:
            logits, masks = self.linear(x), []
        else:
            v_emb = self.embedding(x).flatten(1)  # [B, m]  (Eq. 4)
            logits, masks = self._forward_from_embedding(v_emb)
            if self.linear is not None:
                logits = logits + self.linear(x)  # the first-order term (not in the paper)
        if return_masks:
            return logits, [m for m in masks if m is not None]
        return logits

    # LR first (training.factor_phase): the embedding is what phase 2 brings in
    def factor_tables(self) -> list[FieldEmbedding]:
        return [self.embedding] if self.linear is not None else []

    @torch.no_grad()
    def hold_second_phase(self) -> None:
        # with the prediction layer at zero the deep part adds exactly nothing: the model is LR, and
        # phase 2 starts from LR's logit (its gradient flows in through the prediction layer first)
        self.prediction.weight.zero_()
        self.prediction.bias.zero_()
        self.deep_active = False

    def release_second_phase(self, generator: torch.Generator) -> None:
        self.deep_active = True

    def set_phase(self, second: bool) -> None:
        self.deep_active = second or self.linear is None

    def unused_in_first_phase(self) -> list[str]:
        return [name for name, _ in self.named_parameters() if not name.startswith("linear.")] if self.linear is not None else []


def serial_blocks(num_fields: int, cfg: ModelConfig) -> nn.ModuleList:
    """SerMaskNet's blocks: the first on the embedding, each next one on the previous one's output."""
    blocks, width = [], num_fields * cfg.embedding_dim
    for i in range(cfg.num_blocks):
        block = MaskBlock(num_fields, cfg.embedding_dim, width, cfg, on_embedding=(i == 0))
        blocks.append(block)
        width = block.output_dim
    return nn.ModuleList(blocks)


def serial_forward(blocks: nn.ModuleList, v_emb: torch.Tensor) -> tuple[torch.Tensor, list]:
    """V_emb [B, m] -> (the last block's output [B, q], each block's V_mask)."""
    h, masks = v_emb, []
    for block in blocks:
        h, v_mask = block(v_emb, h)  # every block's mask reads the raw V_emb
        masks.append(v_mask)
    return h, masks


def parallel_blocks(num_fields: int, cfg: ModelConfig) -> tuple[nn.ModuleList, MLP]:
    """ParaMaskNet's blocks, all on the embedding, and the top MLP over their concatenation (Eq. 15-16)."""
    width = num_fields * cfg.embedding_dim
    blocks = nn.ModuleList(MaskBlock(num_fields, cfg.embedding_dim, width, cfg, on_embedding=True) for _ in range(cfg.num_blocks))
    merge_width = sum(b.output_dim for b in blocks)  # u * q  (Eq. 15)
    return blocks, MLP(merge_width, cfg.top_mlp, cfg.dropout)  # Eq. 16


def parallel_forward(blocks: nn.ModuleList, top: MLP, v_emb: torch.Tensor) -> tuple[torch.Tensor, list]:
    """V_emb [B, m] -> (the top MLP's output, each block's V_mask)."""
    outputs, masks = [], []
    first = blocks[0]
    # LN_EMB's (x - mean) / std is the same for every block: computed once, each block
    # applies its own gain and bias (the paper's per-block LN_EMB, computed once not u times)
    normed = None
    if first.emb_norm is not None:
        normed = first.emb_norm.normalize(v_emb.view(-1, first.num_fields, first.embedding_dim))
    for block in blocks:
        h, v_mask = block(v_emb, v_emb, normed)
        outputs.append(h)
        masks.append(v_mask)
    v_merge = torch.cat(outputs, dim=1)  # [B, u*q]
    return top(v_merge), masks


class SerialMaskNet(_MaskNet):
    """SerMaskNet: MaskBlock on feature embedding, then (num_blocks - 1) MaskBlocks on MaskBlock."""

    def __init__(self, cardinalities: Sequence[int], cfg: ModelConfig, multi_valued: Sequence[MultiValuedField] = ()):
        super().__init__(cardinalities, cfg, multi_valued)
        self.blocks = serial_blocks(self.num_fields, cfg)
        self.prediction = nn.Linear(self.blocks[-1].output_dim, 1)  # Eq. 17

    def _forward_from_embedding(self, v_emb: torch.Tensor):
        h, masks = serial_forward(self.blocks, v_emb)
        return dense(self.prediction, h).squeeze(-1), masks


class ParallelMaskNet(_MaskNet):
    """ParaMaskNet: num_blocks MaskBlocks on feature embedding side by side, concat, top MLP."""

    search_space: SearchSpace = {**MASKNET_SPACE, "model.top_mlp": Layers(widths=(100, 200, 400, 800), depths=(1, 2, 3))}
    config_fields = (*_MaskNet.config_fields, "top_mlp")

    def __init__(self, cardinalities: Sequence[int], cfg: ModelConfig, multi_valued: Sequence[MultiValuedField] = ()):
        super().__init__(cardinalities, cfg, multi_valued)
        self.blocks, self.top = parallel_blocks(self.num_fields, cfg)
        self.prediction = nn.Linear(self.top.output_dim, 1)  # Eq. 17

    def _forward_from_embedding(self, v_emb: torch.Tensor):
        h, masks = parallel_forward(self.blocks, self.top, v_emb)
        return dense(self.prediction, h).squeeze(-1), masks
