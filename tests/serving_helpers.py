"""Shared, cached set-up for the tests/test_serving_*.py modules (imported, not collected).

Tiny models are trained once per test session on the real samples in ../shared/data and
cached here, so every serving test module reuses them.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from conftest import shared_data_path as need  # a path under ../shared/data, or skip the test (re-exported)

TINY = [
    "--epochs", "1",
    "--set", "model.block_dim=16",
    "--set", "model.num_blocks=2",
    "--set", "model.top_mlp=16",
    "--set", "model.dnn_hidden=16",
    "--set", "train.threads=1",
    "--set", "train.batch_size=256",
    "--quiet",
]


@functools.lru_cache(maxsize=None)
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="masknet-serving-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def _main(argv: list[str]) -> None:
    from masknet.cli import main

    assert main(argv) == 0, argv


@functools.lru_cache(maxsize=None)
def prepared(name: str) -> Path:
    """Prepared folders: criteo8k (explicit files), avazu (the 100-row sample), frappe (2,000 rows)."""
    out = _root() / f"data-{name}"
    if name == "criteo8k":
        d = need("criteo-8k")
        _main(["prepare", "--format", "criteo", "--train", str(d / "train.txt"), "--valid", str(d / "valid.txt"),
               "--test", str(d / "test.txt"), "--output", str(out)])
    elif name == "avazu":
        _main(["prepare", "--format", "avazu", "--input", str(need("avazu-sample-100", "avazu_sample.txt")),
               "--output", str(out), "--min-count", "1"])
    elif name == "frappe":
        src = need("frappe", "frappe.test.libfm")
        head = _root() / "frappe-head.libfm"
        with open(src) as fin, open(head, "w") as fout:
            for i, line in enumerate(fin):
                if i == 2000:
                    break
                fout.write(line)
        _main(["prepare", "--format", "frappe", "--input", str(head), "--output", str(out)])
    else:
        raise ValueError(name)
    return out


@functools.lru_cache(maxsize=None)
def trained(name: str, model: str = "sermasknet") -> Path:
    """A tiny trained run folder (bundle) on prepared(name), or on the synthetic data ('synthetic')."""
    out = _root() / f"run-{name}-{model}"
    data = [] if name == "synthetic" else ["--data", str(prepared(name))]
    extra = ["--set", "data.synthetic.rows=2000"] if name == "synthetic" else []
    _main(["train", "--model", model, *data, *extra, *TINY, "--output", str(out)])
    return out


def copy_run(run: Path, name: str) -> Path:
    """A fresh copy of a run folder (to tamper with, or to 'move to another machine')."""
    dst = _root() / "copies" / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


CRITEO_COLUMNS = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]


def criteo_rows(n: int) -> list[dict]:
    """The first n rows of criteo-8k's test.txt as JSON rows (numbers as JSON numbers, empty = null)."""
    rows = []
    for line in need("criteo-8k", "test.txt").read_text().splitlines()[:n]:
        row = {c: (v if v != "" else None) for c, v in zip(CRITEO_COLUMNS, line.split("\t")[1:])}
        for c in CRITEO_COLUMNS[:13]:
            if row[c] is not None:
                row[c] = int(row[c])
        rows.append(row)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(run: Path, log: Path, *args: str) -> Iterator[tuple[int, subprocess.Popen]]:
    """`masknet serve --model run *args` on a free loopback port, its output in `log`; yields
    (port, process) once /health answers (fails the test if it does not start); stops it after."""
    port = free_port()
    cmd = [sys.executable, "-m", "masknet", "serve", "--model", str(run), "--port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    resp.read()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"server did not start (exit {proc.poll()}): {log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.2)
        yield port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
