"""Where a MaskNet step's time goes, by kind of work (issue 21; docs/performance.md, "Profile").

torch.profiler over `--steps` training steps (the trainer's `train_step`) or prediction forwards
(eval, inference_mode) of the paper's config at batch `--batch`. Each op (name, input shapes) is
charged its MEDIAN self time per call x its calls per step: on a shared machine a co-tenant that
descheduls this process mid-op inflates that one call, and a mean would charge it to whatever op
was running; the median does not. The ops are then grouped by what they do (GEMMs, LayerNorms,
ReLU, the mask multiply, embedding + LazyAdam, ...). The profiler times wall clock per op, so
under load every share is inflated alike; the unprofiled step's wall and process CPU time are
printed beside it.

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


def category(name: str, shapes: list, under: str = "") -> str:
    """What an op does in a MaskNet step (the rows of docs/performance.md's profile table);
    `under`: the autograd Function it runs in, if any."""
    if under.startswith("_FieldNormalize") or (_field_rows(shapes) and name in (
            "aten::mv", "aten::sub", "aten::rsqrt", "aten::mul", "aten::mul_", "aten::add", "aten::new_full", "aten::fill_")):
        return "LN_EMB per-field " + ("backward" if "Backward" in under or "backward" in name else "forward")
    if "linear_pointwise" in name or name in ("aten::mm", "aten::addmm"):
        return "GEMM (oneDNN: forward + 3 backward products)"
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
    return "other (views, allocation, autograd, Python)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sermasknet")
    ap.add_argument("--mode", choices=("train", "predict"), default="train")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=12, help="print this many single ops too")
    ap.add_argument("--json")
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
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(args.steps):
            fn(i)
    calls = defaultdict(list)
    for e in prof.events():
        under, p = "", e.cpu_parent
        while p is not None and not under:
            under = p.name if p.name.startswith("_FieldNormalize") else ""
            p = p.cpu_parent
        calls[(e.name, str(e.input_shapes), under)].append((e.self_cpu_time_total, e.input_shapes))
    groups, ops = defaultdict(float), []
    for (name, shapes, under), v in calls.items():
        ms = statistics.median(t for t, _ in v) / 1000 * len(v) / args.steps
        groups[category(name, v[0][1], under)] += ms
        ops.append((ms, name, shapes))
    total = sum(groups.values())
    print(f"{args.model} {args.mode}, batch {args.batch}, {args.threads} threads, {args.steps} steps: unprofiled "
          f"{wall_ms:.1f} ms wall / {cpu_ms:.1f} ms process CPU per step; profile (median self time x calls) "
          f"{total:.1f} ms per step; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
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
