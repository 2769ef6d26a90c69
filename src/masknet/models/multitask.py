"""Multi-task models on the existing backbones: one logit per task and row.

Shapes: B = batch, f = fields, k = embedding size, m = f*k, T = tasks, E = experts, d = a
backbone's output width (the input of its prediction layer).

    V_emb        = concat(e_1..e_f)                          one embedding, shared by every task   [B, m]
    shared_bottom: h   = body(V_emb)                          the backbone without its prediction    [B, d]
                   y_t = tower_t(h)                           per task: ReLU MLP (tower_hidden) + Linear(·, 1)
    mmoe         : h_e = body_e(V_emb), e = 1..E              E experts, each a whole backbone       [B, E, d]
                   g_t = softmax(W_t V_emb)                   a gate per task over the experts       [B, E]
                   y_t = tower_t(Σ_e g_t,e h_e)               (Ma et al., KDD 2018, "MMoE")
    output       : [y_1 .. y_T]                               logits [B, T]; sigmoids in loss/predict

Backbones (`model.name`): sermasknet (the last MaskBlock's output, q wide), paramasknet (the
top MLP's output), dnn (the last hidden layer) and dcnv2 ([x_L ; MLP(x_0)], as DCN-V2's own
prediction layer reads). Their bodies are built from the same functions as the single-task
models, so a body computes exactly what the single-task model feeds its prediction layer.
Choices (docs/multitask.md): the experts share the embedding (as MMoE's paper and its
open implementations do: the embedding is most of the parameters); the gates read the raw
V_emb; towers are one ReLU layer of `tower_hidden` (OPEN).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..data.batch import MultiValuedField
from .base import CTRModel
from .dcn import CrossLayerV2, cross_and_deep
from .layers import MLP, FieldEmbedding, dense
from .masknet import parallel_blocks, parallel_forward, serial_blocks, serial_forward


class SerialMaskNetBody(nn.Module):
    """SerMaskNet without its prediction layer: V_emb [B, m] -> the last block's output [B, q]."""

    def __init__(self, num_fields: int, cfg: ModelConfig):
        super().__init__()
        self.blocks = serial_blocks(num_fields, cfg)
        self.output_dim = self.blocks[-1].output_dim

    def forward(self, v_emb: torch.Tensor) -> torch.Tensor:
        return serial_forward(self.blocks, v_emb)[0]


class ParallelMaskNetBody(nn.Module):
    """ParaMaskNet without its prediction layer: V_emb [B, m] -> the top MLP's output."""

    def __init__(self, num_fields: int, cfg: ModelConfig):
        super().__init__()
        self.blocks, self.top = parallel_blocks(num_fields, cfg)
        self.output_dim = self.top.output_dim

    def forward(self, v_emb: torch.Tensor) -> torch.Tensor:
        return parallel_forward(self.blocks, self.top, v_emb)[0]


class DNNBody(nn.Module):
    """DNN without its output unit: V_emb [B, m] -> the last hidden layer."""

    def __init__(self, num_fields: int, cfg: ModelConfig):
        super().__init__()
        self.mlp = MLP(num_fields * cfg.embedding_dim, cfg.dnn_hidden, cfg.dropout)
        self.output_dim = self.mlp.output_dim

    def forward(self, v_emb: torch.Tensor) -> torch.Tensor:
        return self.mlp(v_emb)


class DCNV2Body(nn.Module):
    """DCN-V2 (parallel) without its output unit: V_emb [B, m] -> [x_L ; MLP(x_0)]."""

    def __init__(self, num_fields: int, cfg: ModelConfig):
        super().__init__()
        m = num_fields * cfg.embedding_dim
        self.cross = nn.ModuleList(CrossLayerV2(m) for _ in range(cfg.cross_layers))
        self.mlp = MLP(m, cfg.dnn_hidden, cfg.dropout)
        self.output_dim = m + self.mlp.output_dim

    def forward(self, v_emb: torch.Tensor) -> torch.Tensor:
        return cross_and_deep(self.cross, self.mlp, v_emb)


BODIES: dict[str, type[nn.Module]] = {
    "sermasknet": SerialMaskNetBody,
    "paramasknet": ParallelMaskNetBody,
    "dnn": DNNBody,
    "dcnv2": DCNV2Body,
}


class Tower(nn.Sequential):
    """One task's head: ReLU MLP (tower_hidden) + Linear(·, 1). [B, d] -> [B]."""

    def __init__(self, input_dim: int, cfg: ModelConfig):
        mlp = MLP(input_dim, cfg.tower_hidden, cfg.dropout)
        super().__init__(mlp, nn.Linear(mlp.output_dim, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mlp, output = self
        return dense(output, mlp(h)).squeeze(-1)  # the output unit on the fast GEMM too (layers.dense)


class TaskViews(torch.autograd.Function):
    """h [B, ...] -> one view of h per task; backward: the first task's gradient plus each other task's
    times `scale`, with (`project`) the part of it that conflicts with the first task's removed row by row.

    Row b's loss depends on row b of h alone, so row b of a task's gradient at h is that sample's own
    gradient: PCGrad (Yu et al., NeurIPS 2020) per sample, kept one-sided (the first task is the main
    one, only the others yield): where <g_t[b], g_0[b]> < 0, g_t[b] -= <g_t[b], g_0[b]> / |g_0[b]|^2 g_0[b].
    One backward pass; the forward is the identity (eval and the ONNX graph never see this)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, tasks: int, scale: float, project: bool):  # type: ignore[override]
        ctx.scale, ctx.project = scale, project
        return tuple(h.view_as(h) for _ in range(tasks))

    @staticmethod
    def backward(ctx, first: torch.Tensor, *others: torch.Tensor):  # type: ignore[override]
        total = first
        rows = first.flatten(1)
        norm2 = (rows * rows).sum(1, keepdim=True)
        for g in others:
            if ctx.project:
                flat = g.flatten(1)
                dot = (flat * rows).sum(1, keepdim=True)
                coef = torch.where(dot < 0, dot / norm2.clamp_min(torch.finfo(norm2.dtype).tiny), torch.zeros_like(dot))
                g = (flat - coef * rows).view_as(g)
            total = total + ctx.scale * g
        return total, None, None, None


class MultiTaskModel(CTRModel):
    """Shared-bottom or MMoE over `cfg.name`'s body; forward(x [B, f] or a data.batch.Batch) -> logits [B, T].

    `tasks` names the outputs in order (the labels they are trained on); `multi_valued` fields are
    pooled into their one field embedding each, as in every single-task model."""

    def __init__(
        self, cardinalities: Sequence[int], cfg: ModelConfig, tasks: Sequence[str], multi_valued: Sequence[MultiValuedField] = ()
    ):
        super().__init__(cardinalities, cfg, multi_valued)
        if cfg.multitask not in ("shared_bottom", "mmoe"):
            raise ValueError(f"MultiTaskModel needs model.multitask shared_bottom or mmoe, got {cfg.multitask!r}")
        self.tasks = list(tasks)
        self.embedding = FieldEmbedding(self.cardinalities, cfg.embedding_dim, multi_valued=self.multi_valued)
        body = BODIES[cfg.name]
        n_experts = cfg.num_experts if cfg.multitask == "mmoe" else 1
        self.experts = nn.ModuleList(body(self.num_fields, cfg) for _ in range(n_experts))
        width = self.experts[0].output_dim
        m = self.num_fields * cfg.embedding_dim
        self.gates = nn.ModuleList(nn.Linear(m, n_experts) for _ in self.tasks) if cfg.multitask == "mmoe" else None
        # task_blocks: each task but the first also reads its own MaskBlocks on V_emb (built last, so every
        # part before them starts from the same weights as without them)
        own = [0] + [cfg.block_dim if cfg.task_blocks else 0] * (len(self.tasks) - 1)
        self.towers = nn.ModuleList(Tower(width + w, cfg) for w in own)
        self.task_blocks = nn.ModuleList(
            serial_blocks(self.num_fields, replace(cfg, num_blocks=cfg.task_blocks)) for _ in self.tasks[1:]
        ) if cfg.task_blocks else None

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v_emb = self.embedding(x).flatten(1)  # [B, m]
        if self.gates is None:
            inputs = self._routed(self.experts[0](v_emb))  # [B, d] per task: the same tensor, routed for training
        elif self._surgery():  # each task's gate and mixture gets its own view of the shared V_emb and experts
            h = torch.stack([e(v_emb) for e in self.experts], dim=1)  # [B, E, d]
            inputs = [self._mixture(gate, v, hv, False) for gate, v, hv in zip(self.gates, self._routed(v_emb), self._routed(h))]
        else:
            detached = self.cfg.shared_gradient == "first" and self.training  # only task 0 trains the shared parts
            h = torch.stack([e(v_emb) for e in self.experts], dim=1)  # [B, E, d]
            inputs = [self._mixture(gate, v_emb, h, detached and t > 0) for t, gate in enumerate(self.gates)]
        if self.task_blocks is not None:  # the other tasks' own blocks, on V_emb routed as the bottom is (never projected)
            own = self._routed(v_emb, project=False)[1:]
            inputs = inputs[:1] + [torch.cat([i, serial_forward(b, v)[0]], dim=-1) for i, b, v in zip(inputs[1:], self.task_blocks, own)]
        return torch.stack([tower(i) for tower, i in zip(self.towers, inputs)], dim=1)  # [B, T]

    def _surgery(self) -> bool:
        """Whether training routes the other tasks' gradients through TaskViews (scaled or projected)."""
        cfg = self.cfg
        return self.training and self.num_tasks > 1 and (cfg.shared_gradient == "pcgrad" or (
            cfg.shared_gradient == "all" and cfg.shared_gradient_scale != 1.0))

    def _routed(self, t: torch.Tensor, project: bool = True) -> list[torch.Tensor]:
        """A shared tensor as each task's input: one per task; their gradients combined as model.shared_gradient says."""
        cfg = self.cfg
        if self._surgery():
            return list(TaskViews.apply(t, self.num_tasks, cfg.shared_gradient_scale, project and cfg.shared_gradient == "pcgrad"))
        detached = cfg.shared_gradient == "first" and self.training
        return [t] + [t.detach() if detached else t] * (self.num_tasks - 1)

    @staticmethod
    def _mixture(gate: nn.Module, v_emb: torch.Tensor, h: torch.Tensor, detached: bool) -> torch.Tensor:
        if detached:
            v_emb, h = v_emb.detach(), h.detach()
        return (torch.softmax(dense(gate, v_emb), dim=-1).unsqueeze(-1) * h).sum(dim=1)

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """MMoE's gate outputs [B, T, E] (which experts each task reads); for the analysis."""
        if self.gates is None:
            raise ValueError("a shared-bottom model has no gates")
        v_emb = self.embedding(x).flatten(1)
        return torch.stack([torch.softmax(dense(g, v_emb), dim=-1) for g in self.gates], dim=1)
