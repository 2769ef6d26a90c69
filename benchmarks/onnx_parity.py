"""ONNX export against PyTorch, per output, for trained run folders (issue #18: a multi-task
model's export matches PyTorch within 1e-5 on every output).

    python benchmarks/onnx_parity.py RUN [RUN ...] [--rows 4096]

Prints, per bundle, its tasks, whether it is calibrated, and max |onnx - torch| for each output
(score, score_uncalibrated, logit; every task's column) on random in-range rows (0 and 1 included).
"""

from __future__ import annotations

import argparse
import json

from masknet.serving.bundle import verify_and_load
from masknet.serving.export import export_onnx_bytes, parity_by_output


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--rows", type=int, default=4096)
    args = p.parse_args()
    for run in args.runs:
        b = verify_and_load(run)
        diffs = parity_by_output(b, export_onnx_bytes(b), rows=args.rows)
        print(json.dumps({"run": run, "tasks": b.tasks, "calibrated": b.calibrated, "rows": args.rows, "max_abs_diff": diffs}))


if __name__ == "__main__":
    main()
