"""Does torch.compile pay for the training step on this CPU? (issue 21, "What to build" 1)

Copies of a MaskNet with the same weights train on the same batches in alternating rounds
(eager, compiled, compiled-aten, eager, ...; medians of the rounds), each with the trainer's own
step (`train_step`: loss, backward, finite check, lazy Adam + fused Adam):

- eager: what `fit` runs (linear layers on oneDNN with the hand-written backward, layers.dense);
- compiled: `torch.compile` of the body after the embedding lookup (`_forward_from_embedding`;
  Inductor cannot compile the sparse embedding gradient), the linear layers kept on oneDNN as
  opaque custom ops (layers.set_compile_gemm("onednn")): Inductor fuses only the elementwise work
  between them (LN_EMB, mask multiply, LayerNorm, ReLU, their backward);
- compiled-aten: the same, the linear layers handed to Inductor as plain aten.linear (it picks the
  GEMMs: MKL for fp32 training on the CPU).

    python benchmarks/compile_step.py [--model sermasknet] [--threads 2] [--rounds 5] [--steps 10]
        [--variants eager,compiled,compiled-aten]

Prints samples/s of each, the ratio to eager, the compile time and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from masknet.config import ModelConfig, TrainConfig
from masknet.data.synthetic import cardinalities, generate
from masknet.models import build_model
from masknet.models.layers import set_compile_gemm
from masknet.training.memory import keep_freed_memory
from masknet.training.trainer import Optimizer, train_step


def batches(n: int, rows: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds = generate(int(n * rows / 0.8) + 10, seed=0)
    x = torch.from_numpy(ds.splits["train"].x[: n * rows].astype("int64"))
    y = torch.from_numpy(ds.splits["train"].y[: n * rows].astype("float32"))
    return [(x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows]) for i in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sermasknet")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="training steps per round")
    ap.add_argument("--variants", default="eager,compiled,compiled-aten")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    load_start = os.getloadavg()[0]
    cards, tcfg = cardinalities(), TrainConfig()
    torch.manual_seed(0)
    names = args.variants.split(",")
    first = build_model(ModelConfig(name=args.model), cards)
    steps = {}
    for name in names:
        model = build_model(ModelConfig(name=args.model), cards)
        model.load_state_dict(first.state_dict())
        if name != "eager":
            model._forward_from_embedding = torch.compile(model._forward_from_embedding)
        steps[name] = (model, Optimizer(model, tcfg))
    data = batches(16)

    def run(name: str, n: int) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of n steps."""
        set_compile_gemm("aten" if name == "compiled-aten" else "onednn")  # read when Dynamo traces (and guarded)
        model, opt = steps[name]
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            train_step(model, opt, *data[i % len(data)], tcfg)
        return time.perf_counter() - t0, time.process_time() - c0

    compile_s = {name: run(name, 1)[0] for name in names if name != "eager"}  # first call compiles forward and backward
    for name in names:
        run(name, 3)  # warm-up: optimizer state, oneDNN primitives
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in rates:
            wall, cpu = run(name, args.steps)
            rates[name].append((args.steps * 1024 / wall, args.steps * 1024 / cpu))
    print(f"{args.model}, {args.threads} threads, {args.rounds} rounds of {args.steps} steps, batch 1024")
    for clock, i in (("wall", 0), ("per CPU second", 1)):
        base = [r[i] for r in rates[names[0]]]
        for name, rs in rates.items():
            r = [x[i] for x in rs]
            ratios = [a / b for a, b in zip(r, base)]
            extra = f"  first step {compile_s[name]:.1f} s" if name in compile_s and i == 0 else ""
            print(f"  {name:<14} {statistics.median(r):>8,.0f} samples/s {clock} (rounds {min(r):,.0f}-{max(r):,.0f}); "
                  f"/ {names[0]} {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}){extra}")
    print(f"load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
