"""Batch prediction on raw files (every real sample in ../shared/data) and evaluation."""

from __future__ import annotations

import csv
import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from masknet.cli import main
from masknet.data.dataset import load_prepared
from masknet.errors import UserError
from masknet.serving.bundle import verify_and_load
from masknet.serving.predict import encode_raw, predict_file, score

from serving_helpers import need, prepared, trained


@pytest.fixture(scope="module")
def criteo():
    return verify_and_load(trained("criteo8k"))


def read_scores(path):
    if str(path).endswith(".parquet"):
        return pq.read_table(path).to_pydict()
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return {k: [r[k] for r in rows] for k in rows[0]}


def test_predict_criteo_8k_test_file_matches_prepared_rows(criteo, tmp_path):
    src = need("criteo-8k", "test.txt")
    out = tmp_path / "scores.parquet"
    assert main(["predict", "--model", str(criteo.path), "--input", str(src), "--output", str(out)]) == 0
    got = np.asarray(read_scores(out)["score"], dtype=np.float32)
    test = load_prepared(prepared("criteo8k")).splits["test"]
    want = score(criteo.model, np.asarray(test.x, dtype=np.int64))  # same rows, encoded by `prepare`
    assert len(got) == 391 == len(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    csv_out = tmp_path / "scores.csv"
    assert main(["predict", "--model", str(criteo.path), "--input", str(src), "--output", str(csv_out)]) == 0
    assert list(read_scores(csv_out)) == ["score"]
    np.testing.assert_allclose(np.asarray(read_scores(csv_out)["score"], dtype=np.float32), want, atol=1e-6)


def test_predict_streams_in_blocks(criteo, tmp_path):
    src = need("criteo-8k", "valid.txt")  # ~99 kB: many 16 kB blocks
    out_small, out_big = tmp_path / "small.parquet", tmp_path / "big.parquet"
    predict_file(criteo, src, out_small, block_bytes=16 << 10)
    predict_file(criteo, src, out_big)
    assert pq.ParquetFile(out_small).metadata.num_row_groups > 3  # written block by block, not buffered
    a, b = read_scores(out_small)["score"], read_scores(out_big)["score"]
    assert len(a) == len(b) == 409
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # equal up to float32 batching effects


def test_predict_criteo_sample_200_in_csv_layout(criteo, tmp_path):
    src = need("criteo-sample-200", "criteo_sample.txt")
    out = tmp_path / "s.csv"
    assert main(["predict", "--model", str(criteo.path), "--input", str(src), "--format", "criteo-csv", "--output", str(out)]) == 0
    s = np.asarray(read_scores(out)["score"], dtype=np.float64)
    assert len(s) == 200 and np.all((s > 0) & (s < 1)) and len(np.unique(s)) > 20
    # without --format: a one-line error that says which format the model expects
    with pytest.raises(UserError, match="trained on format criteo; give --format"):
        predict_file(criteo, src, tmp_path / "t.csv")
    with pytest.raises(UserError, match="--format avazu: its fields do not match"):
        predict_file(criteo, src, tmp_path / "t.csv", fmt="avazu")


def test_predict_avazu_sample_keeps_ids_in_order(tmp_path):
    src = need("avazu-sample-100", "avazu_sample.txt")
    bundle = verify_and_load(trained("avazu"))
    out = tmp_path / "a.csv"
    assert main(["predict", "--model", str(bundle.path), "--input", str(src), "--output", str(out)]) == 0
    got = read_scores(out)
    with open(src) as fh:
        ids = [r["id"] for r in csv.DictReader(fh)]
    assert list(got) == ["id", "score"] and got["id"] == ids and len(ids) == 100


def test_predict_frappe_test_file(tmp_path):
    src = need("frappe", "frappe.test.libfm")
    bundle = verify_and_load(trained("frappe"))
    out = tmp_path / "f.parquet"
    r = predict_file(bundle, src, out)
    assert r["rows"] == 28860 and pq.read_metadata(out).num_rows == 28860
    s = np.asarray(read_scores(out)["score"])
    assert np.isfinite(s).all() and s.std() > 0


def test_unseen_categories_are_out_of_vocabulary_and_unlabelled_gz_input(criteo, tmp_path):
    line = need("criteo-8k", "test.txt").read_text().splitlines()[0].split("\t")
    novel = line[1:14] + ["never-seen-%d" % i for i in range(26)]  # unlabelled: 39 columns, like Criteo's test.txt
    src = tmp_path / "new.txt.gz"
    with gzip.open(src, "wt") as fh:
        fh.write("\t".join(novel) + "\n" + "\t".join(line[1:]) + "\n")
    (x, _, _, _), = list(encode_raw(criteo, src))
    assert (x[0, 13:] == 1).all()  # every unseen category -> index 1 (OOV)
    assert (x[1, 13:] != 1).any()
    r = predict_file(criteo, src, tmp_path / "s.csv")
    assert r["rows"] == 2


def test_bad_lines_error_or_skip(criteo, tmp_path):
    lines = need("criteo-8k", "test.txt").read_text().splitlines()[:5]
    lines[2] = lines[2].replace("\t", "\tx", 1)  # I1 = 'x...': not a number
    src = tmp_path / "bad.txt"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="line 3: field 'I1': not a number"):
        predict_file(criteo, src, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()  # nothing half-written
    r = predict_file(criteo, src, tmp_path / "s.csv", bad_lines="skip")
    assert r["rows"] == 4 and r["skipped"] == 1
    assert read_scores(tmp_path / "s.csv")["line"] == ["1", "2", "4", "5"]


def test_synthetic_run_cannot_read_raw_rows(tmp_path):
    bundle = verify_and_load(trained("synthetic"))
    assert bundle.encoder is None
    with pytest.raises(UserError, match="built-in synthetic data, which has no raw format"):
        predict_file(bundle, need("criteo-8k", "test.txt"), tmp_path / "s.csv")


def test_evaluate_on_prepared_split_and_raw_file(criteo, capsys):
    metrics = json.loads((criteo.path / "metrics.json").read_text())
    assert main(["evaluate", "--model", str(criteo.path), "--data", str(prepared("criteo8k"))]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["rows"] == 391 and r["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-9)
    assert r["logloss"] == pytest.approx(metrics["test"]["logloss"], abs=1e-6)
    assert main(["evaluate", "--model", str(criteo.path), "--input", str(need("criteo-8k", "test.txt"))]) == 0
    assert json.loads(capsys.readouterr().out)["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)
    # a prepared folder from another encoder is refused
    assert main(["evaluate", "--model", str(criteo.path), "--data", str(prepared("avazu"))]) == 2
    assert "do not match the model's" in capsys.readouterr().err
