"""A/B of the non-GEMM changes of issue 21 in one process, alternating rounds (medians).

Each change is measured against the same-run baseline, with everything else as the library runs it:

- field-norm: LN_EMB's per-field normalization as F.layer_norm (A) or layers.field_normalize (B,
  the GEMV form), in prediction at batch 1024 (field-norm-train: the training step; since
  field_normalize runs F.layer_norm under autograd, A and B are the same code there now);
- mask-fused (only at the commit that had it, 2b82eef): prediction with the mask multiply as its
  own pass (A) or in the projection GEMM's binary post-op (B); measured 0.997x, so not kept;
- gemm-train, gemm-predict: the linear layers' kernels (layers.GEMM_BACKENDS), each against the
  first of `--gemm` (default torch,hybrid,onednn: MKL's nn.Linear; oneDNN forward + MKL backward;
  oneDNN both ways), in the training step and in prediction at batch 1024 and 8192.

    python benchmarks/elementwise_ab.py [--model sermasknet] [--threads 1] [--rounds 9] [--steps 10] [--reps 20]

Prints, per case, samples/s of A and B by wall time and per process-CPU second (on a shared
machine the CPU figure is the one the load disturbs least), the ratio B / A (median of the
per-round ratios) and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from masknet.config import ModelConfig, TrainConfig
from masknet.data.synthetic import cardinalities, generate
from masknet.models import build_model
from masknet.models.layers import FieldLayerNorm, using_gemm_backend
from masknet.training.memory import keep_freed_memory
from masknet.training.trainer import Optimizer, train_step

GEMV_NORMALIZE = FieldLayerNorm.normalize


def layer_norm_normalize(self, x):
    return F.layer_norm(x, (self.dim,), eps=self.eps)


def batches(n: int, rows: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds = generate(int(n * rows / 0.8) + 10, seed=0)
    x = torch.from_numpy(ds.splits["train"].x[: n * rows].astype("int64"))
    y = torch.from_numpy(ds.splits["train"].y[: n * rows].astype("float32"))
    return [(x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows]) for i in range(n)]


def timed(fn, n: int) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    return time.perf_counter() - t0, time.process_time() - c0


def compare(name: str, a, b, n: int, rows: int, rounds: int) -> None:
    """A against B in alternating rounds: `compare_variants` with the two."""
    compare_variants(name, {"A": a, "B": b}, n, rows, rounds)


def compare_variants(name: str, variants: dict, n: int, rows: int, rounds: int) -> None:
    """samples/s of each variant (median of the rounds, which alternate) and its ratio to the
    first's (median and range of the per-round ratios), by wall time and per process-CPU second."""
    for f in variants.values():
        timed(f, 3)
    res: dict = {k: [] for k in variants}
    for _ in range(rounds):
        for k, f in variants.items():
            wall, cpu = timed(f, n)
            res[k].append((n * rows / wall, n * rows / cpu))
    first = next(iter(variants))
    for clock, i in (("wall", 0), ("CPU", 1)):
        cells = []
        for k in variants:
            ratios = [b[i] / a[i] for a, b in zip(res[first], res[k])]
            cells.append(f"{k} {statistics.median(r[i] for r in res[k]):>8,.0f}"
                         + ("" if k == first else f" ({statistics.median(ratios):.3f}x, {min(ratios):.3f}-{max(ratios):.3f})"))
        print(f"  {name:<26} {clock:<4} " + "  ".join(cells))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sermasknet")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=10, help="training steps per round")
    ap.add_argument("--reps", type=int, default=20, help="prediction batches per round")
    ap.add_argument("--cases", default="field-norm-predict")
    ap.add_argument("--gemm", default="torch,hybrid,onednn", help="GEMM backends for the gemm-* cases")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    load0 = os.getloadavg()[0]
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=args.model), cardinalities())
    tcfg = TrainConfig()
    opt = Optimizer(model, tcfg)
    data = batches(16)
    print(f"{args.model}, {args.threads} threads, {args.rounds} alternating rounds, batch 1024")

    def with_norm(normalize, fn):
        def run(i):
            FieldLayerNorm.normalize = normalize
            fn(i)
        return run

    def step(i):
        train_step(model, opt, *data[i % len(data)], tcfg)

    def predict(masks: bool):
        def run(i):
            with torch.inference_mode():
                model(data[i % len(data)][0])
        return run

    def on(backend: str, fn):
        def run(i):
            with using_gemm_backend(backend):
                fn(i)
        return run

    def predict_at(rows: int):
        x = torch.cat([b[0] for b in data])[:rows]

        def run(i):
            with torch.inference_mode():
                model(x)
        return run

    cases = args.cases.split(",")
    gemms = args.gemm.split(",")
    if "gemm-train" in cases:
        model.train()
        compare_variants("gemm train step", {g: on(g, step) for g in gemms}, args.steps, 1024, args.rounds)
    if "gemm-predict" in cases:
        model.eval()
        for rows in (1024, 8192):
            compare_variants(f"gemm predict@{rows}", {g: on(g, predict_at(rows)) for g in gemms},
                             max(1, args.reps * 1024 // rows), rows, args.rounds)
    if "field-norm-train" in cases:
        model.train()
        compare("field-norm train step", with_norm(layer_norm_normalize, step), with_norm(GEMV_NORMALIZE, step), args.steps, 1024, args.rounds)
    model.eval()
    if "field-norm-predict" in cases:
        compare("field-norm predict@1024", with_norm(layer_norm_normalize, predict(False)), with_norm(GEMV_NORMALIZE, predict(False)),
                args.reps, 1024, args.rounds)
    FieldLayerNorm.normalize = GEMV_NORMALIZE
    print(f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
