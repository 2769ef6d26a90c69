"""Benchmark `masknet prepare`: throughput (rows/s) and peak RSS on generated Criteo files.

    python benchmarks/bench_prepare.py                       # 1M and 10M rows
    python benchmarks/bench_prepare.py --rows 1000000 --dir /tmp/bench --keep

Generates Criteo `train.txt`-format files (tab-separated, 40 columns, missing values,
negative integers, 8-hex categories with Zipf tails; masknet.data.rawgen) once into
--dir, then prepares each one in a fresh subprocess (random 8:1:1 split, min count 10)
and reads that child's own wall time, CPU time and peak RSS (os.wait4). Two ways:

    library   python -c "from masknet.data.prepare import prepare; ..."   (the data layer alone)
    cli       python -m masknet.cli prepare --format criteo ...          (what a user runs)

Prints a table and the 10M/1M peak-RSS ratio. Not a test: numbers depend on the machine
and on whatever else runs on it (the load average is printed too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIB = (
    "import sys, time; from masknet.data.prepare import prepare; from masknet.data.schema import builtin_spec; "
    "t = time.perf_counter(); prepare(builtin_spec('criteo'), sys.argv[2], input=sys.argv[1]); "
    "print('inner_seconds', time.perf_counter() - t)"
)


def run_child(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.stdout.close()
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}\n{err}")
    inner = None
    for line in out.splitlines():
        if line.startswith("inner_seconds"):
            inner = float(line.split()[1])
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024, "inner_s": inner}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--dir", help="where to generate the input files (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep generated inputs for the next run")
    ap.add_argument("--modes", nargs="+", default=["library", "cli"], choices=["library", "cli"])
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="masknet-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    from masknet.data.rawgen import write_criteo

    results = []
    try:
        for rows in args.rows:
            src = root / f"criteo-{rows}.txt"
            if not src.exists():
                t = time.perf_counter()
                write_criteo(src, rows, seed=1)
                print(f"generated {src} ({src.stat().st_size / 1e6:,.0f} MB) in {time.perf_counter() - t:.0f} s", flush=True)
            for mode in args.modes:
                out = root / f"prepared-{rows}-{mode}"
                shutil.rmtree(out, ignore_errors=True)
                if mode == "library":
                    cmd = [sys.executable, "-c", LIB, str(src), str(out)]
                else:
                    cmd = [sys.executable, "-m", "masknet.cli", "prepare", "--format", "criteo", "--input", str(src), "--output", str(out)]
                load = os.getloadavg()[0]
                r = run_child(cmd)
                meta = json.loads((out / "meta.json").read_text())
                r.update(
                    rows=rows,
                    mode=mode,
                    mb=src.stat().st_size / 1e6,
                    rows_per_s=rows / r["wall_s"],
                    load_before=load,
                    stage_seconds=meta["stats"]["seconds"],
                )
                results.append(r)
                print(
                    f"{mode:8s} {rows:>11,} rows  wall {r['wall_s']:6.2f} s  cpu {r['cpu_s']:6.2f} s  "
                    f"{r['rows_per_s']:>10,.0f} rows/s  peak RSS {r['peak_rss_mb']:6.0f} MB  (load {load:.1f})",
                    flush=True,
                )
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"| mode | rows | input MB | wall s | CPU s | rows/s | peak RSS MB |")
    print(f"|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['mode']} | {r['rows']:,} | {r['mb']:,.0f} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{r['rows_per_s']:,.0f} | {r['peak_rss_mb']:.0f} |"
        )
    by = {(r["mode"], r["rows"]): r for r in results}
    if len(args.rows) >= 2:
        lo, hi = min(args.rows), max(args.rows)
        for mode in args.modes:
            if (mode, lo) in by and (mode, hi) in by:
                ratio = by[(mode, hi)]["peak_rss_mb"] / by[(mode, lo)]["peak_rss_mb"]
                print(f"{mode}: peak RSS {hi:,} / {lo:,} rows = {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
