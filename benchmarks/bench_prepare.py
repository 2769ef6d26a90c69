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

    python benchmarks/bench_prepare.py --rows 1000000 --list-tokens 20

Multi-valued fields: the same Criteo rows plus a 41st column `tags` of 20 "|"-separated values
per row (rawgen.write_criteo(list_tokens=20)), prepared twice from that one file through a schema
(min count 10, as the criteo format): `no-list` ignores the column, `list` reads it as a
multi-valued field (max_len 20). Runs alternate (no-list, list, no-list, list, ... --repeat
times) and the peak-RSS ratio list / no-list is printed per pair and as the median.
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
    "import sys, time; from masknet.data.prepare import prepare; from masknet.data.formats import builtin_spec; "
    "t = time.perf_counter(); prepare(builtin_spec('criteo'), sys.argv[2], input=sys.argv[1]); "
    "print('inner_seconds', time.perf_counter() - t)"
)


SCHEMA_LIB = (
    "import sys, time; from masknet.data.prepare import prepare; from masknet.data.schema import load_schema_file; "
    "t = time.perf_counter(); prepare(load_schema_file(sys.argv[3]), sys.argv[2], input=sys.argv[1]); "
    "print('inner_seconds', time.perf_counter() - t)"
)


def list_schemas(root: Path, tokens: int) -> dict[str, Path]:
    """Two schemas over the Criteo columns + `tags`: without and with the multi-valued field."""
    from masknet.data.formats import CRITEO_COLUMNS

    base = {
        "label": "label", "header": False, "delimiter": "\t", "quoting": False, "min_count": 10,
        "columns": CRITEO_COLUMNS + ["tags"], "numeric": [f"I{i}" for i in range(1, 14)],
        "categorical": [f"C{i}" for i in range(1, 27)],
    }
    out = {}
    for name, extra in (("no-list", {}), ("list", {"multi_valued": [{"name": "tags", "separator": "|", "max_len": tokens}]})):
        out[name] = root / f"schema-{name}.json"
        out[name].write_text(json.dumps({**base, **extra}))
    return out


def bench_list_column(root: Path, rows: int, tokens: int, repeat: int) -> list[dict]:
    from masknet.data.rawgen import write_criteo

    src = root / f"criteo-{rows}-list{tokens}.txt"
    if not src.exists():
        t = time.perf_counter()
        write_criteo(src, rows, seed=1, list_tokens=tokens)
        print(f"generated {src} ({src.stat().st_size / 1e6:,.0f} MB) in {time.perf_counter() - t:.0f} s", flush=True)
    schemas = list_schemas(root, tokens)
    results = []
    for rep in range(repeat):
        for mode in ("no-list", "list"):
            out = root / f"prepared-{rows}-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            load = os.getloadavg()[0]
            r = run_child([sys.executable, "-c", SCHEMA_LIB, str(src), str(out), str(schemas[mode])])
            r.update(rows=rows, mode=mode, rep=rep, mb=src.stat().st_size / 1e6, rows_per_s=rows / r["wall_s"], load_before=load)
            results.append(r)
            print(f"{mode:8s} {rows:>11,} rows  wall {r['wall_s']:6.2f} s  cpu {r['cpu_s']:6.2f} s  "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB  (load {load:.1f})", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    ratios = [b["peak_rss_mb"] / a["peak_rss_mb"] for a, b in zip(results[::2], results[1::2])]
    print(f"peak RSS list / no-list per pair: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {sorted(ratios)[len(ratios) // 2]:.3f}")
    return results


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
    ap.add_argument("--list-tokens", type=int, default=0, metavar="N",
                    help="instead: prepare the rows with an N-value list column, with and without it as a multi-valued field")
    ap.add_argument("--repeat", type=int, default=3, help="with --list-tokens: alternating pairs of runs (default 3)")
    args = ap.parse_args()

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="masknet-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.list_tokens:
        try:
            results = [r for rows in args.rows for r in bench_list_column(root, rows, args.list_tokens, args.repeat)]
        finally:
            if not args.keep and not args.dir:
                shutil.rmtree(root, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return
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
