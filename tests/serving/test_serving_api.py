"""HTTP ranking service: endpoints, every request error is a 4xx naming the problem, real HTTP round trip."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest

from masknet.serving.bundle import verify_and_load
from masknet.serving.predict import encode_raw, score
from masknet.serving.service import create_app

from serving_helpers import CRITEO_COLUMNS, criteo_rows, need, running_server, trained

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

MAX_CANDIDATES = 50
MAX_BODY = 200_000


@pytest.fixture(scope="module")
def client(bundle):
    return TestClient(create_app(bundle, max_candidates=MAX_CANDIDATES, max_body_bytes=MAX_BODY))


@pytest.fixture(scope="module")
def raw_rows():
    """The first 20 rows of criteo-8k's test.txt as JSON rows (numbers as JSON numbers, empty = null)."""
    return criteo_rows(20)


@pytest.fixture(scope="module")
def file_scores(bundle, tmp_path_factory):
    """Scores of the same 20 rows through the batch path (file -> data layer -> encoder)."""
    path = tmp_path_factory.mktemp("rows") / "rows.txt"
    path.write_text("\n".join(need("criteo-8k", "test.txt").read_text().splitlines()[:20]) + "\n")
    x = np.concatenate([x for x, *_ in encode_raw(bundle, path)])
    return score(bundle.model, x)


def test_health_metadata_openapi(client, bundle):
    assert client.get("/health").json()["status"] == "ok"
    md = client.get("/metadata").json()
    assert md["model"] == "sermasknet" and md["bundle_sha256"] == bundle.bundle_hash
    assert md["input"]["columns"] == CRITEO_COLUMNS and md["input"]["format"] == "criteo"
    assert [f["name"] for f in md["fields"]] == bundle.field_names
    assert md["training_metrics"]["test"]["auc"] == bundle.metrics["test"]["auc"]
    assert md["limits"]["max_candidates"] == MAX_CANDIDATES
    spec = client.get("/openapi.json").json()
    assert {"/rank", "/predict", "/health", "/metadata"} <= set(spec["paths"])
    assert {"RankRequest", "RankResponse", "PredictRequest", "Candidate"} <= set(spec["components"]["schemas"])


def test_predict_matches_the_batch_path(client, raw_rows, file_scores):
    r = client.post("/predict", json={"rows": raw_rows})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["scores"], file_scores, atol=1e-6)
    # numbers sent as strings (as in the raw file) encode the same
    as_text = [{k: (str(v) if v is not None else None) for k, v in row.items()} for row in raw_rows]
    np.testing.assert_allclose(client.post("/predict", json={"rows": as_text}).json()["scores"], file_scores, atol=1e-6)
    # "" is the format's missing value, as in the raw file: same as null
    as_empty = [{k: ("" if v is None else v) for k, v in row.items()} for row in as_text]
    np.testing.assert_allclose(client.post("/predict", json={"rows": as_empty}).json()["scores"], file_scores, atol=1e-6)
    # numbers as floats (260.0 encodes like 260), and a numeric column mixing strings and numbers
    # (which takes the per-field path instead of the grouped one): the same scores
    as_float = [{k: (float(v) if isinstance(v, int) else v) for k, v in row.items()} for row in raw_rows]
    np.testing.assert_allclose(client.post("/predict", json={"rows": as_float}).json()["scores"], file_scores, atol=1e-6)
    mixed_types = [dict(r, I2=(str(r["I2"]) if i % 2 and r["I2"] is not None else r["I2"])) for i, r in enumerate(raw_rows)]
    np.testing.assert_allclose(client.post("/predict", json={"rows": mixed_types}).json()["scores"], file_scores, atol=1e-6)
    # categorical values sent as numbers take the per-field path: same result for the same strings
    x_enc = client.app.state.features
    cols = x_enc.gather(as_text, str)
    mixed = dict(cols, C1=[1234 if i == 0 else v for i, v in enumerate(cols["C1"])])
    a, b = x_enc.encode(cols, len(as_text), str), x_enc.encode(mixed, len(as_text), str)
    assert np.array_equal(np.delete(a, 13, axis=1), np.delete(b, 13, axis=1)) and b[0, 13] == 1  # unseen "1234": OOV


def test_rank_scores_and_sorts_candidates(client, raw_rows):
    ctx = {c: raw_rows[0][c] for c in CRITEO_COLUMNS[:13]}  # shared: the numeric features
    cands = [{"id": f"ad-{i}", "features": {c: r[c] for c in CRITEO_COLUMNS[13:]}} for i, r in enumerate(raw_rows)]
    cands[5]["features"]["I1"] = 1000  # a candidate's own value overrides the context
    r = client.post("/rank", json={"context": ctx, "candidates": cands})
    assert r.status_code == 200, r.text
    body = r.json()
    merged = [{**ctx, **c["features"]} for c in cands]
    want = client.post("/predict", json={"rows": merged}).json()["scores"]
    np.testing.assert_allclose(body["scores"], want, atol=1e-7)
    ranking = body["ranking"]
    assert [e["score"] for e in ranking] == sorted(body["scores"], reverse=True)
    assert sorted(e["index"] for e in ranking) == list(range(len(cands)))
    assert all(e["id"] == f"ad-{e['index']}" for e in ranking)
    no_ids = client.post("/rank", json={"context": ctx, "candidates": [{"features": c["features"]} for c in cands[:3]]})
    assert sorted(e["id"] for e in no_ids.json()["ranking"]) == [0, 1, 2]  # default id: the index
    assert client.post("/rank", json={"candidates": []}).json()["ranking"] == []


def test_unseen_categories_are_valid_input(client, raw_rows):
    row = dict(raw_rows[0], C1="never-seen", C2=12345, I3=None)
    r = client.post("/predict", json={"rows": [row]})
    assert r.status_code == 200 and 0 < r.json()["scores"][0] < 1


def _bad_requests(rows):
    r0 = rows[0]
    without_c5 = {k: v for k, v in r0.items() if k != "C5"}
    ctx = {c: r0[c] for c in CRITEO_COLUMNS[:13]}
    cand = {c: r0[c] for c in CRITEO_COLUMNS[13:]}
    return [
        # (path, body or raw bytes, expected status, words the message must contain)
        ("/predict", {"rows": [r0, without_c5]}, 422, ["rows[1]", "missing field 'C5'"]),
        ("/rank", {"context": ctx, "candidates": [{"features": {k: v for k, v in cand.items() if k != "C9"}}]}, 422,
         ["candidates[0].features", "missing field 'C9'"]),
        ("/predict", {"rows": [dict(r0, I1=[1, 2])]}, 422, ["rows[0].I1", "got a list"]),
        ("/predict", {"rows": [dict(r0, C3={"a": 1})]}, 422, ["rows[0].C3", "got an object"]),
        ("/predict", {"rows": [r0, dict(r0, C4=True)]}, 422, ["rows[1].C4", "got a boolean"]),
        ("/predict", {"rows": [dict(r0, I5="12x")]}, 422, ["rows[0].I5", "not a number", "12x"]),
        ("/rank", {"context": dict(ctx, I2="abc"), "candidates": [{"features": cand}]}, 422, ["context.I2", "not a number"]),
        ("/predict", {"rows": [dict(r0, colour="red")]}, 422, ["rows[0]", "unknown field 'colour'"]),
        ("/rank", {"context": {"nope": 1}, "candidates": [{"features": cand}]}, 422, ["context", "unknown field 'nope'"]),
        ("/rank", {"context": ctx, "candidates": [{"features": cand}] * (MAX_CANDIDATES + 1)}, 422,
         ["too many candidates", f"{MAX_CANDIDATES + 1}", f"limit is {MAX_CANDIDATES}"]),
        ("/predict", {"rows": [r0] * (MAX_CANDIDATES + 1)}, 422, ["too many rows"]),
        ("/rank", {"context": ctx}, 422, ["candidates", "Field required"]),
        ("/rank", {"context": ctx, "candidates": "all"}, 422, ["candidates", "valid list"]),
        ("/rank", {"context": ctx, "candidates": [{"id": 1.5, "features": cand}]}, 422, ["candidates[0].id", "string or an integer"]),
        ("/rank", {"context": ctx, "candidates": [{"features": cand, "extra": 1}]}, 422, ["candidates[0].extra"]),
        ("/predict", {"rows": [r0], "oops": 1}, 422, ["oops"]),
        ("/predict", [r0], 422, ["JSON object"]),
        ("/predict", b'{"rows": [{"I1": 1,,}]}', 400, ["malformed JSON"]),
        ("/rank", b"not json at all", 400, ["malformed JSON"]),
        ("/predict", b"", 422, ["Field required"]),
        ("/predict", b'{"rows": [' + b'{"I1": 1}, ' * 30_000 + b"{}]}", 413, ["exceeds the limit", f"{MAX_BODY:,}"]),
        ("/predict", {"rows": [dict(r0, I1=float("nan"))]}, 422, ["rows[0].I1", "not a number"]),
    ]


def test_every_bad_request_is_a_4xx_naming_the_problem(client, raw_rows):
    for path, body, status, words in _bad_requests(raw_rows):
        if isinstance(body, bytes):
            r = client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == status, (path, str(body)[:80], r.status_code, r.text[:300])
        msg = r.json()["error"]
        assert isinstance(msg, str) and "\n" not in msg
        for w in words:
            assert w in msg, (w, msg)
    assert client.get("/health").status_code == 200  # the service is still fine


def test_body_limit_without_content_length(client):
    def chunks():
        yield b'{"rows": ['
        for _ in range(40):
            yield b'{"I1": 1}, ' * 1000
        yield b"{}]}"

    r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]


def test_onnx_runtime_gives_the_same_scores(bundle, raw_rows, client):
    onnx_client = TestClient(create_app(bundle, runtime="onnx"))
    a = np.asarray(onnx_client.post("/predict", json={"rows": raw_rows}).json()["scores"])
    b = np.asarray(client.post("/predict", json={"rows": raw_rows}).json()["scores"])
    assert np.max(np.abs(a - b)) < 1e-5
    assert onnx_client.get("/metadata").json()["runtime"] == "onnx"


def test_synthetic_bundle_takes_encoded_indices():
    b = verify_and_load(trained("synthetic"))
    c = TestClient(create_app(b))
    cols = c.get("/metadata").json()["input"]["columns"]
    assert cols == b.field_names
    row = {name: 1 for name in cols}
    r = c.post("/predict", json={"rows": [row, {name: 0 for name in cols}]})
    assert r.status_code == 200 and len(r.json()["scores"]) == 2
    bad = c.post("/predict", json={"rows": [dict(row, **{cols[0]: b.cardinalities[0]})]})
    assert bad.status_code == 422 and "out of range" in bad.json()["error"]
    bad = c.post("/predict", json={"rows": [dict(row, **{cols[1]: "abc"})]})
    assert bad.status_code == 422 and "integer index" in bad.json()["error"]


def _post(url: str, body: dict | bytes):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_real_http_round_trip(bundle, raw_rows, file_scores, tmp_path):
    with running_server(bundle.path, tmp_path / "server.log", "--threads", "1") as (port, _):
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/health", timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "ok"
        status, body = _post(base + "/predict", {"rows": raw_rows})
        assert status == 200
        np.testing.assert_allclose(body["scores"], file_scores, atol=1e-6)
        ctx = {c: raw_rows[0][c] for c in CRITEO_COLUMNS[:13]}
        cands = [{"id": i, "features": {c: r[c] for c in CRITEO_COLUMNS[13:]}} for i, r in enumerate(raw_rows)]
        status, body = _post(base + "/rank", {"context": ctx, "candidates": cands})
        assert status == 200 and len(body["ranking"]) == 20
        assert body["ranking"][0]["score"] == max(body["scores"])
        status, body = _post(base + "/rank", b"{broken")
        assert status == 400 and "malformed JSON" in body["error"]
        with urllib.request.urlopen(base + "/metadata", timeout=10) as resp:
            assert json.loads(resp.read())["bundle_sha256"] == bundle.bundle_hash


@pytest.mark.parametrize("name, sample", [("avazu", ("avazu-sample-100", "avazu_sample.txt")),
                                          ("frappe", ("frappe", "frappe.validation.libfm"))])
def test_service_encodes_like_the_file_path_for_other_formats(name, sample, tmp_path):
    """Avazu's hour (-> hour_of_day, weekday, weekend) and libFM indices go through the same transforms."""
    from masknet.data.readers import iter_chunks
    from masknet.serving.predict import predict_file, reading_spec

    b = verify_and_load(trained(name))
    src = tmp_path / "rows.txt"
    lines = need(*sample).read_text().splitlines()
    src.write_text("\n".join(lines[:31 if name == "avazu" else 30]) + "\n")  # avazu: header + 30 rows
    spec = reading_spec(b)
    spec.label = None
    columns = list(dict.fromkeys(f.column for f in spec.fields))
    (chunk,) = list(iter_chunks(spec, src, serial=True))
    cols = {c: chunk.columns[c].dictionary_decode().to_pylist() for c in columns}
    rows = [{c: cols[c][i] for c in columns} for i in range(len(chunk))]
    if name == "avazu":
        for r in rows:
            r["hour"] = int(r["hour"])  # YYMMDDHH as a JSON number
    else:
        for r in rows:
            r["user"] = int(r["user"].split(":")[0])  # libFM index without ":1"
    predict_file(b, src, tmp_path / "s.parquet")
    import pyarrow.parquet as pq

    want = pq.read_table(tmp_path / "s.parquet").column("score").to_numpy()
    r = TestClient(create_app(b)).post("/predict", json={"rows": rows})
    assert r.status_code == 200, r.text
    assert len(want) == 30
    np.testing.assert_allclose(r.json()["scores"], want, atol=1e-6)
    if name == "avazu":
        bad = TestClient(create_app(b)).post("/predict", json={"rows": [dict(rows[0], hour=14023099)]})
        assert bad.status_code == 422 and "rows[0].hour: not a YYMMDDHH hour" in bad.json()["error"]
