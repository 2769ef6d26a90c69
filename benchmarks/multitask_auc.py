"""Multi-task against single-task training on the built-in multi-task data (click, purchase).

For each seed, trains (every cell on the same data, data seed 7):
    mt-<kind>        a multi-task model (shared_bottom / mmoe) on click and purchase
                     (--mt-set: overrides for these cells only, e.g. train.early_stopping=click;
                     their runs and names get the --mt-tag suffix)
    st-<kind>-<task> the same architecture (one tower) trained on that task alone
    plain-<task>     the single-task model (no tower), optional (--plain)
and writes every run's per-task test AUC, log loss, ECE, validation AUC and the oracle AUC to a
JSON file, plus the per-seed differences mt - st on the validation and on the test split, and prints
docs/multitask.md's table (per task and split: multi-task, alone, difference, oracle). Runs are kept
under --runs (rerunning skips finished cells).

    python benchmarks/multitask_auc.py --seeds 1,2,3 --output docs/bench-results/multitask.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from masknet.config import RunConfig, apply_override
from masknet.training.run import train_run


def cell_config(kind: str, tasks: list[str], seed: int, out: Path, rows: int, sets: list[str], multitask: bool) -> RunConfig:
    cfg = RunConfig()
    cfg.data.synthetic.rows = rows
    cfg.data.synthetic.multitask = True
    cfg.train.seed = seed
    cfg.train.threads = 1
    cfg.train.progress = False
    cfg.train.checkpoints = False
    cfg.train.tasks = tasks
    cfg.model.multitask = kind if multitask else "none"
    cfg.output = str(out)
    for s in sets:
        apply_override(cfg, s)
    return cfg


def run_cell(name: str, cfg: RunConfig) -> dict:
    path = Path(cfg.output) / "metrics.json"
    if not path.is_file():
        t0 = time.perf_counter()
        train_run(cfg, log=lambda *_: None)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    m = json.loads(path.read_text())
    return {
        "run": cfg.output,
        "best_epoch": m["best_epoch"],
        "train_seconds": m["train_seconds"],
        "tasks": {
            t: {k: v["test"][k] for k in ("auc", "logloss", "ece", "ratio", "oracle_auc", "ece_true")}
            | {"valid_auc": v["valid"]["auc"]}
            for t, v in m["tasks"].items()
        },
    }


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--kinds", default="shared_bottom", help="comma-separated: shared_bottom, mmoe")
    p.add_argument("--rows", type=int, default=120_000)
    p.add_argument("--plain", action="store_true", help="also the plain single-task model per task")
    p.add_argument("--set", action="append", default=[], help="config override for every cell")
    p.add_argument("--mt-set", action="append", default=[], help="config override for the multi-task cells only")
    p.add_argument("--mt-tag", default="", help="suffix of the multi-task cells' names and run folders (with --mt-set)")
    p.add_argument("--runs", default="runs/multitask-bench")
    p.add_argument("--output", default="multitask.json")
    args = p.parse_args()
    if args.mt_set and not args.mt_tag:
        p.error("--mt-set needs --mt-tag (the multi-task runs differ from the untagged ones)")
    tag = f"-{args.mt_tag}" if args.mt_tag else ""
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = ["click", "purchase"]
    runs = Path(args.runs)
    cells: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for kind in args.kinds.split(","):
            cells.setdefault(f"mt-{kind}{tag}", {})[seed] = run_cell(f"mt-{kind}{tag} seed {seed}", cell_config(
                kind, tasks, seed, runs / f"mt-{kind}{tag}-s{seed}", args.rows, args.set + args.mt_set, True))
            for t in tasks:
                cells.setdefault(f"st-{kind}-{t}", {})[seed] = run_cell(
                    f"st-{kind}-{t} seed {seed}", cell_config(kind, [t], seed, runs / f"st-{kind}-{t}-s{seed}", args.rows, args.set, True))
        if args.plain:
            for t in tasks:
                cells.setdefault(f"plain-{t}", {})[seed] = run_cell(
                    f"plain-{t} seed {seed}", cell_config("none", [t], seed, runs / f"plain-{t}-s{seed}", args.rows, args.set, False))
    # the same differences on the validation split (the split every decision is taken on) and the test split
    comparisons = {split: {} for split in ("valid_auc", "auc")}
    for split, per_split in comparisons.items():
        for kind in args.kinds.split(","):
            for t in tasks:
                for base in [f"st-{kind}-{t}"] + ([f"plain-{t}"] if args.plain else []):
                    diffs = [cells[f"mt-{kind}{tag}"][s]["tasks"][t][split] - cells[base][s]["tasks"][t][split] for s in seeds]
                    per_split[f"mt-{kind}{tag} - {base} ({t})"] = summary(diffs)

    def auc_table(split: str) -> dict:
        return {
            name: {t: summary([r["tasks"][t][split] for r in per_seed.values()]) for t in next(iter(per_seed.values()))["tasks"]}
            for name, per_seed in cells.items()
        }
    oracle = {t: next(iter(cells[f"mt-{args.kinds.split(',')[0]}{tag}"].values()))["tasks"][t]["oracle_auc"] for t in tasks}
    data_seed = cell_config("none", tasks, 0, runs, args.rows, args.set, False).data.synthetic.seed  # --set may change it
    out = {
        "command": "python benchmarks/multitask_auc.py " + " ".join(
            [f"--seeds {args.seeds}", f"--kinds {args.kinds}", f"--rows {args.rows}"] + (["--plain"] if args.plain else [])
            + [f"--set {s}" for s in args.set] + [f"--mt-set {s}" for s in args.mt_set] + ([f"--mt-tag {args.mt_tag}"] if tag else [])),
        "machine": platform.processor() or platform.machine(),
        "data": {"generator": "masknet.data.synthetic v2, multitask", "rows": args.rows, "seed": data_seed},
        "oracle_auc": oracle,
        "valid_auc": auc_table("valid_auc"),
        "test_auc": auc_table("auc"),
        "mt_minus_baseline_valid": comparisons["valid_auc"],
        "mt_minus_baseline": comparisons["auc"],
        "cells": cells,
    }
    Path(args.output).write_text(json.dumps(out, indent=2))
    for split, per_split in comparisons.items():
        for k, v in per_split.items():
            print(f"{'valid' if split == 'valid_auc' else 'test'} {k}: {v['mean']:+.4f} ± {v['std']:.4f}  {['%+.4f' % d for d in v['values']]}")
    for kind in args.kinds.split(","):
        print(markdown_table(cells, f"mt-{kind}{tag}", f"st-{kind}", tasks, seeds, oracle))


def markdown_table(cells: dict, mt: str, st: str, tasks: list[str], seeds: list[int], oracle: dict) -> str:
    """docs/multitask.md's table: per task and split, multi-task vs that task alone (per seed), the difference, the oracle."""
    def cell(values: list[float], signed: bool = False) -> str:
        f = "%+.4f" if signed else "%.4f"
        return f"{f % statistics.mean(values)} ({', '.join(f % v for v in values)})"

    rows = ["| task | split | multi-task | that task alone | multi − alone (±1 sd over seeds) | oracle (test) |", "|---|---|---|---|---|---|"]
    for t in tasks:
        for split, key in (("valid", "valid_auc"), ("test", "auc")):
            a = [cells[mt][s]["tasks"][t][key] for s in seeds]
            b = [cells[f"{st}-{t}"][s]["tasks"][t][key] for s in seeds]
            d = [x - y for x, y in zip(a, b)]
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            rows.append(f"| {t} | {split} | {cell(a)} | {cell(b)} | **{statistics.mean(d):+.4f} ± {sd:.4f}** "
                        f"({', '.join('%+.4f' % v for v in d)}) | {oracle[t]:.4f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
