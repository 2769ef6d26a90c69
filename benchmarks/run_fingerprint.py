"""Behaviour unchanged? Fingerprint finished run folders: the SHA-256 of model.safetensors and
metrics.json's numbers without the timings (issue #15: same metrics and weight bytes before and
after a refactor).

    masknet train --seed 1 --set train.threads=1 --output /tmp/before     # on the old commit
    masknet train --seed 1 --set train.threads=1 --output /tmp/after      # on the new one
    python benchmarks/run_fingerprint.py /tmp/before /tmp/after

Prints one block per run and, for two or more, whether all weights and all metrics are identical
(exit code 1 when not).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

# wall-clock figures: differ between any two runs of the same code
TIMINGS = {"train_seconds", "samples_per_second", "seconds"}


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def fingerprint(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line]
    return {
        "weights_sha256": hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest(),
        "metrics": _without_timings(metrics),
        "log": _without_timings(log),
    }


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    prints = {run: fingerprint(Path(run)) for run in argv}
    for run, fp in prints.items():
        m = fp["metrics"]
        print(f"{run}\n  model.safetensors sha256 {fp['weights_sha256']}\n"
              f"  valid AUC {m['valid']['auc']!r} logloss {m['valid']['logloss']!r}\n"
              f"  test  AUC {m['test']['auc']!r} logloss {m['test']['logloss']!r}\n"
              f"  best epoch {m['best_epoch']} step {m.get('best_step')}; {len(fp['log'])} evaluations")
    if len(prints) < 2:
        return 0
    first, *rest = prints.values()
    same_weights = all(fp["weights_sha256"] == first["weights_sha256"] for fp in rest)
    same_metrics = all(fp["metrics"] == first["metrics"] and fp["log"] == first["log"] for fp in rest)
    print(f"identical weights: {same_weights}; identical metrics.json and log.jsonl (timings excluded): {same_metrics}")
    return 0 if same_weights and same_metrics else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
