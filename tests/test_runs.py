"""masknet.runs: the run-folder layer (issue #15 item 1). It alone names a run's files, writes the
model files, seals and verifies the folder, and is the one model loader serving and training use."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from masknet import runs
from masknet.config import ModelConfig
from masknet.errors import UserError
from masknet.models import build_model
from masknet.models.scoring import CALIBRATION_FILE
from masknet.runs import RunFolder
from masknet.serving.bundle import verify_and_load
from masknet.training import runfolder
from masknet.training.checkpoint import CHECKPOINT_DIR

CARDS = [5, 7, 4]


def tiny_run(tmp_path):
    cfg = ModelConfig(name="sermasknet", embedding_dim=4, block_dim=8, num_blocks=2)
    torch.manual_seed(0)
    model = build_model(cfg, CARDS)
    data = SimpleNamespace(
        field_names=["a", "b", "c"], cardinalities=CARDS, task_names=["click"], multi_valued=[],
        splits={"valid": SimpleNamespace(labels=None)}, meta={"source": {"name": "test"}},
    )
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.write_model(model, cfg, data)
    folder.write_metrics({"test": {"auc": 0.7}})
    return folder, model


def test_the_run_folder_names_every_file_a_run_writes():
    # the rules (training/runfolder.py) and the checkpoints use the run folder's names, not their own
    assert runfolder.RUN_FILES is runs.RUN_FILES and runfolder.CONFIG_FILE == runs.CONFIG
    assert CHECKPOINT_DIR == runs.CHECKPOINTS and CALIBRATION_FILE == runs.CALIBRATION
    folder = RunFolder("r")
    paths = [folder.config, folder.model_config, folder.weights, folder.encoder, folder.metrics, folder.log,
             folder.calibration, folder.manifest, folder.checkpoints]
    assert {p.name for p in paths} <= set(runs.RUN_FILES)


def test_seal_verify_and_the_one_loader(tmp_path):
    folder, model = tiny_run(tmp_path)
    manifest = folder.seal()
    assert set(manifest["files"]) == {"model.json", "model.safetensors", "dataset.json", "metrics.json"}
    assert folder.verify() == manifest and folder.read_metrics() == {"test": {"auc": 0.7}}
    x = torch.tensor([[1, 2, 3], [4, 6, 0]])
    loaded = folder.load(verify="required")
    bundle = verify_and_load(folder.path)  # serving goes through the same loader
    with torch.inference_mode():
        want = model.eval()(x)
        assert torch.equal(loaded.model(x), want) and torch.equal(bundle.model(x), want)
    assert loaded.manifest == manifest and bundle.manifest == manifest and not loaded.model.training


def test_a_changed_file_is_refused_by_verify_load_and_a_second_seal(tmp_path):
    folder, _ = tiny_run(tmp_path)
    folder.seal()
    folder.write_metrics({"test": {"auc": 0.9}})  # same size, other bytes
    for act in (folder.verify, lambda: folder.load(), folder.seal):
        with pytest.raises(UserError, match="metrics.json"):
            act()
    folder.seal(reseal=True)  # on purpose
    assert folder.verify()["files"]["metrics.json"]["bytes"] == folder.metrics.stat().st_size


def test_load_requires_a_manifest_only_when_asked(tmp_path):
    folder, _ = tiny_run(tmp_path)
    assert folder.load(verify="if-sealed").manifest is None  # an unsealed folder loads for the library
    with pytest.raises(UserError, match="manifest.json: missing"):
        folder.load(verify="required")  # serving loads sealed bundles only
    json.loads(folder.model_config.read_text())
    folder.model_config.write_text(json.dumps({"model": "nope"}))
    with pytest.raises(UserError, match="model.json: model: expected one of"):
        folder.load(verify="no")


def test_bundle_files_and_log_are_read_through_the_run_folder(tmp_path):
    folder, _ = tiny_run(tmp_path)
    assert folder.read_log() == [] and not folder.is_bundle()
    folder.log.write_text('{"step": 1, "auc": 0.6}\n\n{"step": 2, "auc": 0.7}\n')
    assert folder.read_log() == [{"step": 1, "auc": 0.6}, {"step": 2, "auc": 0.7}]
    folder.seal()
    assert folder.is_bundle()
    files = folder.bundle_files()
    listed = json.loads(folder.manifest.read_text())["files"]
    assert set(files) == set(listed) | {runs.MANIFEST}
    assert files[runs.WEIGHTS] == folder.weights.read_bytes()
    assert runs.parse_log(files[runs.LOG]) == folder.read_log()
