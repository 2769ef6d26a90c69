"""scikit-learn LogisticRegression on one-hot of a prepared dataset's encoded fields: the reference
`masknet train --model lr` must reach (issue 16). C is chosen on the validation split.

    python benchmarks/sklearn_lr.py DIR [DIR ...] [--json OUT]

Prints, per dataset, every C tried with its validation AUC and the test AUC of the best C.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from sweep import load  # benchmarks/sweep.py: builtin[:ROWS], DIR, DIR@N

CS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]


def one_hot(x: np.ndarray, cards: list[int]) -> sparse.csr_matrix:
    """Row i has a 1 in column offset_f + x[i, f] for every field f (the same features as `--model lr`)."""
    offsets = np.concatenate([[0], np.cumsum(cards)[:-1]])
    cols = (np.asarray(x, dtype=np.int64) + offsets).ravel()
    rows = np.repeat(np.arange(len(x)), x.shape[1])
    return sparse.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(x), int(sum(cards))))


def run(path: str) -> dict:
    data = load(path)
    xs = {s: one_hot(np.asarray(v.x), data.cardinalities) for s, v in data.splits.items()}
    ys = {s: np.asarray(v.y) for s, v in data.splits.items()}
    tried = []
    for c in CS:
        t0 = time.perf_counter()
        clf = LogisticRegression(C=c, max_iter=2000, solver="lbfgs").fit(xs["train"], ys["train"])
        tried.append({
            "C": c,
            "valid_auc": roc_auc_score(ys["valid"], clf.decision_function(xs["valid"])),
            "test_auc": roc_auc_score(ys["test"], clf.decision_function(xs["test"])),
            "seconds": time.perf_counter() - t0,
        })
        print(f"{path}: C={c:g} valid {tried[-1]['valid_auc']:.4f} test {tried[-1]['test_auc']:.4f}", flush=True)
    best = max(tried, key=lambda r: r["valid_auc"])
    return {"data": path, "rows": {s: len(v) for s, v in ys.items()}, "tried": tried, "best_C": best["C"],
            "valid_auc": best["valid_auc"], "test_auc": best["test_auc"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="+")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = [run(p) for p in args.data]
    for r in out:
        print(f"{r['data']}: best C {r['best_C']:g}: valid AUC {r['valid_auc']:.4f}, test AUC {r['test_auc']:.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
