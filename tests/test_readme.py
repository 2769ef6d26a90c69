"""The README's shell and Python blocks run as written, and what they write is git-ignored.

Convention (an HTML comment on the line before a fenced block, invisible when rendered):
    <!-- readme-test: skip (why) -->   not run here (the reason says what covers it instead)
    <!-- readme-test: tiny -->         run with small-model settings appended to every
                                       `masknet train` (a `masknet` wrapper first on PATH), so a
                                       block of full-size trainings takes seconds
    (no comment)                       run exactly as written
Each block runs in a fresh git repository with the project's .gitignore, beside a `shared`
link to ../shared/data (so the README's `../shared/data/...` paths resolve); afterwards `git
status` must show nothing untracked. Blocks that read ../shared/data skip, saying so, when it is
absent. Also runs docs/examples/quickstart.py, the notebook-style estimator walk-through.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
SHARED = SHARED_DATA.parent  # ../shared, linked into each block's folder
TINY_TRAIN = [
    "--set", "data.synthetic.rows=5000", "--set", "train.epochs=2", "--set", "train.batch_size=256",
    "--set", "train.lr=0.005", "--set", "model.block_dim=8",
    "--set", "model.num_blocks=1", "--set", "model.top_mlp=[8]", "--set", "model.dnn_hidden=[8]",
    "--set", "train.threads=1", "--set", "model.linear_term=false", "--quiet",
]
FENCE = re.compile(r"(?:<!-- readme-test: (\w+)[^>]*-->\n)?```(bash|python)\n(.*?)\n```", re.S)


def readme_blocks() -> list[tuple[str, str, str, int]]:
    """(mode, language, code, line) for every bash and python block of the README."""
    text = (ROOT / "README.md").read_text()
    return [(m.group(1) or "run", m.group(2), m.group(3), text[: m.start()].count("\n") + 1) for m in FENCE.finditer(text)]


def test_every_block_is_run_or_says_why_not():
    blocks = readme_blocks()
    assert {mode for mode, *_ in blocks} <= {"run", "tiny", "skip"}
    assert sum(mode != "skip" for mode, *_ in blocks) >= 5
    text = (ROOT / "README.md").read_text()
    assert text.count("```bash") + text.count("```python") == len(blocks)  # none missed by the pattern


def _sandbox(tmp_path: Path, tiny: bool) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    repo.mkdir()
    if SHARED.exists():
        (tmp_path / "shared").symlink_to(SHARED)
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    env = dict(os.environ)
    if tiny:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "masknet"
        wrapper.write_text(
            f"#!{sys.executable}\nimport sys\nfrom masknet.cli import main\nargs = sys.argv[1:]\n"
            f"if args[:1] == ['train']:\n    args += {TINY_TRAIN!r}\nsys.exit(main(args))\n"
        )
        wrapper.chmod(0o755)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    else:
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return repo, env


@pytest.mark.parametrize("mode,lang,code,line", [pytest.param(*b, id=f"line{b[3]}-{b[1]}") for b in readme_blocks()])
def test_readme_block(tmp_path, mode, lang, code, line):
    if mode == "skip":
        pytest.skip(f"README line {line}: marked readme-test: skip")
    if "../shared/data" in code and not (SHARED / "data").exists():
        pytest.skip(f"README line {line} reads ../shared/data, which is absent (see tests/conftest.py)")
    repo, env = _sandbox(tmp_path, tiny=mode == "tiny")
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README line {line} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    untracked = [s for s in status if s and s != "?? .gitignore"]
    assert not untracked, f"README line {line} leaves files .gitignore does not cover: {untracked[:10]}"


def test_docs_quickstart_script(tmp_path, shared_data):
    """docs/examples/quickstart.py: MaskNetClassifier on a polars frame of criteo-8k, score,
    cross_val_score(cv=3), save, load."""
    shared_data("criteo-8k")  # the quickstart script reads it
    env = dict(os.environ, MASKNET_DATA=str(SHARED_DATA))
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "examples" / "quickstart.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    auc = float(re.search(r"test AUC (\d\.\d+)", r.stdout).group(1))
    folds = re.search(r"3-fold AUC \[([^\]]+)\]", r.stdout).group(1).split()
    assert 0.55 < auc < 1 and len(folds) == 3 and all(0.5 < float(f) < 1 for f in folds)
    assert "reloaded gives the same scores: True" in r.stdout
    assert (tmp_path / "runs" / "quickstart-clf" / "manifest.json").is_file()


def test_gitignore_hides_no_source(tmp_path):
    """The README's output patterns are anchored: none of them hides a new file in src/, tests/ or docs/."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    new = [str(p.relative_to(ROOT).parent / "new_file.py") for p in ROOT.glob("src/masknet/**/__init__.py")]
    new += ["tests/new_file.py", "docs/new_file.md", "docs/examples/new_file.py"]
    r = subprocess.run(["git", "check-ignore", *new], cwd=repo, capture_output=True, text=True)
    assert r.stdout == "", f"ignored by .gitignore: {r.stdout.split()}"
