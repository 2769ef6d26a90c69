"""The HTTP service under hostile traffic: fuzzed from its own OpenAPI schema (schemathesis) and
10,000 loopback requests against a real server with its memory watched.

Invariants: no request, valid or not, gets a 5xx; a request the service refuses gets a 4xx with
an "error" message; the server's resident memory does not grow with the number of requests.
"""

from __future__ import annotations

import http.client
import json
import random
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from masknet.serving.bundle import verify_and_load
from masknet.serving.service import create_app

from serving_helpers import CRITEO_COLUMNS, criteo_rows, running_server, trained


@pytest.fixture(scope="module")
def api_cases():
    """A Hypothesis strategy over every operation of the service's OpenAPI schema: valid bodies
    and deliberately schema-violating ones (wrong types, missing fields, extra keys).

    Schemathesis' strategies are used with plain Hypothesis rather than through its pytest plugin
    (`schemathesis.pytest.from_fixture`), which reaches into pytest's private node attributes and
    broke with pytest 9.2 (`'Function' object has no attribute '_nodeid'`)."""
    bundle = verify_and_load(trained("criteo8k"))
    app = create_app(bundle, max_candidates=50, max_body_bytes=200_000)
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)
    return loaded.as_strategy(GenerationMode.POSITIVE) | loaded.as_strategy(GenerationMode.NEGATIVE)


STATUSES: dict[int, int] = {}  # status class -> count, over all fuzzed requests


@settings(max_examples=240, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_schema_fuzzing_never_gets_a_server_error(api_cases, data):
    """Requests generated from the schema (valid and deliberately invalid bodies) never get a 5xx;
    every refusal is a 4xx that says what is wrong."""
    case = data.draw(api_cases)
    response = case.call_and_validate(checks=[not_a_server_error])
    STATUSES[response.status_code // 100] = STATUSES.get(response.status_code // 100, 0) + 1
    if 400 <= response.status_code < 500 and response.status_code not in (404, 405):
        body = response.json()
        assert isinstance(body, dict) and (body.get("error") or body.get("detail")), body


def test_fuzzing_reached_both_accepted_and_refused_requests():
    """The fuzzing above must have exercised both paths (runs after it, in file order)."""
    if not STATUSES:
        pytest.skip("run together with test_schema_fuzzing_never_gets_a_server_error")
    assert STATUSES.get(2, 0) > 0 and STATUSES.get(4, 0) > 0, STATUSES
    assert STATUSES.get(5, 0) == 0


# ---------------------------------------------------------------------------
# 10,000 requests on loopback: no 5xx, no memory growth


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _requests(rows: list[dict], rng: random.Random):
    """An endless mix of the traffic a service sees: rank and predict requests of 1-20 rows with
    unseen values, and malformed or invalid ones."""
    ctx_cols, cand_cols = CRITEO_COLUMNS[:13], CRITEO_COLUMNS[13:]
    while True:
        kind = rng.random()
        sample = [rows[rng.randrange(len(rows))] for _ in range(rng.randint(1, 20))]
        if kind < 0.45:
            ctx = {c: sample[0][c] for c in ctx_cols}
            cands = [{"id": i, "features": {c: r[c] for c in cand_cols}} for i, r in enumerate(sample)]
            if rng.random() < 0.3:  # a value never seen in training
                cands[0]["features"]["C3"] = f"unseen-{rng.randrange(10**9)}"
            yield "/rank", json.dumps({"context": ctx, "candidates": cands}).encode(), 200
        elif kind < 0.75:
            yield "/predict", json.dumps({"rows": sample}).encode(), 200
        elif kind < 0.85:
            yield "/rank", b'{"context": {"I1": 1}, "candidates": [', 400
        elif kind < 0.95:
            bad = dict(sample[0])
            del bad["C7"]
            yield "/predict", json.dumps({"rows": [bad]}).encode(), 422
        else:
            yield "/rank", json.dumps({"context": {}, "candidates": [{"features": {}}] * 60}).encode(), 422


def test_ten_thousand_requests_no_server_error_no_memory_growth(tmp_path):
    rows = criteo_rows(200)
    with running_server(trained("criteo8k"), tmp_path / "server.log", "--threads", "1", "--max-candidates", "50") as (port, proc):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        traffic = _requests(rows, random.Random(0))
        statuses: dict[int, int] = {}
        rss = {}
        for i in range(10_000):
            path, body, expected = next(traffic)
            conn.request("POST", path, body=body, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            assert resp.status == expected, (i, path, resp.status, payload[:300])
            if resp.status != 200:
                assert json.loads(payload)["error"], payload
            if i + 1 in (1_000, 10_000):
                rss[i + 1] = _rss_kb(proc.pid)
        conn.close()
    assert not any(s >= 500 for s in statuses), statuses
    growth_mb = (rss[10_000] - rss[1_000]) / 1024
    print(f"server RSS after 1,000 requests {rss[1_000] / 1024:.1f} MB, after 10,000 {rss[10_000] / 1024:.1f} MB; statuses {statuses}")
    # after warm-up, 9,000 more requests may move the allocator a little, not grow with traffic
    assert growth_mb < 16, f"server RSS grew {growth_mb:.1f} MB from request 1,000 to 10,000 ({rss})"
