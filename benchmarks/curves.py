"""Validation-AUC curves of `masknet train` settings on selection data (issue 16 v3, docs/model.md,
"Dropout on small data"); one JSON line per run with the valid AUC at every evaluation.

    python benchmarks/curves.py --data builtin:10000:7#30 --data prepared/frappe@8000 \
        --model sermasknet --seeds 1,2 --set model.dropout=0.3 --tag drop0.3 --curve --out FILE

`--data` takes benchmarks/sweep.py's specs, each optionally with `#M`: min count M applied as
`masknet prepare --min-count M` would. Every run adds `--set train.threads=1`.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import config_for, load, with_min_count  # noqa: E402

from masknet.training.run import train_run  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--data", action="append", required=True)  # a sweep.py spec, optionally SPEC#MIN_COUNT
ap.add_argument("--model", default="sermasknet")
ap.add_argument("--seeds", default="1,2")
ap.add_argument("--set", action="append", default=[])
ap.add_argument("--tag", default="")
ap.add_argument("--out", required=True)
ap.add_argument("--curve", action="store_true")
a = ap.parse_args()
for spec in a.data:
    d, _, mc = spec.partition("#")
    data = with_min_count(load(d), int(mc or 1))
    vs, ts = [], []
    for seed in [int(s) for s in a.seeds.split(",")]:
        cfg = config_for(d, a.model, seed, a.set + ["train.threads=1"])
        with tempfile.TemporaryDirectory() as tmp:
            cfg.output = tmp
            t0 = time.perf_counter()
            run = train_run(cfg, data=data, log=lambda *_: None)
            wall = time.perf_counter() - t0
            hist = [json.loads(l) for l in open(f"{tmp}/log.jsonl")]
        m = run.metrics
        vs.append(m["valid"]["auc"]); ts.append(m["test"]["auc"])
        curve = [(h.get("step"), round(h["valid_auc"], 4)) for h in hist if "valid_auc" in h]
        rec = dict(tag=a.tag, data=spec, model=a.model, seed=seed, sets=a.set, valid=m["valid"]["auc"], test=m["test"]["auc"],
                   best_step=m.get("best_step"), wall=wall, curve=curve)
        open(a.out, "a").write(json.dumps(rec) + "\n")
        if a.curve:
            print("  curve", " ".join(f"{s}:{v}" for s, v in curve))
        print(f"{a.tag} {a.model} {spec} s{seed}: valid {vs[-1]:.4f} test {ts[-1]:.4f} best {rec['best_step']} ({wall:.0f}s)", flush=True)
    print(f"== {a.tag} {a.model} {spec}: valid {sum(vs)/len(vs):.4f} test {sum(ts)/len(ts):.4f}", flush=True)
