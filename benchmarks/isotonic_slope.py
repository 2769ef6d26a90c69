"""Isotonic calibration against its slope cap (train.calibration_max_slope) on trained bundles.

For each run folder (built-in synthetic data: its rows, seed and multitask option are read from
the run's config.yaml) and each cap, refits the centred isotonic calibrators on the validation
split exactly as training does (training.evaluation.report), then reports per task the test ECE
against the labels and the true probabilities, predicted/observed, the test AUC after
calibration, the knots kept, and the ONNX export's max |difference| from PyTorch per output
(4,096 random in-range rows). No training: the model's weights are the bundle's.

    python benchmarks/isotonic_slope.py RUN [RUN ...] --caps inf,100,30,10,5
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from masknet.config import load_config
from masknet.models.scoring import ScoreHead
from masknet.serving.bundle import verify_and_load
from masknet.serving.export import export_onnx_bytes, parity_by_output
from masknet.training.evaluation import report
from masknet.training.run import load_data
from masknet.training.tasks import select_tasks


def one(run: str, cap: float, data, cfg) -> dict:
    train_cfg = dataclasses.replace(cfg.train, calibration="isotonic", calibration_max_slope=cap)
    b = verify_and_load(run)
    rep = report(b.model, data, train_cfg)
    bundle = dataclasses.replace(b, head=ScoreHead(rep.spec, len(b.tasks)), calibration=rep.spec)
    out = {"run": run, "max_slope": cap, "onnx_max_abs_diff": parity_by_output(bundle, export_onnx_bytes(bundle), rows=4096)}
    for name, m in rep.tasks.items():
        c = m["test"]["calibrated"]
        knots = next(e for e in rep.spec["calibrators"] if e["task"] == name)["x"]
        out[name] = {"auc": c["auc"], "ece": c["ece"], "ece_true": c.get("ece_true"), "ratio": c["ratio"], "knots": len(knots),
                     "uncalibrated_ece": m["test"]["ece"], "oracle_ece": m["test"].get("oracle_ece")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--caps", default="inf,100,30,10,5")
    p.add_argument("--output", default=None, help="JSON file for the results")
    args = p.parse_args()
    results = []
    for run in args.runs:
        cfg = load_config(f"{run}/config.yaml")
        data = select_tasks(load_data(cfg), cfg.train.tasks)
        for cap in (float(c) for c in args.caps.split(",")):
            results.append(one(run, cap, data, cfg))
            print(json.dumps(results[-1]), flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"command": "python benchmarks/isotonic_slope.py " + " ".join(args.runs) + f" --caps {args.caps}",
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
