"""The roofline: the machine's matrix-multiply rate at the model's own products, in the layout and
kernel the step runs each of them with, and in the best layout and kernel this machine has.

`record_products` runs one training step's forward + backward (or one prediction forward) and
records every matrix product it dispatches: aten mm / addmm / bmm (MKL) and
mkldnn::_linear_pointwise (oneDNN, what models.layers.dense runs), each as

    C[M, N] = A[M, K] @ B[K, N]      (batched for bmm)

with the layout of A and B (row-major, or a transposed view) and the kernel. `Roofline` then
times each distinct product on random tensors

- as the step ran it: same kernel, same operand layouts (a oneDNN call on a transposed A
  includes the copy oneDNN makes of it, since the step pays it too);
- in every candidate of `_candidates`: MKL with A and B each stored either way, writing C or C^T;
  oneDNN with its row-major operand and the other either way, writing C or C^T;

picks each product's fastest candidate (medians of interleaved rounds), and replays the step's
products in three ways: the step's own layouts, the best layouts, the best MKL-only layouts
(PyTorch's default fp32 kernel, the reference of issue 21's 162 GFLOP/s). Each replay gives

    rate = Σ FLOPs / Σ time over the step's products (counted as often as the step runs them)

so shapes weigh as much as they cost. With the model's FLOPs per sample (flops.py) a rate is a
roofline: samples/s = rate / FLOPs per sample; a measured run's fraction is its samples/s over
that. Elementwise work, the optimizer and the embedding are outside the roofline: they are what
keeps a step below 1.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_MKL_OPS = {aten.mm.default: "mm", aten.addmm.default: "addmm", aten.bmm.default: "bmm"}
_ONEDNN = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_ONEDNN_OPS = {_ONEDNN.default} if _ONEDNN is not None else set()


@dataclass(frozen=True)
class Product:
    """One matrix product as a step ran it. a_t / b_t: the operand is stored transposed (A as a
    column-major view, B likewise). For oneDNN (Y = X W^T): A = X, B = W^T."""

    m: int
    n: int
    k: int
    batch: int  # > 1 only for bmm
    bias: bool
    kernel: str  # "mkl": aten mm / addmm / bmm / linear (MKL for fp32, oneDNN for bf16); "onednn": mkldnn linear
    a_t: bool
    b_t: bool
    out_t: bool = False  # C^T written (C^T = B^T A^T): a candidate layout, never recorded
    relu: bool = False  # oneDNN's fused ReLU (as recorded)

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.n * self.k

    def shape_key(self) -> tuple:
        return (self.m, self.n, self.k, self.batch, self.bias)


def _transposed(t: torch.Tensor) -> bool:
    return t.dim() >= 2 and not t.is_contiguous() and t.transpose(-1, -2).is_contiguous()


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.products: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _MKL_OPS:
            op = _MKL_OPS[func]
            a, b = args[1:3] if op == "addmm" else args[0:2]
            batch = a.shape[0] if op == "bmm" else 1
            self.products[Product(a.shape[-2], b.shape[-1], a.shape[-1], batch, op == "addmm", "mkl", _transposed(a), _transposed(b))] += 1
        elif func is aten.linear.default:  # bf16 under inference_mode dispatches linear itself
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else None
            m = x.numel() // x.shape[-1]
            self.products[Product(m, w.shape[0], x.shape[-1], 1, bias is not None, "mkl", x.dim() == 2 and _transposed(x), w.is_contiguous())] += 1
        elif func in _ONEDNN_OPS:
            x, w, bias, attr = args[0], args[1], args[2], args[3]
            m = x.numel() // x.shape[-1]
            x_t = x.dim() == 2 and _transposed(x)
            # B = W^T: a contiguous W is a transposed B
            self.products[Product(m, w.shape[0], x.shape[-1], 1, bias is not None, "onednn", x_t, w.is_contiguous(), relu=attr == "relu")] += 1
        return func(*args, **(kwargs or {}))


def record_products(step: Callable[[], None]) -> Counter:
    """Every matrix product `step()` dispatches: {Product: times per call}."""
    with _Recorder() as rec:
        step()
    return rec.products


def _stored(rows: int, cols: int, transposed: bool, dtype: torch.dtype, batch: int = 1) -> torch.Tensor:
    """A [batch,] rows x cols operand, stored row-major or as a transposed (column-major) view."""
    lead = (batch,) if batch > 1 else ()
    if not transposed:
        return torch.randn(*lead, rows, cols, dtype=dtype)
    return torch.randn(*lead, cols, rows, dtype=dtype).transpose(-1, -2)


def _runner(p: Product, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A closure computing product p in p's own kernel and layouts, on fresh random operands."""
    a = _stored(p.m, p.k, p.a_t, dtype, p.batch)
    b = _stored(p.k, p.n, p.b_t, dtype, p.batch)
    if p.kernel == "onednn":
        attr = "relu" if p.relu else "none"
        if p.out_t:  # C^T = B^T A^T: X = B^T, W = A
            return lambda: _ONEDNN(b.transpose(-1, -2), a, None, attr, [], "")
        bias = torch.randn(p.n, dtype=dtype) if p.bias else None
        return lambda: _ONEDNN(a, b.transpose(-1, -2), bias, attr, [], "")
    if p.batch > 1:
        return lambda: torch.bmm(a, b)
    if p.out_t:
        at, bt = a.t(), b.t()
        if p.bias:
            bias_col = torch.randn(p.n, 1, dtype=dtype)
            return lambda: torch.addmm(bias_col, bt, at)
        return lambda: torch.mm(bt, at)
    if p.bias:
        bias = torch.randn(p.n, dtype=dtype)
        return lambda: torch.addmm(bias, a, b)
    return lambda: torch.mm(a, b)


def _candidates(p: Product, dtype: torch.dtype) -> list[Product]:
    """Every layout x kernel this module can time for p's shape (same FLOPs, bias as p)."""
    out = []
    for a_t in (False, True):
        for b_t in (False, True):
            outs = (False,) if p.batch > 1 else (False, True)
            out += [Product(p.m, p.n, p.k, p.batch, p.bias, "mkl", a_t, b_t, o) for o in outs]
    if _ONEDNN is not None and p.batch == 1 and dtype in (torch.float32, torch.bfloat16):
        out += [Product(p.m, p.n, p.k, 1, p.bias, "onednn", False, b_t) for b_t in (False, True)]
        if not p.bias:  # oneDNN's bias is per column of its output: C^T has none
            out += [Product(p.m, p.n, p.k, 1, False, "onednn", a_t, True, out_t=True) for a_t in (False, True)]
    return out


def _calls_for(fn: Callable[[], object], min_seconds: float) -> int:
    """How many calls make one timing of >= min_seconds (one warm-up call first)."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(min_seconds / once + 0.999))


def time_interleaved(fns: dict, rounds: int, min_seconds: float, cpu: bool = False) -> dict:
    """Median seconds per call of each fn, timed in `rounds` interleaved rounds (a shared
    machine's load drifts: every candidate sees the same drift). With `cpu`, the medians of
    process CPU seconds per call as well: {k: (wall, cpu)}."""
    calls = {k: _calls_for(f, min_seconds) for k, f in fns.items()}
    wall: dict = {k: [] for k in fns}
    cpu_s: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(calls[k]):
                f()
            wall[k].append((time.perf_counter() - t0) / calls[k])
            cpu_s[k].append((time.process_time() - c0) / calls[k])
    if not cpu:
        return {k: statistics.median(v) for k, v in wall.items()}
    return {k: (statistics.median(wall[k]), statistics.median(cpu_s[k])) for k in fns}


@dataclass
class Roofline:
    """The step's products with, for each, its own layout and its fastest candidates (overall
    and MKL only). `replay()` times all three over the step; `choose()` must have run."""

    products: Counter
    dtype: torch.dtype
    best: Optional[dict] = None  # Product -> fastest candidate
    best_mkl: Optional[dict] = None
    times: Optional[dict] = None  # Product -> {"step", "best", "best_mkl"}: median seconds in choose()

    @property
    def step_flops(self) -> float:
        return sum(n * p.flops for p, n in self.products.items())

    def choose(self, rounds: int = 5, min_seconds: float = 0.01) -> None:
        """Time every candidate of every distinct shape (interleaved rounds, medians) and keep the fastest."""
        self.best, self.best_mkl, self.times = {}, {}, {}
        by_shape: dict = {}
        for p in self.products:
            by_shape.setdefault(p.shape_key(), []).append(p)
        for same_shape in by_shape.values():
            cands = list(dict.fromkeys(_candidates(same_shape[0], self.dtype) + same_shape))
            t = time_interleaved({c: _runner(c, self.dtype) for c in cands}, rounds, min_seconds)
            best = min(cands, key=t.get)
            best_mkl = min((c for c in cands if c.kernel == "mkl"), key=t.get)
            for p in same_shape:
                self.best[p], self.best_mkl[p] = best, best_mkl
                self.times[p] = {"step": t[p], "best": t[best], "best_mkl": t[best_mkl]}

    def replay(self, rounds: int = 3, min_seconds: float = 0.005) -> dict[str, float]:
        """GFLOP/s over the step's products: in the step's layouts ("step"), the best ones
        ("best"), the best MKL ones ("best_mkl"); each product's three versions timed in
        interleaved rounds (medians). The same three per process-CPU second: "step_cpu", ...
        (with one thread, the figure a shared machine's load disturbs least)."""
        if self.best is None:
            self.choose()
        total = {k: 0.0 for k in ("step", "best", "best_mkl", "step_cpu", "best_cpu", "best_mkl_cpu")}
        for p, count in self.products.items():
            versions = {"step": p, "best": self.best[p], "best_mkl": self.best_mkl[p]}
            t = time_interleaved({k: _runner(v, self.dtype) for k, v in versions.items()}, rounds, min_seconds, cpu=True)
            # the step's own layout is a candidate too: where this round timed it (or the MKL
            # choice) faster than the chosen best, the choice was load noise and the faster counts
            for i, suffix in ((0, ""), (1, "_cpu")):
                own = {k: v[i] for k, v in t.items()}
                own["best"] = min(own.values())
                if p.kernel == "mkl":
                    own["best_mkl"] = min(own["best_mkl"], own["step"])
                for k in ("step", "best", "best_mkl"):
                    total[k + suffix] += count * own[k]
        return {k: self.step_flops / v / 1e9 if v else 0.0 for k, v in total.items()}

    def layouts(self) -> list[dict]:
        """Per product: shape, count, the step's layout, the best ones, and each one's time (ms, from choose)."""
        def name(p: Product) -> str:
            return f"{p.kernel}:{'At' if p.a_t else 'A'}{'Bt' if p.b_t else 'B'}{'->Ct' if p.out_t else ''}"
        return [
            {"m": p.m, "n": p.n, "k": p.k, "batch": p.batch, "count": n, "step": name(p),
             "best": name(self.best[p]) if self.best else None, "best_mkl": name(self.best_mkl[p]) if self.best_mkl else None,
             **({f"{k}_ms": 1000 * v for k, v in self.times[p].items()} if self.times else {})}
            for p, n in self.products.items()
        ]
