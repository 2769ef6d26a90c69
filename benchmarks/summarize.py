"""Mean ± std of test AUC per (tag, data, model) over the JSON lines of benchmarks/sweep.py.

    python benchmarks/summarize.py results.jsonl [...]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def main() -> None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for path in sys.argv[1:]:
        for line in open(path):
            r = json.loads(line)
            groups[(r["tag"], r["data"], r["model"])].append(r)
    for (tag, data, model), runs in groups.items():
        aucs = [r["test_auc"] for r in runs]
        std = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        secs = statistics.mean(r["wall_seconds"] for r in runs)
        print(f"{tag:28s} {data.split('/')[-1]:18s} {model:12s} n={len(aucs)} test {statistics.mean(aucs):.4f} ± {std:.4f}  "
              f"valid {statistics.mean(r['valid_auc'] for r in runs):.4f}  evals {statistics.mean(r['evaluations'] for r in runs):.0f}  {secs:.0f} s")


if __name__ == "__main__":
    main()
