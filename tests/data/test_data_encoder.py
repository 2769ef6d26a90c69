"""Encoder conventions, splits and streaming invariants of the data layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from masknet.data.dataset import load_prepared
from masknet.data.encoder import Encoder, FieldEncoder, fit_field, fnv1a64, log_bucket, parse_numbers, transform
from masknet.data.prepare import prepare
from masknet.data.splits import random_split
from masknet.data.rawgen import write_criteo
from masknet.data.formats import builtin_spec
from masknet.data.schema import FieldSpec, load_schema_file
from masknet.errors import DataError


def test_log_bucket_criteo_convention():
    x = np.array([-3.0, -1.0, 0.0, 1.0, 2.0, 2.5, 3.0, 10.0, 1000.0, 0.5])
    got = log_bucket(x)
    # small values (incl. negatives) are their own buckets; x > 2 -> 1000 + floor(ln(x)^2)
    assert got.tolist()[:5] == [-3, -1, 0, 1, 2]
    assert got[5] == 1000 + int(np.floor(np.log(2.5) ** 2))  # 1000 + 0
    assert got[6] == 1000 + 1 and got[7] == 1000 + 5 and got[8] == 1000 + 47
    assert got[9] == 0
    assert len(set(got[:5]) & set(got[5:9])) == 0  # no collision between small values and log buckets


def test_number_parsing_is_strict():
    vals = pa.array(["1", "-2", "3.50", "1e3", ".5", "abc", "nan", "inf", "1,5", " 7", "0x10", "+4"])
    f, bad = parse_numbers(vals)
    assert bad.tolist() == [False, False, False, False, False, True, True, True, True, True, True, False]
    assert f[:5].tolist() == [1.0, -2.0, 3.5, 1000.0, 0.5]


def test_vocab_min_count_oov_missing_indices():
    fs = FieldSpec("c", "c", "category", min_count=2)
    counts = pa.table({"t": ["a", "b", "c", "d"], "c": [5, 2, 1, 9]})
    fe = fit_field(fs, counts)
    assert fe.vocab.to_pylist() == ["d", "a", "b"]  # by count, then token; "c" is below the min count
    assert fe.cardinality == 2 + 3
    codes = fe.codes(pa.array(["a", "b", "c", "d", "never seen"]))
    assert codes.tolist() == [3, 4, 1, 2, 1]  # 0 = missing, 1 = OOV, 2.. = vocabulary


def test_hashing_is_stable_and_in_range():
    # FNV-1a 64 reference values
    h = fnv1a64(pa.array(["", "a", "foobar"]))
    assert h.tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]
    fe = FieldEncoder(FieldSpec("ip", "ip", "category", 1, hash_buckets=10), None)
    codes = fe.codes(pa.array([f"10.0.0.{i}" for i in range(1000)]))
    assert codes.min() >= 2 and codes.max() < 12 and len(set(codes.tolist())) == 10
    assert fe.cardinality == 12
    np.testing.assert_array_equal(codes, fe.codes(pa.array([f"10.0.0.{i}" for i in range(1000)])))


def test_random_split_deterministic_ratios_and_seeded():
    rows = np.arange(200_000, dtype=np.int64)
    a = random_split(rows, 7)
    assert np.array_equal(a, random_split(rows, 7))
    assert not np.array_equal(a, random_split(rows, 8))
    frac = np.bincount(a, minlength=3) / len(rows)
    assert np.allclose(frac, [0.8, 0.1, 0.1], atol=0.005)
    # row r's split depends on r only: a chunk computes the same codes as the whole file
    np.testing.assert_array_equal(random_split(rows[1234:5678], 7), a[1234:5678])


@pytest.fixture(scope="module")
def criteo_file(tmp_path_factory) -> Path:
    return write_criteo(tmp_path_factory.mktemp("c") / "train.txt", 6000, seed=11)


def _arrays(path: Path) -> dict:
    ds = load_prepared(path)
    return {s: (np.asarray(v.x).copy(), np.asarray(v.y).copy()) for s, v in ds.splits.items()}


def test_block_size_does_not_change_the_result(tmp_path, criteo_file, monkeypatch):
    """Chunking (reader blocks and spill windows) is invisible in the output."""
    import masknet.data.spill as prep

    prepare(builtin_spec("criteo"), tmp_path / "a", input=criteo_file)
    monkeypatch.setattr(prep, "WINDOW_ROWS", 500)
    prepare(builtin_spec("criteo"), tmp_path / "b", input=criteo_file, block_bytes=64 << 10)
    a, b = _arrays(tmp_path / "a"), _arrays(tmp_path / "b")
    for s in a:
        np.testing.assert_array_equal(a[s][0], b[s][0])
        np.testing.assert_array_equal(a[s][1], b[s][1])
    assert json.loads((tmp_path / "a" / "encoder.json").read_text()) == json.loads((tmp_path / "b" / "encoder.json").read_text())


def test_encoder_fitted_on_train_only_and_reapplied_identically(tmp_path, criteo_file):
    """Re-encoding every raw row with the saved encoder reproduces the prepared arrays."""
    from masknet.data.rows import parse_chunk
    from masknet.data.readers import iter_chunks

    out = tmp_path / "p"
    stats = prepare(builtin_spec("criteo"), out, input=criteo_file, seed=5)
    enc = Encoder.load(out / "encoder.json")
    ds = load_prepared(out)
    xs = {s: [] for s in ds.splits}
    for raw in iter_chunks(enc.spec, criteo_file):
        pc_ = parse_chunk(enc.spec, raw, str(criteo_file))
        x = np.stack([np.concatenate([fe.codes(tok.tokens), [0]])[ix] for fe, (ix, tok) in zip(enc.fields, pc_.fields)], axis=1)
        codes = random_split(pc_.row_ids, 5)
        for c, s in enumerate(ds.splits):
            xs[s].append(x[codes == c])
    for s in ds.splits:
        np.testing.assert_array_equal(np.concatenate(xs[s]), np.asarray(ds.splits[s].x))
    # vocabulary counts come from train rows only: a category only in valid/test is OOV
    train_x = np.asarray(ds.splits["train"].x)
    for s in ("valid", "test"):
        x = np.asarray(ds.splits[s].x)
        assert (x == 1).any()  # some unseen categories
    assert (train_x[:, 13:] >= 2).mean() > 0.5
    # a field's vocabulary entries all reach the min count in train: 30 on this small file (4,800 train
    # rows; the format's 10 from 100,000: test_small_file_min_count.py)
    assert all(f["min_count"] == 30 for f in stats["fields"])
    # the stats' missing and OOV rates are the arrays' own
    for s in ds.splits:
        x = np.asarray(ds.splits[s].x)
        for j, f in enumerate(stats["fields"]):
            assert f["missing_rate"][s] == pytest.approx((x[:, j] == 0).mean(), abs=1e-12), (s, f["name"])
            assert f["oov_rate"][s] == pytest.approx((x[:, j] == 1).mean(), abs=1e-12), (s, f["name"])
    assert any(f["oov_rate"]["test"] > 0 for f in stats["fields"]) and any(f["missing_rate"]["train"] > 0 for f in stats["fields"])


def test_unseen_categories_map_to_oov(tmp_path):
    tr = tmp_path / "tr.csv"
    tr.write_text("y,a\n" + "".join(f"{i % 2},{v}\n" for i, v in enumerate("xxyyxxyy")))
    te = tmp_path / "te.csv"
    te.write_text("y,a\n0,x\n1,brand-new\n0,\n")
    schema = tmp_path / "s.yaml"
    schema.write_text("label: y\ncategorical: [a]\n")
    prepare(load_schema_file(schema), tmp_path / "o", train=tr, valid=te, test=te)
    ds = load_prepared(tmp_path / "o")
    enc = Encoder.load(tmp_path / "o")
    assert enc.fields[0].vocab.to_pylist() == ["x", "y"]
    assert np.asarray(ds.splits["test"].x)[:, 0].tolist() == [2, 1, 0]  # seen, OOV, missing


def test_time_split_by_column_and_by_file_order(tmp_path):
    n = 100
    rng = np.random.default_rng(0)
    t = rng.permutation(n)
    t[:10] = 42  # ties: broken by file order
    src = tmp_path / "log.csv"
    src.write_text("y,t,k\n" + "".join(f"{i % 2},{t[i]},{t[i]}\n" for i in range(n)))
    schema = tmp_path / "s.yaml"
    schema.write_text("label: y\ncategorical: [k]\ntime: t\n")
    prepare(load_schema_file(schema), tmp_path / "o", input=src, split="time")
    ds = load_prepared(tmp_path / "o")
    vocab = Encoder.load(tmp_path / "o").fields[0].vocab.to_pylist()

    def times(split: str) -> list[int]:
        x = np.asarray(ds.splits[split].x)[:, 0]
        return [int(vocab[c - 2]) if c >= 2 else None for c in x]  # valid/test times are OOV unless also in train

    tr = times("train")
    assert len(tr) == 80 and len(ds.splits["valid"]) == 10 and len(ds.splits["test"]) == 10
    order = sorted(range(n), key=lambda i: (t[i], i))
    assert sorted(tr) == sorted(int(t[i]) for i in order[:80])
    # file order, no time column: the first 80 lines are train
    schema.write_text("label: y\ncategorical: [k]\n")
    prepare(load_schema_file(schema), tmp_path / "f", input=src, split="time")
    ds2 = load_prepared(tmp_path / "f")
    assert [len(ds2.splits[s]) for s in ("train", "valid", "test")] == [80, 10, 10]
    assert np.asarray(ds2.splits["train"].y).tolist() == [i % 2 for i in range(80)]


def test_stats_report_rows_rates_cardinalities(tmp_path, criteo_file):
    stats = prepare(builtin_spec("criteo"), tmp_path / "o", input=criteo_file)
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["stats"]["rows"] == stats["rows"]
    assert sum(stats["rows"].values()) == 6000
    assert set(stats["positive_rate"]) == {"train", "valid", "test"}
    assert [f["cardinality"] for f in stats["fields"]] == [f["cardinality"] for f in meta["fields"]]
    assert stats["bad_lines"]["total"] == 0
    assert meta["source"]["encoder"] == "encoder.json"
    assert (tmp_path / "o" / "encoder.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no build or spill folder left beside it


def test_schema_file_errors(tmp_path):
    s = tmp_path / "s.yaml"
    s.write_text("categorical: [a]\n")
    with pytest.raises(DataError, match="'label'"):
        load_schema_file(s)
    s.write_text("label: y\ncategorical: [{name: a, hash_buckets: 0}]\n")
    with pytest.raises(DataError, match=r"categorical\[0\]: hash_buckets"):
        load_schema_file(s)
    s.write_text("label: y\nnumeric: [{name: a, hash_buckets: 5}]\n")
    with pytest.raises(DataError, match="only categorical"):
        load_schema_file(s)
    s.write_text("label: y\ncategorical: [y]\n")
    with pytest.raises(DataError, match="also listed as a feature"):
        load_schema_file(s)
    s.write_text("label: y\nheader: false\ncategorical: [a]\n")
    with pytest.raises(DataError, match="columns: required"):
        load_schema_file(s)


def test_transform_on_dictionary_values():
    tok = transform(FieldSpec("I1", "I1", "log_bucket"), pa.array(["3", "x", "-1"]))
    assert tok.bad.tolist() == [False, True, False]
    assert tok.tokens.to_pylist()[0] == 1001 and tok.tokens.to_pylist()[2] == -1
    tok = transform(FieldSpec("u", "u", "libfm"), pa.array(["204:1", "5:1.0", "7:2", "x"]))
    assert tok.bad.tolist() == [False, False, True, True]
    assert tok.tokens.to_pylist()[:2] == ["204", "5"]


def test_encode_file_with_saved_encoder_matches_prepared(tmp_path):
    """Prediction-time encoding of raw rows (with or without the label column) = the prepared arrays."""
    from masknet.data.rawrows import encode_file

    rows = write_criteo(tmp_path / "all.txt", 900, seed=9).read_text().splitlines()
    tr, va, te = (tmp_path / f"{n}.txt" for n in ("tr", "va", "te"))
    tr.write_text("\n".join(rows[:700]) + "\n")
    va.write_text("\n".join(rows[700:800]) + "\n")
    te.write_text("\n".join(rows[800:]) + "\n")
    out = tmp_path / "o"
    prepare(builtin_spec("criteo"), out, train=tr, valid=va, test=te)
    ds = load_prepared(out)
    parts = list(encode_file(out / "encoder.json", te))
    x = np.concatenate([p[0] for p in parts])
    np.testing.assert_array_equal(x, np.asarray(ds.splits["test"].x))
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), np.asarray(ds.splits["test"].y))
    # a CSV with header and no label column, through a schema-free path: criteo-csv encoder on unlabeled rows
    csv = tmp_path / "nolabel.csv"
    write_criteo(tmp_path / "lab.csv", 50, seed=1, header=True, sep=",")
    lines = (tmp_path / "lab.csv").read_text().splitlines()
    csv.write_text("\n".join(",".join(l.split(",")[1:]) for l in lines) + "\n")
    prepare(builtin_spec("criteo-csv"), tmp_path / "o2", input=tmp_path / "lab.csv", split="time")
    parts = list(encode_file(tmp_path / "o2", csv))
    assert parts[0][1] is None and sum(len(p[0]) for p in parts) == 50
    assert parts[0][2][0] == 2  # line numbers: the header is line 1


def test_spill_windows_round_trip_with_growing_chunks(tmp_path, monkeypatch):
    """Pass 1's spill reuses one buffer for every window; chunks that grow past its capacity,
    skipped bad rows and windows of every size come back exactly (tokens and indices)."""
    from types import SimpleNamespace

    import masknet.data.spill as prep
    from masknet.data.encoder import Tokens
    from masknet.data.formats import builtin_spec

    monkeypatch.setattr(prep, "WINDOW_ROWS", 300)
    spec = builtin_spec("frappe")
    nf = len(spec.fields)
    rng = np.random.default_rng(3)
    spill = prep.Spill(tmp_path / "spill", spec)
    expected, written = [], []  # per kept row: the token of every field (None = missing)
    for n in (40, 90, 700, 20, 1500, 5, 333):  # 700 and 1500 outgrow the buffer mid-window
        vocab = [pa.array([f"f{j}-{v}" for v in rng.integers(0, 50, size=17)]) for j in range(nf)]
        idx = [np.where(rng.random(n) < 0.1, -1, rng.integers(0, 17, size=n)).astype(np.int32) for _ in range(nf)]
        good = rng.random(n) < 0.9
        pc_ = SimpleNamespace(n=n, y=rng.integers(0, 2, size=n).astype(np.uint8), fields=[(i, Tokens(v)) for i, v in zip(idx, vocab)])
        for r in np.nonzero(good)[0]:
            expected.append([None if idx[j][r] < 0 else vocab[j][int(idx[j][r])].as_py() for j in range(nf)])
        w = spill.add(pc_, good, np.zeros(int(good.sum()), np.uint8))
        if w is not None:
            written.append(w.ix.shape[1])
    w = spill.flush()
    written.append(w.ix.shape[1])
    got = []
    for ix, tokens, y, codes in spill.windows():
        for r in range(ix.shape[1]):
            got.append([None if ix[j, r] < 0 else tokens[j][int(ix[j, r])].as_py() for j in range(nf)])
    spill.close()
    assert len(written) == 3 and sum(written) == len(expected)
    assert got == expected
