"""Evidence that a refactor of data/ leaves `masknet prepare` output unchanged (issue #15).

Prepares every format in ../shared/data (plus generated Malware rows, a Parquet copy, bad lines
skipped, hashing and a min count, and the built-in synthetic data) into fixed folders under
--work, and prints one line per output file: `case/file sha256`. Run it on two commits with the
same --work and compare the printouts (`diff`): equal lines = byte-identical output.

meta.json records wall-clock timings (`seconds`); its line hashes the file with every `seconds`
value set to 0 (marked `meta.json[seconds=0]`), so that only the timings are left out.

    python benchmarks/prepare_identity.py --work /tmp/prepare-identity > after.txt
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

from masknet.cli import main
from masknet.data.formats import CRITEO_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

MOVIELENS = """\
label: rating
label_threshold: 4
categorical: [user_id, movie_id, gender, age, occupation, zip]
multi_valued:
  - {name: genres, separator: "|", max_len: 4}
time: timestamp
"""
SCHEMAS = ROOT / "configs" / "schemas"  # the samples' schemas, shared with tests/e2e/test_multitask_e2e.py


def census_schema() -> str:
    return (SCHEMAS / "census-income.yaml").read_text() + "min_count: 2\n"


def parquet_schema() -> str:
    return (
        "label: label\n"
        f"numeric: {json.dumps(CRITEO_COLUMNS[1:14])}\n"
        f"categorical: {json.dumps(['C1', {'name': 'C3', 'hash_buckets': 50}] + CRITEO_COLUMNS[17:])}\n"
        "min_count: 2\n"
    )


def inputs(work: Path) -> dict[str, list[str]]:
    """case name -> the `masknet prepare` arguments (less --output)."""
    from masknet.data.rawgen import write_malware

    raw = work / "raw"
    raw.mkdir(parents=True)
    c8k, frappe = SHARED / "criteo-8k", SHARED / "frappe"
    ali = SHARED / "ali-ccp-sample"
    (raw / "movielens.yaml").write_text(MOVIELENS)
    (raw / "ali.yaml").write_text((SCHEMAS / "ali-ccp.yaml").read_text())
    (raw / "census.yaml").write_text(census_schema())
    (raw / "parquet.yaml").write_text(parquet_schema())
    write_malware(raw / "malware.csv", rows=3000, seed=5)
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pacsv.read_csv(SHARED / "criteo-sample-200" / "criteo_sample.txt",
                           convert_options=pacsv.ConvertOptions(column_types={c: "string" for c in CRITEO_COLUMNS[14:]}))
    pq.write_table(table, raw / "criteo.parquet")
    bad = raw / "criteo_bad.txt"
    lines = (c8k / "test.txt").read_text().splitlines(keepends=True)
    bad.write_text("".join(lines[:100] + ["1\tnot-a-number\n", "garbage line\n"] + lines[100:]))
    splits = lambda d, a, b, c: ["--train", str(d / a), "--valid", str(d / b), "--test", str(d / c)]  # noqa: E731
    return {
        "criteo-8k": ["--format", "criteo", *splits(c8k, "train.txt", "valid.txt", "test.txt")],
        "criteo-8k-input-hash-min3": ["--format", "criteo", "--input", str(c8k / "train.txt"), "--min-count", "3",
                                      "--hash", "C3=1000", "--hash", "C12=77", "--seed", "7"],
        "criteo-bad-lines-skip": ["--format", "criteo", "--input", str(bad), "--bad-lines", "skip"],
        "criteo-csv": ["--format", "criteo-csv", "--input", str(SHARED / "criteo-sample-200" / "criteo_sample.txt")],
        "avazu-time": ["--format", "avazu", "--input", str(SHARED / "avazu-sample-100" / "avazu_sample.txt"), "--split", "time"],
        "avazu-random": ["--format", "avazu", "--input", str(SHARED / "avazu-sample-100" / "avazu_sample.txt")],
        "malware-generated": ["--format", "malware", "--input", str(raw / "malware.csv")],
        "frappe": ["--format", "frappe", *splits(frappe, "frappe.validation.libfm", "frappe.test.libfm", "frappe.test.libfm")],
        "movielens-multivalued-time": ["--format", f"schema:{raw / 'movielens.yaml'}", "--split", "time",
                                       "--input", str(SHARED / "movielens-sample-200" / "movielens_sample.txt")],
        "ali-ccp-two-labels": ["--format", f"schema:{raw / 'ali.yaml'}",
                               *splits(ali, "ali_ccp_train_sample.csv", "ali_ccp_val_sample.csv", "ali_ccp_test_sample.csv")],
        "census-headerless": ["--format", f"schema:{raw / 'census.yaml'}", "--seed", "12",
                              "--input", str(SHARED / "census-income-sample" / "census-income.sample")],
        "parquet-schema": ["--format", f"schema:{raw / 'parquet.yaml'}", "--input", str(raw / "criteo.parquet")],
    }


def zero_seconds(obj):
    if isinstance(obj, dict):
        return {k: (zero_seconds_all(v) if k == "seconds" else zero_seconds(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [zero_seconds(v) for v in obj]
    return obj


def zero_seconds_all(obj):
    if isinstance(obj, dict):
        return {k: zero_seconds_all(v) for k, v in obj.items()}
    return 0 if isinstance(obj, (int, float)) else obj


def digests(folder: Path) -> list[str]:
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        data = path.read_bytes()
        if path.name == "meta.json":
            data = json.dumps(zero_seconds(json.loads(data)), sort_keys=True).encode()
            rel += "[seconds=0]"
        out.append(f"{rel} {hashlib.sha256(data).hexdigest()}")
    return out


def main_(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/prepare-identity", help="scratch folder (replaced; same on both commits)")
    args = ap.parse_args(argv)
    if not SHARED.is_dir():
        print(f"{SHARED} is absent: nothing to compare", file=sys.stderr)
        return 2
    import masknet

    print(f"masknet from {Path(masknet.__file__).parent}", file=sys.stderr)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    cases = inputs(work)
    for name, argv_ in cases.items():
        out = work / "out" / name
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = main(["prepare", *argv_, "--output", str(out)])
        if rc != 0:
            print(f"{name} FAILED rc={rc}")
            continue
        for line in digests(out):
            print(f"{name}/{line}")
    out = work / "out" / "builtin"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["generate", "--output", str(out)])
    for line in digests(out) if rc == 0 else [f"FAILED rc={rc}"]:
        print(f"builtin/{line}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_())
