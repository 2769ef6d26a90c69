"""Multi-task end to end on the real samples (Ali-CCP: click + purchase; Census-Income: income and
marital status, no header, leading spaces) and on the built-in data: prepare, train, predict,
evaluate, export to ONNX (every output within 1e-5 of PyTorch) and serve /rank with weights."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from masknet.cli import main
from masknet.data.dataset import load_prepared

from serving_helpers import need

TINY = ["--epochs", "2", "--set", "model.block_dim=16", "--set", "model.num_blocks=2", "--set", "model.top_mlp=16",
        "--set", "model.dnn_hidden=16", "--set", "train.threads=1", "--set", "train.batch_size=64", "--quiet"]

SCHEMAS = Path(__file__).resolve().parents[2] / "configs" / "schemas"  # also used by benchmarks/prepare_identity.py
ALI_SCHEMA = (SCHEMAS / "ali-ccp.yaml").read_text()


def census_schema() -> str:
    return (SCHEMAS / "census-income.yaml").read_text()


@pytest.fixture(scope="module")
def ali(tmp_path_factory):
    d = need("ali-ccp-sample")
    root = tmp_path_factory.mktemp("ali")
    (root / "schema.yaml").write_text(ALI_SCHEMA)
    assert main(["prepare", "--format", f"schema:{root / 'schema.yaml'}", "--train", str(d / "ali_ccp_train_sample.csv"),
                 "--valid", str(d / "ali_ccp_val_sample.csv"), "--test", str(d / "ali_ccp_test_sample.csv"),
                 "--output", str(root / "data")]) == 0
    run = root / "run"
    assert main(["train", "--data", str(root / "data"), "--output", str(run), *TINY, "--set", "model.multitask=mmoe",
                 "--set", "model.num_experts=2", "--set", "train.calibration=isotonic"]) == 0
    return root, run, d


def test_ali_ccp_prepare_keeps_both_labels(ali):
    root, _, d = ali
    ds = load_prepared(root / "data")
    assert ds.task_names == ["click", "purchase"]
    with open(d / "ali_ccp_train_sample.csv") as f:
        rows = list(csv.DictReader(f))
    lab = np.asarray(ds.splits["train"].labels)
    assert lab[:, 0].tolist() == [int(r["click"]) for r in rows] and lab[:, 1].tolist() == [int(r["purchase"]) for r in rows]


def test_ali_ccp_predict_evaluate_export(ali, tmp_path, capsys):
    _, run, d = ali
    test_csv = d / "ali_ccp_test_sample.csv"
    assert main(["predict", "--model", str(run), "--input", str(test_csv), "--output", str(tmp_path / "s.csv")]) == 0
    with open(tmp_path / "s.csv") as f:
        out = list(csv.DictReader(f))
    assert list(out[0]) == ["score_click", "score_purchase", "score_uncalibrated_click", "score_uncalibrated_purchase"]
    assert len(out) == 50
    from masknet.serving.bundle import verify_and_load
    from masknet.serving.predict import score_both

    b = verify_and_load(run)
    x = np.asarray(load_prepared(ali[0] / "data").splits["test"].x, np.int64)
    served, raw = score_both(b.model, x, head=b.head)
    np.testing.assert_allclose([float(r["score_purchase"]) for r in out], served[:, 1], atol=1e-6)
    np.testing.assert_allclose([float(r["score_uncalibrated_click"]) for r in out], raw[:, 0], atol=1e-6)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run), "--input", str(test_csv)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert set(ev["tasks"]) == {"click", "purchase"} and ev["tasks"]["purchase"]["positives"] == 1
    assert main(["evaluate", "--model", str(run), "--data", str(ali[0] / "data")]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"]["click"]["auc"] == pytest.approx(ev["tasks"]["click"]["auc"])


def test_multitask_onnx_matches_pytorch_on_every_output(ali, tmp_path):
    from masknet.serving.bundle import verify_and_load
    from masknet.serving.export import export_onnx_bytes, onnx_session, output_names, parity_by_output

    b = verify_and_load(ali[1])
    data = export_onnx_bytes(b)
    diffs = parity_by_output(b, data, rows=513)
    assert set(diffs) == {"score", "score_uncalibrated", "logit"} and max(diffs.values()) < 1e-5
    sess = onnx_session(data)
    x = np.asarray(load_prepared(ali[0] / "data").splits["test"].x, np.int64)
    got = dict(zip(output_names(b), sess.run(None, {"x": x})))
    assert got["score"].shape == (50, 2) == got["logit"].shape
    with torch.no_grad():
        logit = b.model(torch.from_numpy(x))
        score, uncal = b.head(logit)
    for name, want in (("score", score), ("score_uncalibrated", uncal), ("logit", logit)):
        assert np.max(np.abs(got[name] - want.numpy())) < 1e-5, name
    meta = {p.key: p.value for p in __import__("onnx").load_from_string(data).metadata_props}
    assert json.loads(meta["masknet.tasks"]) == ["click", "purchase"]


def test_ali_ccp_rank_by_weighted_tasks(ali):
    from fastapi.testclient import TestClient

    from masknet.serving.bundle import verify_and_load
    from masknet.serving.service import create_app

    _, run, d = ali
    with open(d / "ali_ccp_test_sample.csv") as f:
        rows = [{k: v for k, v in r.items() if k not in ("click", "purchase")} for r in list(csv.DictReader(f))[:6]]
    client = TestClient(create_app(verify_and_load(run), task_weights={"click": 1.0, "purchase": 10.0}))
    meta = client.get("/metadata").json()
    assert meta["tasks"] == ["click", "purchase"] and meta["task_weights"] == {"click": 1.0, "purchase": 10.0}
    assert meta["calibration"]["method"] == "isotonic"
    r = client.post("/rank", json={"candidates": [{"id": f"c{i}", "features": row} for i, row in enumerate(rows)]}).json()
    ts = r["task_scores"]
    combined = [c + 10 * p for c, p in zip(ts["click"], ts["purchase"])]
    assert r["scores"] == pytest.approx(combined)
    assert [e["index"] for e in r["ranking"]] == sorted(range(6), key=lambda i: -combined[i])
    assert r["ranking"][0]["task_scores"] == {t: ts[t][r["ranking"][0]["index"]] for t in ts}
    per_request = client.post("/rank", json={"candidates": [{"features": row} for row in rows], "weights": {"purchase": 0},
                                             "uncalibrated": True}).json()
    assert per_request["scores"] == pytest.approx(ts["click"]) and per_request["weights"] == {"click": 1.0, "purchase": 0.0}
    assert set(per_request["uncalibrated"]) == {"click", "purchase"}
    onnx = TestClient(create_app(verify_and_load(run), runtime="onnx", threads=1, task_weights={"click": 1.0, "purchase": 10.0}))
    r_onnx = onnx.post("/rank", json={"candidates": [{"id": f"c{i}", "features": row} for i, row in enumerate(rows)]}).json()
    assert r_onnx["scores"] == pytest.approx(r["scores"], abs=1e-5)
    assert r_onnx["task_scores"]["purchase"] == pytest.approx(ts["purchase"], abs=1e-5)
    pred = client.post("/predict", json={"rows": rows[:2], "uncalibrated": True}).json()
    assert pred["scores"] == pytest.approx(combined[:2]) and len(pred["uncalibrated"]["click"]) == 2
    bad = client.post("/rank", json={"candidates": [{"features": rows[0]}], "weights": {"like": 1}})
    assert bad.status_code == 422 and "weights.like: no such task" in bad.json()["error"]
    bad = client.post("/rank", json={"candidates": [{"features": rows[0]}], "weights": {"click": -1}})
    assert bad.status_code == 422 and "must be a number >= 0" in bad.json()["error"]


def test_census_income_end_to_end(tmp_path, capsys):
    src = need("census-income-sample", "census-income.sample")
    (tmp_path / "schema.yaml").write_text(census_schema())
    # seed 12: the 200-row sample's 12 incomes over 50k fall 8 / 2 / 2 into train / valid / test
    assert main(["prepare", "--format", f"schema:{tmp_path / 'schema.yaml'}", "--input", str(src), "--seed", "12",
                 "--output", str(tmp_path / "d")]) == 0
    ds = load_prepared(tmp_path / "d")
    assert ds.task_names == ["income_50k", "marital_stat"]
    lines = src.read_text().splitlines()
    income = sum(line.rsplit(",", 1)[1] == " 50000+." for line in lines)
    never = sum(line.split(",")[8] == " Never married" for line in lines)
    total = {t: sum(int(np.asarray(ds.splits[s].labels)[:, i].sum()) for s in ds.splits) for i, t in enumerate(ds.task_names)}
    assert total == {"income_50k": income, "marital_stat": never} and income == 12
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "d"), "--output", str(run), *TINY, "--model", "dcnv2",
                 "--set", "model.multitask=shared_bottom", "--set", "train.early_stopping=marital_stat"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["tasks"]) == {"income_50k", "marital_stat"} and m["model"] == "dcnv2"
    capsys.readouterr()
    assert main(["predict", "--model", str(run), "--input", str(src), "--output", str(tmp_path / "s.parquet")]) == 0
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "s.parquet")
    assert t.column_names == ["score_income_50k", "score_marital_stat"] and t.num_rows == 200


def test_builtin_multitask_onnx_parity_with_downsampling(tmp_path):
    """A multi-task ParaMaskNet trained with negative down-sampling and Platt calibration exports
    its correction and calibrators into the graph: every output within 1e-5."""
    from masknet.serving.bundle import verify_and_load
    from masknet.serving.export import export_onnx_bytes, parity_by_output

    run = tmp_path / "run"
    assert main(["train", "--model", "paramasknet", "--output", str(run), *TINY, "--set", "data.synthetic.rows=10000",
                 "--set", "data.synthetic.multitask=true", "--set", "model.multitask=shared_bottom", "--set", "train.lr=0.003",
                 "--set", "train.batch_size=256", "--set", "train.negative_sampling_rate=0.3", "--set", "train.calibration=platt",
                 # stopping on the mean keeps the model it was written with: stopped on the click at step 90
                 # this tiny model's scores are so close together that Platt's slope is 131, which
                 # multiplies float32 rounding (1e-7) past 1e-5 in any exporter
                 "--set", "train.early_stopping=mean"]) == 0
    b = verify_and_load(run)
    assert b.head.rate == 0.3 and b.head_method == "platt"
    diffs = parity_by_output(b, export_onnx_bytes(b), rows=1000)
    assert max(diffs.values()) < 1e-5, diffs


def test_single_task_service_answers_as_before():
    from fastapi.testclient import TestClient

    from masknet.serving.bundle import verify_and_load
    from masknet.serving.service import create_app
    from serving_helpers import trained

    b = verify_and_load(trained("synthetic"))
    assert not b.multitask and b.tasks == ["click"] and not b.calibrated
    client = TestClient(create_app(b))
    row = {name: 1 for name in b.field_names}
    r = client.post("/rank", json={"candidates": [{"features": row}, {"features": dict(row, C1=2)}]}).json()
    assert set(r) == {"model", "scores", "ranking"} and set(r["ranking"][0]) == {"id", "index", "score"}
    assert set(client.post("/predict", json={"rows": [row]}).json()) == {"model", "scores"}
    bad = client.post("/rank", json={"candidates": [{"features": row}], "weights": {"click": 2}})
    assert bad.status_code == 422 and "weights are for multi-task models" in bad.json()["error"]
    meta = client.get("/metadata").json()
    assert meta["tasks"] == ["click"] and meta["multitask"] is False and meta["calibration"]["method"] == "none"


def test_trained_isotonic_calibrators_respect_the_slope_cap(ali):
    """train.calibration_max_slope (default 10) bounds every served isotonic segment, so float32
    rounding between runtimes is amplified at most tenfold."""
    _, run, _ = ali
    spec = json.loads((run / "calibration.json").read_text())
    for entry in spec["calibrators"]:
        x, y = np.asarray(entry["x"]), np.asarray(entry["y"])
        if len(x) > 1:
            assert np.max(np.diff(y) / np.diff(x)) <= 10, entry["task"]
