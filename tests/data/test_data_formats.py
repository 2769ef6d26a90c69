"""Every input format end to end: `masknet prepare` then `masknet train`, on real samples and generated files."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from masknet.cli import main
from masknet.data.dataset import load_prepared
from masknet.data.encoder import Encoder
from masknet.errors import DataError
from masknet.data.rawgen import write_avazu, write_criteo, write_malware
from masknet.data.formats import AVAZU_COLUMNS, MALWARE_COLUMNS, MALWARE_NUMERIC

TINY = ["--epochs", "1", "--quiet", "--set", "train.threads=1", "--set", "model.block_dim=16", "--set", "model.embedding_dim=4"]


def prepare_ok(capsys, *args) -> str:
    code = main(["prepare", *args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def train_ok(capsys, data: Path, out: Path) -> dict:
    code = main(["train", "--data", str(data), "--output", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["auc"] <= 1.0
    return metrics


def check_prepared(path: Path, n_fields: int) -> None:
    ds = load_prepared(path)
    assert ds.num_fields == n_fields
    enc = Encoder.load(path / "encoder.json")
    assert enc.cardinalities == ds.cardinalities
    for s in ds.splits.values():
        x = np.asarray(s.x)
        assert x.dtype == np.int32
        if len(x):
            assert (x >= 0).all() and (x < np.array(ds.cardinalities)).all()
            assert set(np.unique(s.y)) <= {0, 1}


def test_criteo_8k_explicit_files_end_to_end(tmp_path, capsys, shared_data):
    d = shared_data("criteo-8k")
    out = tmp_path / "c8k"
    prepare_ok(
        capsys, "--format", "criteo", "--train", str(d / "train.txt"), "--valid", str(d / "valid.txt"),
        "--test", str(d / "test.txt"), "--output", str(out),
    )
    ds = load_prepared(out)
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 7200, "valid": 409, "test": 391}
    assert ds.meta["stats"]["positive_rate"]["train"] == pytest.approx(0.215, abs=0.001)
    assert all(f["min_count"] == 30 for f in ds.meta["stats"]["fields"])  # a small file (test_small_file_min_count.py)
    check_prepared(out, 39)
    train_ok(capsys, out, tmp_path / "run")


def test_criteo_csv_sample_end_to_end(tmp_path, capsys, shared_data):
    src = shared_data("criteo-sample-200", "criteo_sample.txt")
    out = tmp_path / "cs"
    prepare_ok(capsys, "--format", "criteo-csv", "--input", str(src), "--output", str(out), "--min-count", "1")
    ds = load_prepared(out)
    assert sum(len(s) for s in ds.splits.values()) == 200
    check_prepared(out, 39)
    train_ok(capsys, out, tmp_path / "run")


def test_criteo_csv_floats_encode_like_tsv_ints(tmp_path, capsys):
    """The CSV variant writes counts as floats (260.0): same tokens as the tab-separated ints."""
    tsv = write_criteo(tmp_path / "a.txt", 400, seed=5)
    csv = write_criteo(tmp_path / "b.csv", 400, seed=5, header=True, sep=",")
    prepare_ok(capsys, "--format", "criteo", "--input", str(tsv), "--output", str(tmp_path / "a"), "--min-count", "1")
    prepare_ok(capsys, "--format", "criteo-csv", "--input", str(csv), "--output", str(tmp_path / "b"), "--min-count", "1")
    a, b = load_prepared(tmp_path / "a"), load_prepared(tmp_path / "b")
    for s in a.splits:
        np.testing.assert_array_equal(np.asarray(a.splits[s].x), np.asarray(b.splits[s].x))


def test_criteo_gzip_reads_like_plain(tmp_path, capsys):
    plain = write_criteo(tmp_path / "c.txt", 500, seed=2)
    gz = tmp_path / "c.txt.gz"
    with open(plain, "rb") as fi, gzip.open(gz, "wb") as fo:
        shutil.copyfileobj(fi, fo)
    odd = tmp_path / "c.data"  # gzip detected by content, not by name
    shutil.copy(gz, odd)
    for name, src in (("p", plain), ("g", gz), ("o", odd)):
        prepare_ok(capsys, "--format", "criteo", "--input", str(src), "--output", str(tmp_path / name))
    p, g, o = (load_prepared(tmp_path / n) for n in "pgo")
    for s in p.splits:
        np.testing.assert_array_equal(np.asarray(p.splits[s].x), np.asarray(g.splits[s].x))
        np.testing.assert_array_equal(np.asarray(p.splits[s].x), np.asarray(o.splits[s].x))


def test_avazu_sample_end_to_end(tmp_path, capsys, shared_data):
    src = shared_data("avazu-sample-100", "avazu_sample.txt")
    out = tmp_path / "av"
    prepare_ok(capsys, "--format", "avazu", "--input", str(src), "--output", str(out), "--split", "time")
    ds = load_prepared(out)
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 80, "valid": 10, "test": 10}
    names = ds.field_names
    assert names[:3] == ["hour_of_day", "weekday", "weekend"] and "id" not in names and "click" not in names
    assert len(names) == 3 + len(AVAZU_COLUMNS) - 3
    check_prepared(out, 24)
    train_ok(capsys, out, tmp_path / "run")


def test_avazu_hour_features(tmp_path, capsys):
    """14102100 = Tuesday 2014-10-21 00:00; 14102523 = Saturday 23:00."""
    src = tmp_path / "av.csv"
    row = "{i},{y},{h},1005,0,a,b,c,d,e,f,g,h,i,1,2,15706,320,50,1722,0,35,-1,79"
    hours = ["14102100", "14102523", "14102612", "14102100"] * 5
    src.write_text(",".join(AVAZU_COLUMNS) + "\n" + "\n".join(row.format(i=i, y=i % 2, h=h) for i, h in enumerate(hours)) + "\n")
    out = tmp_path / "o"
    prepare_ok(capsys, "--format", "avazu", "--input", str(src), "--output", str(out), "--min-count", "1")
    enc = Encoder.load(out)
    vocab = {f.spec.name: f.vocab.to_pylist() for f in enc.fields}
    assert sorted(vocab["hour_of_day"]) == [0, 12, 23]
    assert sorted(vocab["weekday"]) == [1, 5, 6]  # Tue, Sat, Sun (0 = Monday)
    assert sorted(vocab["weekend"]) == [0, 1]


def test_avazu_generated_gzip_time_split(tmp_path, capsys):
    src = write_avazu(tmp_path / "train.gz", 3000, seed=1)
    out = tmp_path / "av"
    prepare_ok(capsys, "--format", "avazu", "--input", str(src), "--output", str(out), "--split", "time")
    ds = load_prepared(out)
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 2400, "valid": 300, "test": 300}
    assert ds.meta["source"]["split"]["column"] == "hour"
    check_prepared(out, 24)
    train_ok(capsys, out, tmp_path / "run")


def test_malware_generated_end_to_end(tmp_path, capsys):
    src = write_malware(tmp_path / "train.csv.gz", 2000, seed=4)
    with gzip.open(src, "rt") as fh:
        header = fh.readline().strip().split(",")
    assert header == MALWARE_COLUMNS and len(header) == 83
    out = tmp_path / "mw"
    prepare_ok(capsys, "--format", "malware", "--input", str(src), "--output", str(out))
    ds = load_prepared(out)
    assert ds.num_fields == 81
    assert "MachineIdentifier" not in ds.field_names and "HasDetections" not in ds.field_names
    kinds = {f["name"]: f["kind"] for f in ds.meta["fields"]}
    assert {n for n, k in kinds.items() if k == "numeric"} == set(MALWARE_NUMERIC)
    fields = {f["name"]: f for f in ds.meta["stats"]["fields"]}
    assert fields["PuaMode"]["missing_rate"]["train"] > 0.99  # realistic missing values come through as index 0
    assert fields["ProductName"]["missing_rate"]["train"] == 0
    assert all(f["min_count"] == 10 for f in fields.values())
    check_prepared(out, 81)
    train_ok(capsys, out, tmp_path / "run")


def test_frappe_full_rows_and_fields(tmp_path, capsys, shared_data):
    d = shared_data("frappe")
    both = tmp_path / "frappe.libfm"
    with open(both, "wb") as fo:
        for name in ("frappe.validation.libfm", "frappe.test.libfm"):
            fo.write((d / name).read_bytes())
    out = tmp_path / "fr"
    prepare_ok(capsys, "--format", "frappe", "--input", str(both), "--output", str(out))
    ds = load_prepared(out)
    sizes = {s: len(v) for s, v in ds.splits.items()}
    assert sum(sizes.values()) == 86582
    assert abs(sizes["train"] / 86582 - 0.8) < 0.01 and abs(sizes["valid"] / 86582 - 0.1) < 0.005
    assert ds.field_names == ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]
    assert ds.meta["stats"]["positive_rate"]["train"] == pytest.approx(1 / 3, abs=0.01)
    assert ds.cardinalities[2] == 2 + 7 and ds.cardinalities[4] == 2 + 2  # daytime 7 values, isweekend 2
    check_prepared(out, 10)


def test_frappe_subset_end_to_end(tmp_path, capsys, shared_data):
    d = shared_data("frappe")
    src = tmp_path / "small.libfm"
    src.write_text("".join((d / "frappe.test.libfm").read_text().splitlines(keepends=True)[:3000]))
    out = tmp_path / "fr"
    prepare_ok(capsys, "--format", "frappe", "--input", str(src), "--output", str(out))
    check_prepared(out, 10)
    train_ok(capsys, out, tmp_path / "run")


def test_schema_csv_and_parquet_end_to_end(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n = 1200
    table = pa.table(
        {
            "ts": pa.array(rng.permutation(n) + 1_600_000_000),
            "clicked": pa.array(rng.integers(0, 2, n)),
            "user": pa.array([f"u{v}" for v in rng.integers(0, 50, n)]),
            "ip": pa.array([f"10.0.{v // 256}.{v % 256}" for v in rng.integers(0, 5000, n)]),
            "price": pa.array(np.round(rng.lognormal(2, 1, n), 2)),
            "unused": pa.array(["z"] * n),
        }
    )
    schema = tmp_path / "schema.yaml"
    schema.write_text(
        "label: clicked\n"
        "categorical: [user, {name: ip, hash_buckets: 64}]\n"
        "numeric: [price]\n"
        "time: ts\n"
        "min_count: 2\n"
    )
    pq.write_table(table, tmp_path / "log.parquet")
    import pyarrow.csv as pacsv

    pacsv.write_csv(table, tmp_path / "log.csv")
    for name in ("log.parquet", "log.csv"):
        out = tmp_path / name.replace(".", "_")
        prepare_ok(capsys, "--format", f"schema:{schema}", "--input", str(tmp_path / name), "--output", str(out), "--split", "time")
        ds = load_prepared(out)
        assert ds.field_names == ["user", "ip", "price"]
        assert ds.cardinalities[1] == 2 + 64
        assert {s: len(v) for s, v in ds.splits.items()} == {"train": 960, "valid": 120, "test": 120}
        check_prepared(out, 3)
    a, b = load_prepared(tmp_path / "log_parquet"), load_prepared(tmp_path / "log_csv")
    for s in a.splits:  # Parquet and CSV of the same table encode identically
        np.testing.assert_array_equal(np.asarray(a.splits[s].x), np.asarray(b.splits[s].x))
    train_ok(capsys, tmp_path / "log_parquet", tmp_path / "run")


def test_cli_hash_option(tmp_path, capsys):
    src = write_criteo(tmp_path / "c.txt", 400, seed=8)
    out = tmp_path / "h"
    prepare_ok(capsys, "--format", "criteo", "--input", str(src), "--output", str(out), "--hash", "C3=50", "--hash", "C12=7")
    ds = load_prepared(out)
    card = dict(zip(ds.field_names, ds.cardinalities))
    assert card["C3"] == 52 and card["C12"] == 9
    assert Encoder.load(out).fields[ds.field_names.index("C3")].vocab is None
    code = main(["prepare", "--format", "criteo", "--input", str(src), "--output", str(tmp_path / "x"), "--hash", "I1=5"])
    assert code == 2 and "only categorical" in capsys.readouterr().err


@pytest.mark.parametrize("key, bad, message", [
    ("categorical", "[{column: C1}]", r"categorical\[0\]: expected a column name or a mapping with 'name'"),
    ("numeric", "[{name: I1, hash_bucket: 3}]", r"numeric\[0\]: unknown key 'hash_bucket'; known: name, column, min_count, hash_buckets"),
    ("labels", "[{column: y}]", r"labels\[0\]: expected a column name or a mapping with 'name'"),
    ("labels", "[y, {name: z, positiv: 1}]", r"labels\[1\]: unknown key 'positiv'; known: name, positive, allow_missing"),
])
def test_schema_column_entries_are_checked_alike(tmp_path, key, bad, message):
    """categorical, numeric and labels entries go through one normaliser (schema.named_entries)."""
    from masknet.data.schema import load_schema_file

    body = {"categorical": "categorical: [C1]", "numeric": "numeric: [I1]", "labels": "labels: [y]"}
    body[key] = f"{key}: {bad}"
    if key != "labels":
        body["labels"] = "label: y"
    path = tmp_path / "s.yaml"
    path.write_text("\n".join(body.values()) + "\n")
    with pytest.raises(DataError, match=message):
        load_schema_file(path)
