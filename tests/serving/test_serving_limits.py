"""The service's limits against hostile bodies (issue 14 review): an integer literal over Python's
4,300 digits is a 422 naming the field; bodies holding millions of elements or keys are refused
by their counts before any per-element work, and off the event loop; bodies are admitted (or
refused with 503) before they are read, their bytes in memory are bounded and a body that stops
arriving gets 408."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import warnings
from collections import Counter

import pytest

from masknet.serving import requests as requests_module
from masknet.serving.service import create_app

from serving_helpers import CRITEO_COLUMNS, criteo_rows, free_port, running_server, trained

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

CTX_COLS, CAND_COLS = CRITEO_COLUMNS[:13], CRITEO_COLUMNS[13:]
MARK = 123456789  # replaced by the long literal in the JSON text


@pytest.fixture(scope="module")
def client(bundle):
    return TestClient(create_app(bundle, threads=1))


def _post(client, path: str, text: str):
    return client.post(path, content=text, headers={"content-type": "application/json"})


# ---------------------------------------------------------------------------
# item 7: integer literals over 4,300 digits


def _places(row: dict) -> list[tuple[str, dict, str]]:
    ctx = {c: row[c] for c in CTX_COLS}
    feats = {c: row[c] for c in CAND_COLS}
    return [
        ("/predict", {"rows": [dict(row, I2=MARK)]}, "rows[0].I2"),
        ("/predict", {"rows": [row, dict(row, C3=MARK)]}, "rows[1].C3"),
        ("/predict", {"rows": [row], "zzz": MARK}, "zzz"),
        ("/rank", {"context": dict(ctx, I2=MARK), "candidates": [{"features": feats}]}, "context.I2"),
        ("/rank", {"context": ctx, "candidates": [{"features": dict(feats, C3=MARK)}]}, "candidates[0].features.C3"),
        ("/rank", {"context": ctx, "candidates": [{"id": MARK, "features": feats}]}, "candidates[0].id"),
        ("/rank", {"context": ctx, "candidates": [{"features": feats}], "zzz": MARK}, "zzz"),
    ]


@pytest.mark.parametrize("digits", [5_000, 200_000])
def test_long_integer_literal_is_a_422_naming_the_field(client, row, digits):
    """json.loads raised "Exceeds the limit (4300 digits)" and the service answered 500."""
    for path, body, where in _places(row):
        r = _post(client, path, json.dumps(body).replace(str(MARK), "9" * digits))
        assert r.status_code == 422, (path, where, r.status_code, r.text[:300])
        msg = r.json()["error"]
        assert msg.startswith(f"{where}: ") and len(msg) < 300, (where, msg)


def test_long_integer_within_a_raised_value_limit_says_what_python_reads(bundle, row):
    c = TestClient(create_app(bundle, threads=1, max_value_chars=9_000))
    r = _post(c, "/predict", json.dumps({"rows": [dict(row, I2=MARK)]}).replace(str(MARK), "-" + "7" * 5_000))
    assert r.status_code == 422
    assert r.json()["error"] == ("rows[0].I2: an integer of 5,001 characters; Python reads at most 4,300 digits "
                                 "(send it as a string)")


# ---------------------------------------------------------------------------
# bodies with millions of elements or keys: counted before anything is validated

def _many(items: bytes, n: int) -> bytes:
    return b",".join([items] * n)


def _keys(n: int) -> bytes:
    return b",".join(b'"k%d":1' % i for i in range(n))


HOSTILE = [  # (path, body, message start): the review's bodies, each under the 8 MiB limit
    ("/rank", b'{"candidates":[' + _many(b"1", 3_000_000) + b"]}", "too many candidates: more than 1,000"),
    ("/rank", b'{"candidates":[' + _many(b"[]", 2_000_000) + b"]}", "too many candidates: more than 1,000"),
    ("/rank", b'{"candidates":[' + _many(b"{}", 1_000_000) + b"]}", "too many candidates: more than 1,000"),
    ("/rank", b'{"candidates":[' + _many(b'{"features":{}}', 400_000) + b"]}", "too many candidates: more than 1,000"),
    ("/predict", b'{"rows":[' + _many(b"{}", 1_000_000) + b"]}", "too many rows: more than 1,000"),
    ("/rank", b'{"candidates":[],"context":{' + _keys(600_000) + b"}}", "context: unknown field 'k0'"),
    ("/rank", b'{"candidates":[],' + _keys(600_000) + b"}", "k0: Extra inputs are not permitted"),
    ("/rank", b'{"candidates":[{"features":{' + _keys(600_000) + b"}}]}", "candidates[0].features: unknown field 'k0'"),
    ("/rank", b'{"candidates":[{' + _keys(600_000) + b"}]}", "candidates[0].k0: Extra inputs are not permitted"),
    ("/predict", b'{"rows":[{' + _keys(600_000) + b"}]}", "rows[0]: unknown field 'k0'"),
    ("/predict", b'{"rows":[{"C1":[' + _many(b"[]", 2_000_000) + b"]}]}", "the request holds 2,000,00"),
]


def test_huge_bodies_are_refused_by_their_counts_before_any_decoding(client, monkeypatch):
    """No json.loads and no pydantic for them (pydantic over 3 million elements took 42 s)."""
    app = client.app
    validated, loaded = [], []
    monkeypatch.setattr(app.state.decoder, "validate", lambda kind, obj: validated.append(kind))
    real_loads = json.loads
    monkeypatch.setattr(requests_module.json, "loads", lambda *a, **k: loaded.append(1) or real_loads(*a, **k))
    for path, body, words in HOSTILE:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert not validated and not loaded, (path, body[:60])  # (r.json() below calls json.loads too)
        assert r.status_code == 422 and r.json()["error"].startswith(words), (path, body[:60], r.text[:300])
        loaded.clear()


def test_counts_are_checked_again_after_a_wrong_type(client, monkeypatch):
    """A wrong type first (the scans leave it to the careful path), then bulk: still no pydantic
    over the bulk."""
    validated = []
    monkeypatch.setattr(client.app.state.decoder, "validate", lambda kind, obj: validated.append(kind))
    for path, body, words in [
        ("/rank", b'{"candidates":"x",' + _keys(300_000) + b"}", "k0: Extra inputs are not permitted"),
        ("/rank", b'{"context":[1],"candidates":[{"features":[1]},{' + _keys(300_000) + b"}]}",
         "candidates[1].k0: Extra inputs are not permitted"),
        ("/rank", b'{"context":[1],"candidates":[{"features":[1]},{"features":{' + _keys(300_000) + b"}}]}",
         "candidates[1].features: unknown field 'k0'"),
        ("/predict", b'{"rows":[[1],{' + _keys(300_000) + b"}]}", "rows[1]: unknown field 'k0'"),
    ]:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"].startswith(words), (body[:60], r.text[:300])
    assert not validated


def test_decoding_runs_off_the_event_loop(bundle, row):
    """/health answers while a body is being decoded (it was decoded on the event loop, so a slow
    decode stalled every other request)."""
    import uvicorn

    app = create_app(bundle, threads=1)
    inside, release = threading.Event(), threading.Event()
    real = app.state.decoder.predict

    def slow_predict(body, limit):
        inside.set()
        release.wait(20)
        return real(body, limit)

    app.state.decoder.predict = slow_predict
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    out = {}
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)

        def predict():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            c.request("POST", "/predict", body=json.dumps({"rows": [row]}), headers={"content-type": "application/json"})
            out["status"] = c.getresponse().status

        t = threading.Thread(target=predict)
        t.start()
        assert inside.wait(10)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/health")
        health = c.getresponse()
        assert health.status == 200 and json.loads(health.read())["pending"] == 1
        release.set()
        t.join(30)
        assert out["status"] == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(15)


def _health_ms(port: int) -> float:
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("GET", "/health")
    assert c.getresponse().status == 200
    c.close()
    return (time.perf_counter() - t0) * 1000


def test_health_answers_while_a_huge_body_is_refused(tmp_path):
    """The review's 3-million-element body held the event loop 41 s; now /health answers at once
    (a generous bound: the point is that nothing waits for the body's elements)."""
    with running_server(trained("criteo8k"), tmp_path / "server.log", "--threads", "1") as (port, proc):
        done = {}

        def hostile():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            c.request("POST", "/rank", body=HOSTILE[0][1], headers={"content-type": "application/json"})
            resp = c.getresponse()
            done["status"], done["body"] = resp.status, resp.read()

        t = threading.Thread(target=hostile)
        t.start()
        waits = []
        while t.is_alive():
            waits.append(_health_ms(port))
            time.sleep(0.05)
        t.join()
    assert done["status"] == 422 and b"too many candidates" in done["body"]
    assert max(waits) < 5_000, waits


# ---------------------------------------------------------------------------
# bodies are admitted before they are read, their memory is bounded, a stalled one gets 408

def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _hold_bodies(port: int, n: int, size: int, hold_s: float, check) -> list[str]:
    """n clients each send all but the last byte of a `size`-byte body and wait for an answer;
    `check()` runs after hold_s seconds, while they hold. Returns each client's status line."""
    body = b'{"rows": [' + b" " * (size - 12) + b"]}"
    answers: list[str] = []

    def client():
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(60)
        try:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % size)
            s.sendall(body[:-1])
            data = s.recv(4096)
            answers.append(data.split(b"\r\n")[0].decode() if data else "closed")
        except OSError as exc:
            answers.append(type(exc).__name__)
        finally:
            s.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    time.sleep(hold_s)
    check()
    return answers, threads


def test_bodies_beyond_max_pending_are_not_read(tmp_path):
    """24 clients hold almost-4 MB bodies: 4 are admitted (--max-pending 4), the others get 503 +
    Retry-After at once, and the server holds only the admitted bodies (before: every body was
    buffered, +96 MB, with /health saying pending 0)."""
    size = 4_000_000
    with running_server(trained("criteo8k"), tmp_path / "server.log", "--threads", "1", "--max-pending", "4",
                        "--max-body-bytes", str(size)) as (port, proc):
        before = _rss_mb(proc.pid)
        seen = {}

        def check():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/health")
            seen["health"] = json.loads(c.getresponse().read())
            seen["growth"] = _rss_mb(proc.pid) - before

        answers, threads = _hold_bodies(port, 24, size, 4.0, check)
        assert seen["health"]["pending"] == 4 and seen["health"]["rejected_pending"] == 20, seen["health"]
        assert Counter(answers) == {"HTTP/1.1 503 Service Unavailable": 20}, answers
        assert seen["growth"] < 4 * size / 1e6 + 24, f"server RSS grew {seen['growth']:.0f} MB"
        for t in threads:
            t.join(0.01)


def test_body_memory_budget_and_body_timeout(tmp_path):
    """--max-body-buffer 5 MB: of 8 clients holding almost-2 MB bodies two are admitted, the rest
    get 503 (before any of their body is read); after --body-timeout 3 s the two stalled ones get
    408 and the server is empty again."""
    size = 2_000_000
    with running_server(trained("criteo8k"), tmp_path / "server.log", "--threads", "1", "--max-body-bytes", str(size),
                        "--max-body-buffer", "5000000", "--body-timeout", "3") as (port, proc):
        seen = {}

        def check():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/health")
            seen["during"] = json.loads(c.getresponse().read())

        t0 = time.time()
        answers, threads = _hold_bodies(port, 8, size, 1.5, check)
        for t in threads:
            t.join(60)
        waited = time.time() - t0
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/health")
        after = json.loads(c.getresponse().read())
    assert Counter(answers) == {"HTTP/1.1 503 Service Unavailable": 6, "HTTP/1.1 408 Request Timeout": 2}, answers
    assert seen["during"]["pending"] == 2 and seen["during"]["body_bytes_held"] == 2 * size, seen["during"]
    assert seen["during"]["rejected_body_bytes"] == 6
    assert after["pending"] == 0 and after["body_bytes_held"] == 0 and after["body_timeouts"] == 2, after
    assert waited < 30


def test_chunked_bodies_count_against_the_budget(bundle):
    """Without Content-Length the bytes are counted as they arrive (and the limits still hold)."""
    c = TestClient(create_app(bundle, threads=1, max_body_bytes=100_000, max_body_buffer=100_000))

    def chunks():
        yield b'{"rows": ['
        for _ in range(20):
            yield b" " * 10_000
        yield b"]}"

    r = c.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit of 100,000 bytes" in r.json()["error"]
    r = c.post("/predict", content=iter([b'{"rows": [', json.dumps(criteo_rows(1)[0]).encode(), b"]}"]))
    assert r.status_code == 200, r.text
    h = c.get("/health").json()
    assert h["pending"] == 0 and h["body_bytes_held"] == 0
