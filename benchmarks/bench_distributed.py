"""Throughput of 1 vs N training processes (DDP on gloo), and communication time per step.

    python benchmarks/bench_distributed.py [--nproc 2] [--steps 30] [--batch-size 1024]

Each configuration runs under torchrun on the paper's SerMaskNet (39 fields x 10, 3 blocks x 400,
r = 2) with the built-in synthetic cardinalities (~683k embedding rows). Every step processes one
global batch of `--batch-size` rows split over the ranks, as `masknet train --nproc N` does.
Communication per step = (step time with DDP gradient sync) - (step time under `no_sync()`),
measured in the same processes. Prints a table; the numbers are this machine's, at its current load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def worker(steps: int, batch_size: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from masknet.config import ModelConfig, TrainConfig
    from masknet.data.synthetic import cardinalities
    from masknet.models import build_model
    from masknet.training.distributed import init_from_env
    from masknet.training.trainer import Optimizer, loss_fn

    ctx = init_from_env()
    torch.manual_seed(0)
    cards = cardinalities()
    model = build_model(ModelConfig(), cards)
    cfg = TrainConfig()
    opt = Optimizer(model, cfg)
    fwd = DistributedDataParallel(model) if ctx.enabled else model
    gen = torch.Generator().manual_seed(ctx.rank)
    lo, hi = ctx.shard(batch_size)
    xs = [torch.stack([torch.randint(0, c, (hi - lo,), generator=gen) for c in cards], 1) for _ in range(4)]
    y = torch.randint(0, 2, (hi - lo,), generator=gen).float()

    def step(x: torch.Tensor, sync: bool) -> None:
        if sync or not ctx.enabled:
            loss, _ = loss_fn(model, x, y, cfg, fwd)
            opt.zero_grad()
            loss.backward()
        else:
            with fwd.no_sync():
                loss, _ = loss_fn(model, x, y, cfg, fwd)
                opt.zero_grad()
                loss.backward()
        opt.step()

    def timed(sync: bool) -> float:
        for i in range(3):
            step(xs[i % 4], sync)
        if ctx.enabled:
            dist.barrier()
        t0 = time.perf_counter()
        for i in range(steps):
            step(xs[i % 4], sync)
        if ctx.enabled:
            dist.barrier()
        return (time.perf_counter() - t0) / steps

    with_sync = timed(True)
    without = timed(False) if ctx.enabled else with_sync
    if ctx.is_main:
        print(json.dumps({"world_size": ctx.world_size, "step_s": with_sync, "step_no_sync_s": without}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.steps, args.batch_size)
        return
    results = []
    for n in sorted({1, args.nproc}):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            __file__, "--worker", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n)))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        results.append(json.loads([line for line in out.splitlines() if line.startswith("{")][-1]))
    base = results[0]["step_s"]
    print(f"SerMaskNet paper config, global batch {args.batch_size}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"{'procs':>5} {'threads/proc':>12} {'step ms':>8} {'samples/s':>10} {'speed-up':>8} {'comm ms/step':>12}")
    for r in results:
        n = r["world_size"]
        comm = (r["step_s"] - r["step_no_sync_s"]) * 1000
        print(
            f"{n:>5} {max(1, (os.cpu_count() or 1) // n):>12} {r['step_s'] * 1000:>8.1f} "
            f"{args.batch_size / r['step_s']:>10,.0f} {base / r['step_s']:>8.2f} {comm:>12.1f}"
        )


if __name__ == "__main__":
    main()
