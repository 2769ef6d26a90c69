"""Load test of `masknet serve`: throughput and p50/p99 latency of POST /rank.

    python benchmarks/loadtest.py --model RUN --data RAWFILE [--runtime torch|onnx] [--threads N]
        [--sizes 1,100,1000] [--concurrency 1,8] [--requests 300] [--seconds 20] [--json OUT]

Starts the server itself (`python -m masknet serve`) on a free 127.0.0.1 port (loopback only),
builds /rank requests of 1, 100 and 1,000 candidates from real raw rows (RAWFILE, in the format
the model was trained on; every feature sent per candidate, no shared context: the heaviest
request shape), and for each (candidates, concurrency) cell sends at most --requests requests
or for at most --seconds seconds, whichever comes first, from that many client threads over
keep-alive connections. Prints a table, the machine's load average before and after, and any
errors (a non-200 answer or a wrong number of scores counts as one). The client runs on the same
machine as the server and takes CPU from it.
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


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "masknet", "serve", "--model", args.model, "--host", HOST, "--port", str(port),
           "--runtime", args.runtime, "--max-candidates", str(max(args.sizes))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            c = http.client.HTTPConnection(HOST, port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start within 120 s")


def run_cell(port: int, body: bytes, n_cands: int, concurrency: int, max_requests: int, max_seconds: float) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    sent = [0]
    stop_at = time.perf_counter() + max_seconds

    def worker():
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
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
                ok = resp.status == 200 and len(json.loads(data)["scores"]) == n_cands
                with lock:
                    lat.append(dt)
                    if not ok:
                        errors.append(f"{resp.status}: {data[:200]!r}")
            except (OSError, http.client.HTTPException, ValueError) as exc:
                with lock:
                    errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=60)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.asarray(lat) * 1000
    return {
        "candidates": n_cands,
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 1),
        "candidates_per_s": round(len(lat) * n_cands / wall),
        "p50_ms": round(float(np.percentile(a, 50)), 2) if len(a) else None,
        "p99_ms": round(float(np.percentile(a, 99)), 2) if len(a) else None,
        "max_ms": round(float(a.max()), 2) if len(a) else None,
    }


def stage_cpu_ms(run: str, bodies: dict[int, bytes], reps: int = 7) -> list[dict]:
    """CPU time (this thread's, median of `reps`) of each stage of one /rank request, in process and
    single-threaded. CPU time is far less sensitive than wall time to other processes on the machine,
    so it estimates the latency on an otherwise idle core."""
    import torch

    from masknet.serving.bundle import verify_and_load
    from masknet.serving.features import FeatureEncoder
    from masknet.serving.service import RankRequest, Scorer

    torch.set_num_threads(1)
    b = verify_and_load(run)
    fe = FeatureEncoder(b.encoder, b.field_names, b.cardinalities)
    scorers = {"forward_torch": Scorer(b, "torch"), "forward_onnx": Scorer(b, "onnx", threads=1)}
    out = []
    for n, body in bodies.items():
        stages: dict[str, list[float]] = {}

        def timed(name, f):
            t = time.thread_time()
            r = f()
            stages.setdefault(name, []).append((time.thread_time() - t) * 1000)
            return r

        for _ in range(reps):
            obj = timed("json_parse", lambda: json.loads(body))
            req = timed("validate", lambda: RankRequest.model_validate(obj))
            feats = [c.features for c in req.candidates]
            x = timed("encode", lambda: fe.encode(fe.gather(feats, str), n, lambda i, c: ""))
            scores = None
            for name, sc in scorers.items():
                scores = timed(name, lambda: sc(x))

            def respond():
                order = np.argsort(-scores, kind="stable")
                s = scores.tolist()
                return json.dumps({"scores": s, "ranking": [{"id": i, "index": i, "score": s[i]} for i in order.tolist()]})

            timed("respond", respond)
        row = {"candidates": n, **{k: round(float(np.median(v)), 2) for k, v in stages.items()}}
        out.append(row)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained run folder")
    p.add_argument("--data", required=True, help="raw rows in the model's format (candidates are built from them)")
    p.add_argument("--format", help="read --data as this format (same fields as the model's)")
    p.add_argument("--runtime", choices=("torch", "onnx"), default="torch")
    p.add_argument("--threads", type=int, help="server threads per forward pass (default: the runtime's)")
    p.add_argument("--sizes", default="1,100,1000", help="candidates per request (default 1,100,1000)")
    p.add_argument("--concurrency", default="1,8", help="client threads (default 1,8)")
    p.add_argument("--requests", type=int, default=300, help="at most this many requests per cell (default 300)")
    p.add_argument("--seconds", type=float, default=20, help="at most this long per cell (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured requests per size first (default 5)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--stages", action="store_true", help="only measure the CPU time of each request stage in process (no server)")
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    rows = raw_rows(args.model, args.data, max(args.sizes), args.format)
    bodies = {n: json.dumps({"candidates": [{"id": i, "features": r} for i, r in enumerate(rows[:n])]}).encode() for n in args.sizes}
    if args.stages:
        rows_ = stage_cpu_ms(args.model, bodies)
        keys = list(rows_[0])
        print(f"CPU ms per /rank request, by stage (single thread, median); load average {os.getloadavg()[0]:.2f}\n")
        print("| " + " | ".join(keys) + " |")
        print("|" + "---:|" * len(keys))
        for r in rows_:
            print("| " + " | ".join(f"{r[k]:,}" if k == "candidates" else str(r[k]) for k in keys) + " |")
        return 0
    load_before = os.getloadavg()
    port = free_port()
    server = start_server(args, port)
    results = []
    try:
        for n in args.sizes:
            run_cell(port, bodies[n], n, 1, args.warmup, 60)
            for c in args.concurrency:
                r = run_cell(port, bodies[n], n, c, args.requests, args.seconds)
                r["body_bytes"] = len(bodies[n])
                results.append(r)
                print(f"  {n:>5} candidates  x{c}: {r['requests']} requests, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                      f"{r['errors']} errors", file=sys.stderr, flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    load_after = os.getloadavg()
    info = {
        "model": args.model,
        "runtime": args.runtime,
        "server_threads": args.threads,
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }
    print(f"\nmodel {args.model} | runtime {args.runtime} | server threads {args.threads or 'default'} | "
          f"{info['cpus']} CPUs | load average before {info['loadavg_before']}, after {info['loadavg_after']}\n")
    print("| candidates | concurrency | requests | errors | req/s | candidates/s | p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['candidates']:,} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['requests_per_s']} | "
              f"{r['candidates_per_s']:,} | {r['p50_ms']} | {r['p99_ms']} |")
    for r in results:
        if r["first_error"]:
            print(f"first error at {r['candidates']} x{r['concurrency']}: {r['first_error']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=2))
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
