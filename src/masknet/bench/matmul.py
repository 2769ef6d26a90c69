"""The machine's matrix-multiply throughput at the model's own matmul shapes.

`record_matmuls` runs one training step (forward + backward) of the model and records every
mm / addmm / bmm it dispatches, with operand shapes and whether each operand is a transposed
view (the backward multiplies by W and by X^T, which BLAS handles differently). `gemm_rate`
replays each recorded matmul on random tensors of the requested dtype with the current torch
thread count and returns the achieved throughput over the whole step:

    rate = Σ FLOPs of the recorded matmuls / Σ their measured times

so shapes weigh as much as they cost. With the model's FLOPs per sample (flops.py) this gives the
roofline: samples/s = rate / FLOPs per sample; a training run's roofline fraction is its
samples/s over that.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_MATMULS = {aten.mm.default: "mm", aten.addmm.default: "addmm", aten.bmm.default: "bmm"}


def _layout(t: torch.Tensor) -> tuple[tuple[int, ...], bool]:
    """(shape, transposed): transposed when the last two dims are a transposed contiguous view."""
    transposed = t.dim() >= 2 and not t.is_contiguous() and t.transpose(-1, -2).is_contiguous()
    return tuple(t.shape), transposed


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS:
            operands = args[1:3] if func is aten.addmm.default else args[0:2]
            self.ops[(_MATMULS[func], *(_layout(t) for t in operands))] += 1
        return func(*args, **(kwargs or {}))


def record_matmuls(model: torch.nn.Module, x: torch.Tensor) -> Counter:
    """Every matmul of one forward + backward on batch x: {(op, (shape, transposed) x2): count}."""
    model.train()
    with _Recorder() as rec:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return rec.ops


def _operand(shape: tuple[int, ...], transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    if not transposed:
        return torch.randn(shape, dtype=dtype)
    return torch.randn((*shape[:-2], shape[-1], shape[-2]), dtype=dtype).transpose(-1, -2)


def _matmul_flops(op: str, a: tuple[int, ...], b: tuple[int, ...]) -> float:
    batch = a[0] if op == "bmm" else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


@dataclass
class GemmRate:
    gflops: float  # achieved GFLOP/s over the step's matmuls
    step_flops: float  # FLOPs of the recorded matmuls
    shapes: int  # distinct matmuls replayed


def gemm_rate(ops: Counter, dtype: torch.dtype, min_seconds: float = 0.05, repeats: int = 3) -> GemmRate:
    """Replay each recorded matmul (best of `repeats` timings of >= min_seconds each)."""
    total_flops = total_time = 0.0
    for (op, (sa, ta), (sb, tb)), count in ops.items():
        a, b = _operand(sa, ta, dtype), _operand(sb, tb, dtype)
        bias = torch.randn(sb[-1], dtype=dtype) if op == "addmm" else None
        fn = (lambda: torch.addmm(bias, a, b)) if op == "addmm" else (lambda: torch.bmm(a, b)) if op == "bmm" else (lambda: torch.mm(a, b))
        fn()  # warm-up (packing, oneDNN primitive creation)
        best = float("inf")
        for _ in range(repeats):
            n, t0 = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= min_seconds:
                    break
            best = min(best, elapsed / n)
        flops = _matmul_flops(op, sa, sb)
        total_flops += count * flops
        total_time += count * best
    return GemmRate(gflops=total_flops / total_time / 1e9 if total_time else 0.0, step_flops=total_flops, shapes=len(ops))
