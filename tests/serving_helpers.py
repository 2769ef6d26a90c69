"""Shared, cached set-up for the tests/test_serving_*.py modules (imported, not collected).

Tiny models are trained once per test session on the real samples in ../shared/data and
cached here, so every serving test module reuses them.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
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


def need(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test saying what is missing."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data sample not found: {path} (the serving tests read ../shared/data; see its README)")
    return path


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
