"""Load test of `masknet serve` against the same model in process: latency, throughput, their ratios.

    python benchmarks/loadtest.py --model RUN --data RAWFILE --json OUT [--runtime torch|onnx]
        [--precision fp32|int8|bf16] [--threads N] [--candidates 1000] [--concurrency 1,8,32]
        [--requests 200] [--seconds 20] [--rounds 2] [--server-arg=--max-wait-ms=1 ...]

In one run, for one model, runtime and precision:
  1. in process: the forward pass of the same runtime on one request's encoded candidates
     (p50/p99, and rows/s back to back) and the CPU cost of the request path around it (decode +
     validate + encode with the service's own decoder, and the response), single-threaded;
  2. over HTTP: `masknet serve` started on a free 127.0.0.1 port (loopback only), /rank requests of
     --candidates candidates built from real raw rows (RAWFILE, the model's format; every feature
     sent per candidate, no shared context: the heaviest shape), from 1, 8 and 32 client threads
     over keep-alive connections, at most --requests requests or --seconds seconds per cell;
and it repeats both --rounds times, alternating, so that a change in the machine's load moves
both sides alike; percentiles pool every round's samples. Prints a table, the ratios and the
load average before and after; --json OUT gets every number (keys: inprocess_p50_ms,
inprocess_p99_ms, inprocess_rows_per_s, http_p50_ms, http_p99_ms, http_rows_per_s, rejected_503,
errors (by concurrency), p99_ratio_c1, throughput_ratio_c8, ...). An error is an answer that is
neither 200 with one score per candidate nor the 503 of a full queue (counted apart); the exit
code is 1 if there was any. The client shares the machine's cores with the server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"  # loopback only, by design


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def raw_rows(run: str, path: str, n: int, fmt: str | None) -> list[dict]:
    """The first n rows of a raw file as JSON rows {column: value}, read by the data layer."""
    from masknet.data.readers import iter_chunks
    from masknet.serving.bundle import verify_and_load
    from masknet.serving.predict import reading_spec

    bundle = verify_and_load(run)
    spec = reading_spec(bundle, fmt)
    spec.label = None
    columns = list(dict.fromkeys(f.column for f in spec.fields))
    rows: list[dict] = []
    for chunk in iter_chunks(spec, path, serial=True):
        cols = {c: chunk.columns[c].dictionary_decode().to_pylist() for c in columns}
        for i in range(len(chunk)):
            rows.append({c: cols[c][i] for c in columns})
            if len(rows) == n:
                return rows
    if not rows:
        raise SystemExit(f"{path}: no rows")
    while len(rows) < n:  # repeat a small file
        rows += rows[: n - len(rows)]
    return rows


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values) * 1000, q)), 2) if values else None


# ---------------------------------------------------------------------------
# In process


class InProcess:
    """The service's own decoder and scorer, called directly."""

    def __init__(self, args, body: bytes, threads: int):
        from masknet.serving.bundle import verify_and_load
        from masknet.serving.service import create_app

        bundle = verify_and_load(args.model)
        self.app = create_app(bundle, args.runtime, max_candidates=args.candidates, threads=threads,
                              precision=args.precision, check_accuracy=False)
        self.body = body
        self.x = self.app.state.decoder.rank(body, args.candidates).x
        self.forward_s: list[float] = []

    def forward(self, reps: int, max_seconds: float) -> None:
        score = self.app.state.scorer
        for _ in range(3):
            score(self.x)
        stop = time.perf_counter() + max_seconds
        for _ in range(reps):
            t0 = time.perf_counter()
            score(self.x)
            self.forward_s.append(time.perf_counter() - t0)
            if time.perf_counter() > stop:
                break

    def request_path_cpu_ms(self, reps: int = 15) -> dict[str, float]:
        """CPU time of this thread (median of reps) for each stage around the forward pass."""
        import msgspec

        dec = self.app.state.decoder
        scores = self.app.state.scorer(self.x)
        stages: dict[str, list[float]] = {"decode_validate_encode": [], "respond": []}
        for _ in range(reps):
            t = time.thread_time()
            enc = dec.rank(self.body, len(self.x))
            t2 = time.thread_time()
            order = np.argsort(-scores, kind="stable").tolist()
            s = scores.tolist()
            msgspec.json.encode({"model": "m", "scores": s, "ranking": [{"id": enc.ids[i], "index": i, "score": s[i]} for i in order]})
            t3 = time.thread_time()
            stages["decode_validate_encode"].append((t2 - t) * 1000)
            stages["respond"].append((t3 - t2) * 1000)
        out = {k: round(float(np.median(v)), 2) for k, v in stages.items()}
        out["total"] = round(sum(out.values()), 2)
        return out


# ---------------------------------------------------------------------------
# Over HTTP


def start_server(args, port: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "masknet", "serve", "--model", args.model, "--host", HOST, "--port", str(port),
           "--runtime", args.runtime, "--precision", args.precision, "--max-candidates", str(args.candidates),
           *args.server_arg]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"masknet-loadtest-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            c = http.client.HTTPConnection(HOST, port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, str(log)
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start within 180 s")


def server_timing(header: str | None) -> dict[str, float]:
    """{"decode": ms, "queue": ms, "forward": ms} from the service's Server-Timing header."""
    out = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";dur=")
        if rest:
            out[name] = float(rest)
    return out


def run_cell(port: int, body: bytes, n_cands: int, concurrency: int, max_requests: int, max_seconds: float) -> dict:
    lat: list[float] = []
    timings: list[dict] = []
    errors: list[str] = []
    rejected = [0]
    lock = threading.Lock()
    sent = [0]
    stop_at = time.perf_counter() + max_seconds

    def worker():
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        while True:
            with lock:
                if sent[0] >= max_requests or time.perf_counter() > stop_at:
                    break
                sent[0] += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/rank", body=body, headers={"content-type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                dt = time.perf_counter() - t0
                if resp.status == 503 and resp.getheader("Retry-After"):
                    with lock:
                        rejected[0] += 1
                    continue
                ok = resp.status == 200 and len(json.loads(data)["scores"]) == n_cands
                with lock:
                    lat.append(dt)
                    timings.append(server_timing(resp.getheader("Server-Timing")))
                    if not ok:
                        errors.append(f"{resp.status}: {data[:200]!r}")
            except (OSError, http.client.HTTPException, ValueError) as exc:
                with lock:
                    errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=120)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": lat, "errors": errors, "rejected": rejected[0], "seconds": time.perf_counter() - t0, "timings": timings}


# ---------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained run folder")
    p.add_argument("--data", required=True, help="raw rows in the model's format (candidates are built from them)")
    p.add_argument("--format", help="read --data as this format (same fields as the model's)")
    p.add_argument("--runtime", choices=("torch", "onnx"), default="torch")
    p.add_argument("--precision", choices=("fp32", "int8", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, help="intra-op threads, in the server and in process (default: the server's choice)")
    p.add_argument("--candidates", type=int, default=1000, help="candidates per /rank request (default 1000)")
    p.add_argument("--concurrency", default="1,8,32", help="client threads per cell (default 1,8,32)")
    p.add_argument("--requests", type=int, default=200, help="at most this many requests per cell and round (default 200)")
    p.add_argument("--seconds", type=float, default=20, help="at most this long per cell and round (default 20)")
    p.add_argument("--rounds", type=int, default=2, help="alternating in-process / HTTP rounds (default 2)")
    p.add_argument("--server-arg", action="append", default=[], help="extra `masknet serve` argument (repeatable)")
    p.add_argument("--json", help="write every number here")
    args = p.parse_args()
    conc = [int(c) for c in args.concurrency.split(",")]

    rows = raw_rows(args.model, args.data, args.candidates, args.format)
    body = json.dumps({"candidates": [{"id": i, "features": r} for i, r in enumerate(rows)]}).encode()
    load_before = os.getloadavg()
    port = free_port()
    server, log = start_server(args, port)
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    conn.request("GET", "/metadata")
    server_meta = json.loads(conn.getresponse().read())
    conn.close()
    inproc = InProcess(args, body, server_meta["threads"])  # the server's thread count (its own choice unless --threads)
    cells = {c: {"latencies": [], "errors": [], "rejected": 0, "seconds": 0.0, "timings": []} for c in conc}
    try:
        run_cell(port, body, args.candidates, 1, 5, 60)  # warm-up
        for r in range(args.rounds):
            inproc.forward(args.requests, args.seconds)
            for c in conc:
                out = run_cell(port, body, args.candidates, c, args.requests, args.seconds)
                for k in ("latencies", "errors", "timings"):
                    cells[c][k] += out[k]
                cells[c]["rejected"] += out["rejected"]
                cells[c]["seconds"] += out["seconds"]
                print(f"  round {r + 1}: x{c}: {len(out['latencies'])} answered, {out['rejected']} rejected (503), "
                      f"p99 {pct(out['latencies'], 99)} ms, {len(out['errors'])} errors", file=sys.stderr, flush=True)
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        conn.request("GET", "/health")
        server_health = json.loads(conn.getresponse().read())
        conn.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    load_after = os.getloadavg()
    stages = inproc.request_path_cpu_ms()

    f = inproc.forward_s
    res = {
        "model": args.model, "runtime": args.runtime, "precision": args.precision, "candidates": args.candidates,
        "threads": server_meta.get("threads"), "thread_timings_ms": server_meta.get("thread_timings_ms"), "cpus": os.cpu_count(), "rounds": args.rounds,
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "server_args": args.server_arg, "batching": server_meta.get("batching"),
        "accuracy_vs_fp32": server_meta.get("accuracy_vs_fp32"),
        "inprocess_forwards": len(f), "inprocess_p50_ms": pct(f, 50), "inprocess_p99_ms": pct(f, 99),
        "inprocess_rows_per_s": round(args.candidates * len(f) / sum(f)),
        "request_path_cpu_ms": stages,
        "http_requests": {c: len(cells[c]["latencies"]) for c in conc},
        "http_p50_ms": {c: pct(cells[c]["latencies"], 50) for c in conc},
        "http_p99_ms": {c: pct(cells[c]["latencies"], 99) for c in conc},
        "http_rows_per_s": {c: round(args.candidates * len(cells[c]["latencies"]) / cells[c]["seconds"]) for c in conc},
        "rejected_503": {c: cells[c]["rejected"] for c in conc},
        "server_median_ms": {c: {k: round(float(np.median([t[k] for t in cells[c]["timings"] if k in t])), 2)
                                 for k in ("decode", "queue", "forward") if any(k in t for t in cells[c]["timings"])}
                             for c in conc},
        "errors": {c: len(cells[c]["errors"]) for c in conc},
        "first_error": next((cells[c]["errors"][0] for c in conc if cells[c]["errors"]), None),
        "server_batches": server_health.get("batches"), "server_rows_scored": server_health.get("rows_scored"),
    }
    if 1 in conc:
        res["p99_ratio_c1"] = round(res["http_p99_ms"][1] / res["inprocess_p99_ms"], 3)
    if 8 in conc:
        res["throughput_ratio_c8"] = round(res["http_rows_per_s"][8] / res["inprocess_rows_per_s"], 3)
    print(f"\nmodel {args.model} | {args.runtime} {args.precision} | {res['threads']} threads | {args.candidates:,} candidates "
          f"| load average before {res['loadavg_before']}, after {res['loadavg_after']}")
    acc = res["accuracy_vs_fp32"] or {}
    if acc.get("measured"):
        print(f"test AUC {acc['auc']:.4f} vs fp32 {acc['auc_fp32']:.4f} ({acc['auc_diff']:+.4f}) on {acc['rows']:,} rows")
    print(f"request path CPU (decode + validate + encode, respond): {stages}\n")
    print("| | requests | rejected (503) | errors | rows/s | p50 ms | p99 ms | server decode / queue / forward ms (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    print(f"| in-process forward | {len(f)} | | | {res['inprocess_rows_per_s']:,} | {res['inprocess_p50_ms']} | "
          f"{res['inprocess_p99_ms']} | |")
    for c in conc:
        st = res["server_median_ms"][c]
        print(f"| HTTP /rank, concurrency {c} | {res['http_requests'][c]} | {res['rejected_503'][c]} | {res['errors'][c]} | "
              f"{res['http_rows_per_s'][c]:,} | {res['http_p50_ms'][c]} | {res['http_p99_ms'][c]} | "
              f"{' / '.join(str(st.get(k, '-')) for k in ('decode', 'queue', 'forward'))} |")
    print(f"\np99 ratio (HTTP c1 / in-process): {res.get('p99_ratio_c1')}; throughput ratio (HTTP c8 / in-process): "
          f"{res.get('throughput_ratio_c8')}; server: {res['server_batches']} forward passes for {res['server_rows_scored']:,} rows")
    if res["first_error"]:
        print(f"first error: {res['first_error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 1 if any(res["errors"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
