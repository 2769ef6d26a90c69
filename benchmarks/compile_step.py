"""Does torch.compile pay for the training step on this CPU? (issue 21, "What to build" 1)

Two copies of a MaskNet with the same weights train on the same batches in alternating rounds
(eager, compiled, eager, ...; medians of the rounds), each with the trainer's own step
(`train_step`: loss, backward, finite check, lazy Adam + fused Adam):

- eager: what `fit` runs (linear layers on oneDNN with the hand-written backward, layers.dense);
- compiled: `torch.compile` of the body after the embedding lookup (`_forward_from_embedding`;
  Inductor cannot compile the sparse embedding gradient). Under compilation `layers.linear`
  hands Inductor plain aten.linear, so Inductor chooses the GEMMs and fuses the elementwise work.

    python benchmarks/compile_step.py [--model sermasknet] [--threads 2] [--rounds 5] [--steps 10]

Prints samples/s of each, the ratio compiled / eager, the compile time and the load average.
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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    load_start = os.getloadavg()[0]
    cards, tcfg = cardinalities(), TrainConfig()
    torch.manual_seed(0)
    eager = build_model(ModelConfig(name=args.model), cards)
    compiled = build_model(ModelConfig(name=args.model), cards)
    compiled.load_state_dict(eager.state_dict())
    compiled._forward_from_embedding = torch.compile(compiled._forward_from_embedding)
    steps = {"eager": (eager, Optimizer(eager, tcfg)), "compiled": (compiled, Optimizer(compiled, tcfg))}
    data = batches(16)

    def run(name: str, n: int) -> float:
        model, opt = steps[name]
        t0 = time.perf_counter()
        for i in range(n):
            train_step(model, opt, *data[i % len(data)], tcfg)
        return time.perf_counter() - t0

    compile_s = run("compiled", 1)  # first call compiles forward and backward
    run("compiled", 2), run("eager", 3)  # warm-up: optimizer state, oneDNN primitives
    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for name in rates:
            rates[name].append(args.steps * 1024 / run(name, args.steps))
    ratios = [c / e for c, e in zip(rates["compiled"], rates["eager"])]
    print(f"{args.model}, {args.threads} threads, {args.rounds} rounds of {args.steps} steps, batch 1024")
    for name, r in rates.items():
        print(f"  {name:<9} {statistics.median(r):>8,.0f} samples/s (rounds {min(r):,.0f}-{max(r):,.0f})")
    print(f"  compiled / eager {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}); "
          f"first compiled step {compile_s:.1f} s")
    print(f"load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
