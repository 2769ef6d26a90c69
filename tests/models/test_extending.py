"""docs/extending.md's "Add a model", run as written: its code blocks define and register a tiny
model, the conformance checks pass on it, and `masknet train` trains it one step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from masknet import registry

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def model_section_blocks() -> list[str]:
    text = DOC.read_text()
    section = text.split("## Add a model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def restore_models():
    before = dict(registry.MODELS)
    yield
    registry.MODELS.clear()
    registry.MODELS.update(before)


def test_the_walkthrough_has_the_four_steps():
    blocks = model_section_blocks()
    assert len(blocks) == 4
    assert "class EmbeddingMLP(CTRModel)" in blocks[0] and 'register_model("embmlp"' in blocks[1]
    assert "check_model(" in blocks[2] and 'main(["train", "--model", "embmlp"' in blocks[3]


def test_add_a_model_as_the_doc_says(tmp_path, restore_models):
    run_dir = tmp_path / "run"
    scope: dict = {"run_dir": run_dir}
    for block in model_section_blocks():  # define, register, check, train: each block as the doc shows it
        exec(compile(block, str(DOC), "exec"), scope)
    assert "embmlp" in registry.model_names()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "embmlp" and metrics["best_step"] == 1 and 0.0 < metrics["test"]["auc"] < 1.0
    spec = json.loads((run_dir / "model.json").read_text())
    assert spec["model"] == "embmlp" and spec["model_config"]["dnn_hidden"] == [8]
    assert (run_dir / "model.safetensors").stat().st_size > 0
