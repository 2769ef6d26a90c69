"""Where a MaskNet step's time goes, by kind of work (issue 21; docs/performance.md, "Profile").

Over `--steps` training steps (the trainer's `train_step`) or prediction forwards (eval,
inference_mode) of the paper's config at batch `--batch`, every aten / oneDNN op is timed as it
runs, by wall clock and by process CPU time (a TorchDispatchMode around each call: the mode's own
Python runs outside the timed interval). Each op (name, input shapes) is charged its mean process
CPU time per call x its calls per step (CPU time does not count the time a co-tenant holds the
core, so the ops and the rest add up to the step's CPU time; with --torch-profiler, wall time, the
MEDIAN per call: a co-tenant that deschedules the process mid-op inflates that one call, and a
mean would charge it to whatever op was running). The ops are grouped by what they do
(GEMMs, LayerNorms, ReLU, the mask multiply, embedding + LazyAdam, ...); what the timed ops do not
cover (Python, autograd bookkeeping) is the step's unprofiled time minus their sum.

torch.profiler (`--torch-profiler`, wall time per op) was the first tool: on this machine it
inflates some elementwise ops several times (threshold_backward [1024, 800]: 2.7 ms per call under
the profiler, 0.45 ms without it, timed directly in the step), so it is not the default.

    python benchmarks/profile_step.py --model sermasknet --mode train [--threads 2] [--batch 1024] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from masknet.config import ModelConfig, TrainConfig
from masknet.data.synthetic import cardinalities, generate
from masknet.models import build_model
from masknet.training.memory import keep_freed_memory
from masknet.training.trainer import Optimizer, train_step

EMBEDDING_OPS = {
    "aten::sort", "aten::_unique2", "aten::index_add_", "aten::index_copy_", "aten::index", "aten::scatter_add_",
    "aten::arange", "aten::index_select", "aten::embedding", "aten::sqrt", "aten::div", "aten::sub_", "aten::mul_", "aten::add_",
}
FINITE_OPS = {"aten::linalg_vector_norm", "aten::_foreach_norm", "aten::isfinite", "aten::stack", "aten::all", "aten::abs",
              "aten::ne", "aten::eq", "aten::item", "aten::_local_scalar_dense"}


def _field_rows(shapes: list) -> bool:
    """An operand [B, f, k] or [B·f, k] of LN_EMB (k <= 64, many rows), or its [.., 1] statistics."""
    s = shapes[0] if shapes and isinstance(shapes[0], list) and shapes[0] else []
    return (len(s) == 3 and s[-1] <= 64) or (len(s) == 2 and s[0] >= 8192 and s[1] <= 64)


def category(name: str, shapes: list) -> str:
    """What an op does in a MaskNet step (the rows of docs/performance.md's profile table)."""
    rows_2d = _field_rows(shapes) and len(shapes[0]) == 2  # field_normalize's [B·f, k] (3-D: the gain's terms)
    if rows_2d and name in ("aten::mv", "aten::addmv_", "aten::sub", "aten::rsqrt", "aten::mul", "aten::mul_", "aten::add", "aten::new_full", "aten::fill_"):
        return "LN_EMB per-field forward"  # field_normalize's GEMV form (prediction)
    if "linear_pointwise" in name or name in ("aten::mm", "aten::addmm"):
        return "GEMM (forward + backward products, oneDNN or MKL)"
    if "layer_norm" in name:
        return ("LN_EMB per-field " if _field_rows(shapes) else "LayerNorm ") + ("backward" if "backward" in name else "forward")
    if name in ("aten::threshold_backward", "aten::clamp_min_", "aten::relu_", "aten::clamp_min"):
        return "ReLU after LayerNorm, ReLU backward"
    if name == "aten::_fused_adam_":
        return "dense Adam (fused)"
    if name in EMBEDDING_OPS:
        return "embedding gather, sparse gradient, LazyAdam"
    if name in ("aten::copy_", "aten::clone", "aten::contiguous"):
        return "copies (X^T for dW, gradient layouts)"
    if name in ("aten::mul", "aten::addcmul"):
        return "mask multiply, LN_EMB gain and bias"
    if name == "aten::sum":
        return "bias and gain gradients (column sums)"
    if "log_sigmoid" in name or "binary_cross" in name or "sigmoid" in name:
        return "loss"
    if name in FINITE_OPS:
        return "finite-gradient check"
    return "other ops (views, allocation, cat, ...)"


class _OpTimer(TorchDispatchMode):
    """Wall and process-CPU seconds of every op call: {(name, shapes): [(wall, cpu, shapes), ...]}."""

    def __init__(self):
        super().__init__()
        self.calls = defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0, c0 = time.perf_counter(), time.process_time()
        out = func(*args, **(kwargs or {}))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        shapes = [list(a.shape) if isinstance(a, torch.Tensor) else [] for a in args]
        self.calls[(f"{func.namespace}::{func._opname}", str(shapes))].append((wall, cpu, shapes))
        return out


def _torch_profiler_calls(fn, steps: int) -> dict:
    """torch.profiler's self time per op call (wall): {(name, shapes): [(wall, None, shapes), ...]}."""
    calls = defaultdict(list)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(steps):
            fn(i)
    for e in prof.events():
        calls[(e.name, str(e.input_shapes))].append((e.self_cpu_time_total / 1e6, None, e.input_shapes))
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sermasknet")
    ap.add_argument("--mode", choices=("train", "predict"), default="train")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=12, help="print this many single ops too")
    ap.add_argument("--json")
    ap.add_argument("--torch-profiler", action="store_true", help="torch.profiler's wall time per op instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    n, rows = 16, args.batch
    ds = generate(int(n * rows / 0.8) + 100, seed=0)
    x = torch.from_numpy(ds.splits["train"].x[: n * rows].astype("int64"))
    y = torch.from_numpy(ds.splits["train"].y[: n * rows].astype("float32"))
    data = [(x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows]) for i in range(n)]
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=args.model), cardinalities())
    tcfg = TrainConfig()
    opt = Optimizer(model, tcfg)
    if args.mode == "train":
        def fn(i):
            train_step(model, opt, *data[i % n], tcfg)
    else:
        model.eval()

        def fn(i):
            with torch.inference_mode():
                model(data[i % n][0])
    for i in range(8):
        fn(i)
    load0 = os.getloadavg()[0]
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(args.steps):
        fn(i)
    cpu_ms, wall_ms = (1000 * (time.process_time() - c0) / args.steps, 1000 * (time.perf_counter() - t0) / args.steps)
    if args.torch_profiler:
        calls, clock = _torch_profiler_calls(fn, args.steps), 0
    else:
        with _OpTimer() as timer:
            for i in range(args.steps):
                fn(i)
        calls, clock = timer.calls, 1  # process CPU time per op
    groups, ops = defaultdict(float), []
    for (name, shapes), v in calls.items():
        per_call = statistics.median if clock == 0 else statistics.fmean  # CPU time: descheduling does not inflate it
        ms = 1000 * per_call(c[clock] for c in v) * len(v) / args.steps
        groups[category(name, v[0][2])] += ms
        ops.append((ms, name, shapes))
    step_ms = wall_ms if args.torch_profiler else cpu_ms
    groups["not in an op: Python, autograd, dispatch (step minus the ops)"] = max(0.0, step_ms - sum(groups.values()))
    total = sum(groups.values())
    print(f"{args.model} {args.mode}, batch {args.batch}, {args.threads} threads, {args.steps} steps: unprofiled "
          f"{wall_ms:.1f} ms wall / {cpu_ms:.1f} ms process CPU per step; shares of the "
          f"{'wall time, ops at their median per call' if args.torch_profiler else 'process CPU time, ops at their mean per call'}; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<48} {ms:7.2f} ms {100 * ms / total:5.1f}%")
    print("  largest single ops:")
    for ms, name, shapes in sorted(ops, reverse=True)[: args.top]:
        print(f"    {ms:6.2f} ms  {name} {shapes[:80]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "mode": args.mode, "threads": args.threads, "batch": args.batch,
                       "wall_ms": wall_ms, "cpu_ms": cpu_ms, "profile_ms": total, "groups": groups,
                       "load_avg_1m": load0}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
