"""CPU cost of the service's request path around the forward pass, for one /rank request.

    python benchmarks/request_path.py --model RUN --data RAWFILE [--candidates 1000] [--reps 30] [--json OUT]

Two numbers, both CPU time (so much less sensitive to other processes than wall time):
  1. decoder: decode + validate + encode (the service's RequestDecoder) and the response
     (argsort, ranking, msgspec), this thread's CPU, median of --reps; the same measurement as
     loadtest.py's `request_path_cpu_ms`;
  2. whole request in process: the ASGI app called directly (no sockets, no HTTP parsing) with
     the forward pass replaced by zeros, so it counts everything the server does around it:
     admission and body reading, routing, the hop to the decode thread and back, decoding,
     batching, the response; the process's CPU (all threads) per request, median of --reps
     rounds of 10 requests.
The body is --candidates candidates built from real raw rows, every feature per candidate (the
heaviest shape, as in loadtest.py). Prints the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadtest import InProcess, raw_rows  # noqa: E402


async def _call(app, body: bytes) -> int:
    """One POST /rank straight into the ASGI app; returns the status."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/rank", "raw_path": b"/rank", "query_string": b"", "root_path": "", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 1), "headers": [(b"content-type", b"application/json"),
                                                      (b"content-length", str(len(body)).encode())]}
    sent = [{"type": "http.request", "body": body, "more_body": False}]
    status = []

    async def receive():
        return sent.pop() if sent else {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


def whole_request_cpu_ms(app, body: bytes, reps: int, per_round: int = 10) -> float:
    app.state.batcher.score = lambda x: np.zeros(len(x), np.float32)  # no forward pass

    async def rounds() -> list[float]:
        out = []
        for _ in range(3):
            assert await _call(app, body) == 200
        for _ in range(reps):
            t = time.process_time()
            for _ in range(per_round):
                await _call(app, body)
            out.append((time.process_time() - t) * 1000 / per_round)
        return out

    return round(float(np.median(asyncio.run(rounds()))), 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="raw rows in the model's format")
    p.add_argument("--format")
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    args.runtime, args.precision = "torch", "fp32"
    load_before = os.getloadavg()[0]
    rows = raw_rows(args.model, args.data, args.candidates, args.format)
    body = json.dumps({"candidates": [{"id": i, "features": r} for i, r in enumerate(rows)]}).encode()
    inproc = InProcess(args, body, threads=1)
    decoder = inproc.request_path_cpu_ms(args.reps)
    whole = whole_request_cpu_ms(inproc.app, body, args.reps)
    out = {"candidates": args.candidates, "body_bytes": len(body), "decoder_cpu_ms": decoder,
           "whole_request_cpu_ms": whole, "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    print(f"{args.candidates} candidates ({len(body):,} bytes): decode+validate+encode {decoder['decode_validate_encode']} ms, "
          f"respond {decoder['respond']} ms, total {decoder['total']} ms (this thread's CPU); whole request in process "
          f"(forward pass stubbed) {whole} ms of process CPU; load average {out['load_avg'][0]} -> {out['load_avg'][1]}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
