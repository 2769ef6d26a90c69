"""Training cost of a multi-valued field, measured robustly on a shared machine.

`masknet bench --multi-valued` runs the models with and without the field in separate processes,
one after the other: on a machine whose load moves by 2x within a minute (2 cores, several
co-tenants) their ratio is mostly noise. This script interleaves the two: one process, both
models built with the same seed, and training steps alternate A, B, A, B, ... on the built-in
data without T1 (`drop`) and with it as a multi-valued field (`list`, mean length 10, max 20),
each step the trainer's (loss_fn, backward, finite check, Optimizer.step). The ratio of the
median step times is printed (load drift hits both alike), with the wall and CPU medians.
`--lookups compact,gather` adds a third variant, the field with FieldEmbedding's padded gather
lookup (the one ONNX export uses), so the before/after ratios of the compact lookup come from
one run.

    python benchmarks/bench_multivalued.py                        # SerMaskNet, paper config
    python benchmarks/bench_multivalued.py --models sermasknet,dnn,fm --steps 60 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sermasknet")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per variant (after 5 warm-up steps)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lookups", default="auto", help="FieldEmbedding lookups to time with T1, comma-separated: auto (compact when training), compact, gather")
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from masknet.config import ModelConfig, TrainConfig
    from masknet.data.dataset import iterate_batches
    from masknet.data.synthetic import write_synthetic
    from masknet.models import build_model
    from masknet.training.trainer import Optimizer, finite_step, loss_fn, seed_everything

    torch.set_num_threads(args.threads)
    out = {"rows": args.rows, "batch_size": args.batch_size, "threads": args.threads, "load_avg_start": os.getloadavg()[0], "models": {}}
    with tempfile.TemporaryDirectory(prefix="masknet-bench-mv-") as tmp:
        data = {v: write_synthetic(Path(tmp) / v, args.rows, multi_valued=v) for v in ("drop", "list")}
        for name in args.models.split(","):
            cfg = TrainConfig(batch_size=args.batch_size)
            runs = {}
            variants = [("drop", "drop", None)] + [(f"list-{lk}", "list", lk) for lk in args.lookups.split(",")]
            for v, kind, lookup in variants:
                ds = data[kind]
                seed_everything(2021)
                model = build_model(ModelConfig(name=name), ds.cardinalities, ds.multi_valued)
                for table in model.embeddings():
                    table.lookup = lookup or table.lookup
                model.train()
                it = iter(iterate_batches(ds.splits["train"], args.batch_size, (2021, 1)))
                runs[v] = {"model": model, "opt": Optimizer(model, cfg), "it": it, "wall": [], "cpu": []}
            for i in range(5 + args.steps):
                for v, r in runs.items():
                    x, y = next(r["it"])
                    t0, c0 = time.perf_counter(), time.process_time()
                    loss, _ = loss_fn(r["model"], x, y, cfg)
                    r["opt"].zero_grad()
                    loss.backward()
                    if finite_step(loss, r["model"]):
                        r["opt"].step()
                    if i >= 5:
                        r["wall"].append(time.perf_counter() - t0)
                        r["cpu"].append(time.process_time() - c0)
            med = {v: {k: statistics.median(r[k]) for k in ("wall", "cpu")} for v, r in runs.items()}
            res = {"step_ms": {v: {k: 1000 * m[k] for k in m} for v, m in med.items()}, "ratios": {}}
            line = f"{name}: median step {1000 * med['drop']['wall']:.1f} ms without T1"
            for v in med:
                if v == "drop":
                    continue
                ratio, cpu = med["drop"]["wall"] / med[v]["wall"], med["drop"]["cpu"] / med[v]["cpu"]
                res["ratios"][v] = {"samples_per_s_with_over_without": ratio, "cpu_with_over_without": cpu}
                line += f"; {v} {1000 * med[v]['wall']:.1f} ms, samples/s ratio {ratio:.3f} (CPU {cpu:.3f})"
            out["models"][name] = res
            print(f"{line}; load {os.getloadavg()[0]:.1f}", flush=True)
    out["load_avg_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
