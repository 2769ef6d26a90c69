"""The embedding tables' update: lazy Adam on the rows a batch looked up.

`LazyAdam` computes torch.optim.SparseAdam's update (the same formula, state and parameter
groups, so checkpoints of either load into the other) without SparseAdam's sparse-tensor
machinery (a coalesce, two sparse_masks, three sparse additions): the unique rows the batch
looked up are found once (one sort), their gradients summed, and the rows gathered, updated
and written back: 0.46-0.63x SparseAdam's time per step for one batch's 40k lookups into
10k-3M-row tables (1 thread; benchmarks/embedding_update.py, docs/performance.md, which also
has dense fused Adam measured: faster below ~300k rows, but another update).

With U the looked-up rows, g their summed gradients and t the step (SparseAdam's formula):
    m_U <- m_U + (1 - b1) (g - m_U)        v_U <- v_U + (1 - b2) (g² - v_U)
    w_U <- w_U - lr sqrt(1 - b2^t) / (1 - b1^t) · m_U / (sqrt(v_U) + eps)
Rows not looked up keep their moments and values (dense Adam would decay them).
"""

from __future__ import annotations

import math

import torch


def _summed_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique row indices [U], their summed gradients [U, k]) of a sparse COO row gradient."""
    if grad.is_coalesced():
        return grad._indices()[0], grad._values()
    idx, values = grad._indices()[0], grad._values()
    rows, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    return rows, torch.zeros(len(rows), values.shape[1], dtype=values.dtype, device=values.device).index_add_(0, inverse, values)


class LazyAdam(torch.optim.Optimizer):
    """SparseAdam's update for embedding tables with sparse row gradients (see the module doc)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, maximize=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("LazyAdam needs sparse row gradients (FieldEmbedding with sparse=True)")
                grad = -p.grad if group["maximize"] else p.grad
                if grad._nnz() == 0:
                    continue
                state = self.state[p]
                if len(state) == 0:  # as SparseAdam: a step count and two moments the table's shape
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                _update_rows(p, grad, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, group["eps"], step_size)
        return loss


def _moments(g, m, v, beta1, beta2, eps, step_size):
    """New m, v and the parameter change, for gradient g and old moments m, v (same shapes).
    Written as SparseAdam writes it (old + (1 - b) (new - old)), so that it rounds alike."""
    m_new = (g - m).mul_(1 - beta1).add_(m)
    v_new = (g * g).sub_(v).mul_(1 - beta2).add_(v)
    change = m_new / v_new.sqrt().add_(eps)
    return m_new, v_new, change.mul_(-step_size)


def _update_rows(p, grad, exp_avg, exp_avg_sq, beta1, beta2, eps, step_size) -> None:
    rows, g = _summed_rows(grad)
    m_new, v_new, change = _moments(g, exp_avg[rows], exp_avg_sq[rows], beta1, beta2, eps, step_size)
    exp_avg.index_copy_(0, rows, m_new)
    exp_avg_sq.index_copy_(0, rows, v_new)
    p.index_add_(0, rows, change)
