"""Packaging: the wheel carries the package data and runs `masknet train` outside the source
tree; a command whose extra is missing says in one line what to install."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from masknet.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv,extra,module", [
    (["export", "--model", "RUN", "--output", "m.onnx"], "serve", "onnxruntime"),
    (["serve", "--model", "RUN"], "serve", "fastapi"),
    (["reproduce", "--preset", "quick"], "plots", "matplotlib"),
])
def test_missing_extra_is_one_line(monkeypatch, capsys, argv, extra, module):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"masknet {argv[0]}: error: masknet {argv[0]} needs the [{extra}] extra ({module} missing): "
                   f"pip install 'masknet[{extra}]'")


def test_base_commands_import_no_extra():
    """`masknet train`/`predict`/`prepare` and the estimator never import an extra's package (pandas is left
    out: scikit-learn itself imports it when it is installed)."""
    code = (
        "import sys, masknet.cli, masknet.training.run, masknet.serving.predict, masknet.data.prepare, masknet.data.rawrows, masknet.estimator\n"
        "print(sorted(m for m in ('matplotlib', 'onnx', 'onnxruntime', 'fastapi', 'uvicorn', 'msgspec', 'optuna', 'polars') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_wheel_has_package_data_and_trains_outside_the_tree(tmp_path):
    pytest.importorskip("build")
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(ROOT)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("masknet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = sorted(str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "masknet").rglob("*.json"))
    assert data and all(d in names for d in data), (data, names)  # the built-in JSON (paper_results.json, ...)
    assert not any(n.startswith(("tests/", "docs/")) for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    work = tmp_path / "elsewhere"
    work.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", "import masknet, masknet.experiments.paper as p, sys; from masknet.cli import main; "
         "print(masknet.__file__); p.published(); sys.exit(main(sys.argv[1:]))",
         "train", "--quiet", "--epochs", "1", "--set", "data.synthetic.rows=1000", "--set", "model.block_dim=8",
         "--set", "train.threads=1", "--output", "runs/w"],
        cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines()[0].startswith(str(target))  # the wheel's copy, not the source tree
    assert (work / "runs" / "w" / "manifest.json").is_file()
