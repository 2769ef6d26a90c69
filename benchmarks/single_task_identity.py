"""A single-task run trains the same bytes as another git ref's code (issue #18: "a single-task
run's metrics and weights are byte-identical to today's for the same seed").

For each cell, trains the same config twice in subprocesses, once with this tree's `src` and once
with `git archive REF src` (default: main), then compares model.safetensors (SHA-256) and every
metrics.json key REF writes except timings and the device. Prints one line per cell and exits 1 on
any difference.

    python benchmarks/single_task_identity.py --ref main
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"train_seconds", "samples_per_second", "device", "tasks", "calibration"}
SMALL = ["--set", "train.threads=1", "--set", "train.epochs=2", "--quiet"]
CELLS = {
    "sermasknet-synthetic": ["--set", "model.name=sermasknet", "--set", "data.synthetic.rows=20000"],
    "paramasknet-synthetic": ["--set", "model.name=paramasknet", "--set", "data.synthetic.rows=20000"],
    "dcnv2-synthetic": ["--set", "model.name=dcnv2", "--set", "data.synthetic.rows=20000"],
    "sermasknet-synthetic-seed3-bf16": ["--set", "data.synthetic.rows=20000", "--set", "train.seed=3",
                                        "--set", "train.precision=bf16"],
}


def train(src: Path, args: list[str], out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(src))
    where = subprocess.run([sys.executable, "-c", "import masknet; print(masknet.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(src), f"{where} is not under {src}"  # PYTHONPATH must win
    cmd = [sys.executable, "-m", "masknet.cli", "train", *args, *SMALL, "--output", str(out)]
    subprocess.run(cmd, env=env, check=True, cwd=out.parent)


def comparable(run: Path) -> dict:
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k not in TIMING}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="main")
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, of: {', '.join(CELLS)}")
    args = p.parse_args()
    unknown = set(args.cells.split(",")) - set(CELLS)
    if unknown:
        p.error(f"--cells: unknown {', '.join(sorted(unknown))}")
    differs = 0
    with tempfile.TemporaryDirectory(prefix="identity-") as tmp:
        tmp = Path(tmp)
        archive = subprocess.run(["git", "archive", args.ref, "src"], cwd=ROOT, check=True, capture_output=True).stdout
        (tmp / "ref.tar").write_bytes(archive)
        with tarfile.open(tmp / "ref.tar") as tar:
            tar.extractall(tmp / "ref", filter="data")
        for name in args.cells.split(","):
            cell = CELLS[name]
            runs = {}
            for side, src in (("ref", tmp / "ref" / "src"), ("here", ROOT / "src")):
                runs[side] = tmp / f"{name}-{side}"
                train(src, cell, runs[side])
            sha = {s: hashlib.sha256((r / "model.safetensors").read_bytes()).hexdigest() for s, r in runs.items()}
            same_weights = sha["ref"] == sha["here"]
            same_metrics = comparable(runs["ref"]) == comparable(runs["here"])
            differs += not (same_weights and same_metrics)
            auc = comparable(runs["here"])["test"]["auc"]
            print(f"{name}: weights {'identical' if same_weights else 'DIFFER'} (sha256 {sha['here'][:12]}), "
                  f"metrics {'identical' if same_metrics else 'DIFFER'} (test AUC {auc:.6f})", flush=True)
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
