"""Calibration on the built-in data, where every row's true probability is known.

Trains (single-threaded, default SerMaskNet unless --set says otherwise):
    isotonic      train.calibration=isotonic: test ECE against the labels and the true p, before/after
    downsampled   train.negative_sampling_rate=RATE: the served mean probability (the bundle's
                  scores on the test split, as `masknet predict` / `serve` compute them) against
                  the observed rate, and the raw sigmoid's mean beside it
    downsampled_isotonic  both: down-sampling corrected, then isotonic on the (full) validation split
and for each bundle the ONNX export's max |difference| from PyTorch per output. Writes JSON.

    python benchmarks/calibration_check.py --rows 1000000 --output docs/bench-results/calibration.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from masknet.config import RunConfig, apply_override
from masknet.data.synthetic import generate
from masknet.models.scoring import ScoreHead
from masknet.serving.bundle import verify_and_load
from masknet.serving.export import export_onnx_bytes, parity_by_output
from masknet.serving.predict import score_both
from masknet.training.run import train_run


def config(out: Path, rows: int, sets: list[str]) -> RunConfig:
    cfg = RunConfig()
    cfg.data.synthetic.rows = rows
    cfg.train.threads = 1
    cfg.train.progress = False
    cfg.train.checkpoints = False
    cfg.output = str(out)
    for s in sets:
        apply_override(cfg, s)
    return cfg


def run(out: Path, rows: int, sets: list[str]) -> dict:
    if not (out / "metrics.json").is_file():
        t0 = time.perf_counter()
        train_run(config(out, rows, sets), log=lambda *_: None)
        print(f"{out.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads((out / "metrics.json").read_text())


def served_means(run_dir: Path, rows: int, multitask: bool, data_seed: int = 7) -> dict:
    """Mean served and raw probability per task on the test split, through the bundle."""
    b = verify_and_load(run_dir)
    test = generate(rows, data_seed, multitask=multitask).splits["test"]
    x = np.asarray(test.x, np.int64)
    served, _ = score_both(b.model, x, 8192, b.head)
    # the formula alone, without the intercepts the bundle re-estimated on the validation split
    formula, _ = score_both(b.model, x, 8192, ScoreHead({"negative_sampling_rate": b.head.rate}, len(b.tasks)))
    with torch.inference_mode():
        raw = np.concatenate([torch.sigmoid(b.model(torch.from_numpy(x[i : i + 8192]))).numpy() for i in range(0, len(x), 8192)])
    served, raw, formula = served.reshape(len(x), -1), raw.reshape(len(x), -1), formula.reshape(len(x), -1)
    labels = test.label_matrix()
    # the rows as training saw them: a negative (on the first task) counts `rate`, so the raw model,
    # if calibrated on its own training distribution, has kept_mean == kept_rate
    kept = np.where(labels[:, 0] == 1, 1.0, b.head.rate)
    out = {}
    for t, name in enumerate(b.tasks):
        observed = float(labels[:, t].mean())
        kept_rate, kept_mean = float(np.average(labels[:, t], weights=kept)), float(np.average(raw[:, t], weights=kept))
        out[name] = {"observed_rate": observed, "served_mean": float(served[:, t].mean()), "raw_sigmoid_mean": float(raw[:, t].mean()),
                     "served_over_observed": float(served[:, t].mean()) / observed, "raw_over_observed": float(raw[:, t].mean()) / observed,
                     "formula_only_over_observed": float(formula[:, t].mean()) / observed,
                     "logit_offset": None if b.head.offsets is None else b.head.offsets[t],
                     "kept_rate": kept_rate, "raw_kept_mean": kept_mean, "raw_over_kept_rate": kept_mean / kept_rate}
    return out


def parity(run_dir: Path) -> dict:
    b = verify_and_load(run_dir)
    return parity_by_output(b, export_onnx_bytes(b), rows=4096)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--multitask", action="store_true", help="the multi-task data and a shared-bottom model")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--runs", default="runs/calibration-check")
    p.add_argument("--output", default="calibration.json")
    p.add_argument("--downsampled-only", action="store_true",
                   help="only the down-sampled cell, for every --data-seeds x --seeds pair: served mean / observed rate")
    p.add_argument("--data-seeds", default="7")
    p.add_argument("--seeds", default="2021", help="training seeds (with --downsampled-only)")
    args = p.parse_args()
    runs = Path(args.runs)
    sets = list(args.set)
    if args.multitask:
        sets += ["data.synthetic.multitask=true", "model.multitask=shared_bottom"]
    if args.downsampled_only:
        return downsampled_only(args, runs, sets)
    cells = {
        "isotonic": run(runs / "isotonic", args.rows, sets + ["train.calibration=isotonic"]),
        "downsampled": run(runs / "downsampled", args.rows, sets + [f"train.negative_sampling_rate={args.rate}"]),
        "downsampled_isotonic": run(runs / "downsampled_isotonic", args.rows,
                                    sets + [f"train.negative_sampling_rate={args.rate}", "train.calibration=isotonic"]),
    }
    out = {
        "command": "python benchmarks/calibration_check.py " + " ".join(
            [f"--rows {args.rows}", f"--rate {args.rate}"] + (["--multitask"] if args.multitask else []) + [f"--set {s}" for s in args.set]),
        "rows": args.rows,
        "bins": cells["isotonic"]["calibration"]["bins"],
        "isotonic": {
            t: {
                "uncalibrated": {k: m["test"][k] for k in ("auc", "logloss", "ece", "ece_true", "mae_true", "ratio")},
                "isotonic": {k: m["test"]["calibrated"][k] for k in ("auc", "logloss", "ece", "ece_true", "mae_true", "ratio")},
                "oracle": {"auc": m["test"]["oracle_auc"], "ece": m["test"]["oracle_ece"]},
                "rows": m["test"]["rows"],
            }
            for t, m in cells["isotonic"]["tasks"].items()
        },
        "downsampled": {
            "rate": args.rate,
            "served": served_means(runs / "downsampled", args.rows, args.multitask),
            "test_metrics": {t: {k: m["test"][k] for k in ("auc", "ece", "ece_true", "ratio")} for t, m in cells["downsampled"]["tasks"].items()},
            "train_seconds": cells["downsampled"]["train_seconds"],
        },
        "downsampled_isotonic": {
            "rate": args.rate,
            "served": served_means(runs / "downsampled_isotonic", args.rows, args.multitask),
            "test_metrics": {t: {k: m["test"]["calibrated"][k] for k in ("auc", "ece", "ece_true", "ratio")}
                             for t, m in cells["downsampled_isotonic"]["tasks"].items()},
        },
        "full_data_train_seconds": cells["isotonic"]["train_seconds"],
        "onnx_max_abs_diff": {name: parity(runs / name) for name in cells},
    }
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("isotonic", "downsampled", "onnx_max_abs_diff")}, indent=2))


def downsampled_only(args: argparse.Namespace, runs: Path, sets: list[str]) -> None:
    """The served mean of the down-sampled bundle (and the formula alone) per data and training seed."""
    cells = {}
    for data_seed in [int(s) for s in args.data_seeds.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            name = f"downsampled-d{data_seed}-s{seed}"
            m = run(runs / name, args.rows, sets + [f"train.negative_sampling_rate={args.rate}", f"data.synthetic.seed={data_seed}",
                                                   f"train.seed={seed}"])
            cells[name] = {"data_seed": data_seed, "seed": seed, "best_step": m["best_step"],
                           "served": served_means(runs / name, args.rows, args.multitask, data_seed),
                           "test_auc": {t: v["test"]["auc"] for t, v in m["tasks"].items()}}
            first = next(iter(cells[name]["served"].values()))
            print(f"{name}: served/observed {first['served_over_observed']:.4f}, formula alone "
                  f"{first['formula_only_over_observed']:.4f}", flush=True)
    out = {
        "command": "python benchmarks/calibration_check.py --downsampled-only " + " ".join(
            [f"--rows {args.rows}", f"--rate {args.rate}", f"--data-seeds {args.data_seeds}", f"--seeds {args.seeds}"]
            + (["--multitask"] if args.multitask else []) + [f"--set {s}" for s in args.set]),
        "rows": args.rows,
        "rate": args.rate,
        "cells": cells,
    }
    Path(args.output).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
