"""Run `masknet train` settings over datasets and seeds in one process; append one JSON line per run.

    python benchmarks/sweep.py --data DIR|builtin[:ROWS] --model M --seeds 1,2,3 \
        --set KEY=VALUE ... --tag NAME --out results.jsonl

Used to choose and check the defaults of issue 16 (docs/model.md, "Defaults and the measurements
that chose them"); every line records the resolved config, so each number is traceable.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from masknet.config import RunConfig, apply_override, load_config
from masknet.data.dataset import CTRDataset, Split, load_prepared
from masknet.data.synthetic import generate
from masknet.training.run import train_run


def load(spec: str) -> CTRDataset:
    """`builtin[:ROWS[:SEED]]` (SEED: another planted model, default 7), a prepared folder, or `DIR@N`: the folder's first N train rows and the
    first N/9 valid and test rows (prepared splits are in random order, so a head is a random subsample)."""
    if spec.startswith("builtin"):
        rows, _, seed = spec.partition(":")[2].partition(":")
        return generate(int(rows) if rows else 120_000, int(seed) if seed else 7)
    path, _, n = spec.partition("@")
    data = load_prepared(path)
    if not n:
        return data
    n = int(n)
    keep = {"train": n, "valid": max(n // 9, 1), "test": max(n // 9, 1)}
    splits = {s: Split(np.asarray(v.x[: keep[s]]), np.asarray(v.y[: keep[s]])) for s, v in data.splits.items()}
    return CTRDataset(data.field_names, data.cardinalities, splits, data.meta)


def with_min_count(data: CTRDataset, min_count: int) -> CTRDataset:
    """What `masknet prepare --min-count M` would have made of `data`: in every field, each value seen
    fewer than M times in the train split is looked up as the field's out-of-vocabulary row (prepared
    folders: index 1; the built-in data has none, so one is added after its last row)."""
    if min_count <= 1:
        return data
    train = np.asarray(data.splits["train"].x)
    prepared = data.meta.get("format") == "masknet-prepared"
    cards, rare = [], []
    for j, card in enumerate(data.cardinalities):
        counts = np.bincount(train[:, j], minlength=card)
        is_rare = counts < min_count
        is_rare[0] = False  # missing keeps its row
        if prepared:
            is_rare[1] = False
        rare.append(is_rare)
        cards.append(card if prepared else card + 1)
    splits = {}
    for name, split in data.splits.items():
        x = np.array(split.x)
        for j, is_rare in enumerate(rare):
            oov = 1 if prepared else cards[j] - 1
            x[:, j] = np.where(is_rare[x[:, j]], oov, x[:, j])
        splits[name] = Split(x, np.asarray(split.y), split.p)
    return CTRDataset(data.field_names, cards, splits, data.meta)


def config_for(data: str, model: str, seed: int, sets: list[str], config: str | None = None) -> RunConfig:
    cfg = load_config(config) if config else RunConfig()
    cfg.model.name = model
    if data.startswith("builtin"):
        rows, _, draw = data.partition(":")[2].partition(":")
        if rows:
            cfg.data.synthetic.rows = int(rows)
        if draw:
            cfg.data.synthetic.seed = int(draw)
    else:
        cfg.data.path = data.partition("@")[0]
    cfg.train.seed = seed
    cfg.train.progress = False
    cfg.train.checkpoints = False
    for s in sets:
        apply_override(cfg, s)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="sermasknet")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--config", help="a YAML run config to start from (e.g. masknet tune's best.yaml)")
    ap.add_argument("--min-count", type=int, default=1,
                    help="also map each value seen fewer than this many times in train to out-of-vocabulary (as prepare --min-count)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    data = None
    aucs = []
    for seed in seeds:
        cfg = config_for(args.data, args.model, seed, args.set, args.config)
        if data is None:
            data = with_min_count(load(args.data), args.min_count)
        with tempfile.TemporaryDirectory() as tmp:
            cfg.output = tmp
            t0 = time.perf_counter()
            run = train_run(cfg, data=data, log=lambda *_: None)
            wall = time.perf_counter() - t0
            history = [json.loads(line) for line in open(f"{tmp}/log.jsonl")]
        m = run.metrics
        rec = {
            "tag": args.tag, "data": args.data, "model": args.model, "seed": seed, "sets": args.set,
            "min_count": args.min_count,
            "valid_auc": m["valid"]["auc"], "test_auc": m["test"]["auc"], "test_logloss": m["test"]["logloss"],
            "best_epoch": m["best_epoch"], "best_step": m.get("best_step"), "evaluations": len(history),
            "steps": history[-1].get("step") if history else None,
            "train_seconds": m["train_seconds"], "wall_seconds": wall, "oracle_auc": m.get("oracle_auc"),
            "config": cfg.to_dict(),
        }
        aucs.append(rec["test_auc"])
        with open(args.out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(f"{args.tag} {args.model} seed {seed}: valid {rec['valid_auc']:.4f} test {rec['test_auc']:.4f} "
              f"best epoch {rec['best_epoch']} ({rec['evaluations']} evals, {wall:.0f} s)", flush=True)
    mean = sum(aucs) / len(aucs)
    print(f"{args.tag} {args.model} {args.data}: mean test AUC {mean:.4f}", flush=True)


if __name__ == "__main__":
    main()
