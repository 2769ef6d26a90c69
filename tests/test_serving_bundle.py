"""Model bundle: manifest, verified loading, round trip, tampering refused, portable folder."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from masknet.cli import main
from masknet.data.dataset import load_prepared
from masknet.errors import UserError
from masknet.serving.bundle import MANIFEST, verify_and_load, verify_manifest, write_manifest
from masknet.serving.predict import score
from masknet.training.run import load_model

from serving_helpers import copy_run, prepared, trained


@pytest.fixture(scope="module")
def run():
    return trained("criteo8k")


def test_bundle_layout_and_manifest(run):
    names = {p.name for p in run.iterdir() if p.is_file()}
    assert {"model.safetensors", "model.json", "encoder.json", "config.yaml", "metrics.json", MANIFEST} <= names
    m = json.loads((run / MANIFEST).read_text())
    assert m["format"] == "masknet-bundle" and m["model"] == "sermasknet" and m["encoder"] == "encoder.json"
    assert {"masknet", "torch", "python"} <= set(m["versions"])
    assert set(m["files"]) == names - {MANIFEST}  # every top-level file, each with its SHA-256 and size
    for name, entry in m["files"].items():
        assert len(entry["sha256"]) == 64 and entry["bytes"] == (run / name).stat().st_size
    assert json.loads((run / "model.json").read_text())["encoder"] == "encoder.json"
    assert (run / "encoder.json").read_bytes() == (prepared("criteo8k") / "encoder.json").read_bytes()
    for p in run.iterdir():  # JSON, YAML and safetensors only: nothing that unpickles
        if p.is_file():
            head = p.read_bytes()[:4]
            assert not head.startswith(b"\x80") and not head.startswith(b"PK"), p


def test_round_trip_same_scores(run):
    bundle = verify_and_load(run)
    model, encoder, spec = bundle  # unpacks as (model, encoder, spec)
    assert encoder is not None and spec["model"] == "sermasknet" and not model.training
    test = load_prepared(prepared("criteo8k")).splits["test"]
    x = np.asarray(test.x, dtype=np.int64)
    metrics = json.loads((run / "metrics.json").read_text())
    from masknet.training.metrics import auc

    assert auc(np.asarray(test.y), score(model, x).astype(np.float64)) == pytest.approx(metrics["test"]["auc"], abs=1e-6)
    again = load_model(run)  # the library loader verifies the manifest too
    with torch.inference_mode():
        assert torch.equal(again(torch.from_numpy(x)), model(torch.from_numpy(x)))


def test_bundle_moved_to_another_place_loads(run, tmp_path):
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("checkpoints"))
    a, b = verify_and_load(run), verify_and_load(moved)
    assert a.bundle_hash == b.bundle_hash
    x = np.asarray(load_prepared(prepared("criteo8k")).splits["valid"].x, dtype=np.int64)
    assert np.array_equal(score(a.model, x), score(b.model, x))


def _flip_byte(path, offset=-10):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "tamper, expect",
    [
        (lambda r: _flip_byte(r / "model.safetensors"), "model.safetensors: SHA-256 does not match"),
        (lambda r: (r / "model.safetensors").write_bytes((r / "model.safetensors").read_bytes()[:-100]), "truncated"),
        (lambda r: (r / "encoder.json").unlink(), "encoder.json: listed in the manifest but missing"),
        (lambda r: _flip_byte(r / "encoder.json", 50), "encoder.json: SHA-256 does not match"),
        (lambda r: (r / "model.json").write_text((r / "model.json").read_text().replace('"block_dim": 16', '"block_dim": 17')), "model.json: SHA-256"),
        (lambda r: (r / MANIFEST).unlink(), "not a sealed model bundle"),
        (lambda r: (r / MANIFEST).write_text("{not json"), "manifest.json: not valid JSON"),
    ],
    ids=["weights-modified", "weights-truncated", "encoder-missing", "encoder-modified", "config-modified",
         "no-manifest", "manifest-corrupt"],
)
def test_tampered_bundle_is_refused(run, tamper, expect):
    bad = copy_run(run, "tampered")
    tamper(bad)
    with pytest.raises(UserError, match=expect.replace("(", r"\(")):
        verify_and_load(bad)


def test_edited_manifest_is_refused(run):
    """Re-hashing a modified file into the manifest is caught by the bundle hash, unless resealed on purpose."""
    bad = copy_run(run, "edited-manifest")
    _flip_byte(bad / "model.safetensors")
    m = json.loads((bad / MANIFEST).read_text())
    import hashlib

    m["files"]["model.safetensors"]["sha256"] = hashlib.sha256((bad / "model.safetensors").read_bytes()).hexdigest()
    (bad / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(UserError, match="bundle_sha256 does not match"):
        verify_manifest(bad)
    with pytest.raises(UserError, match="already sealed, and no longer matches its manifest"):
        write_manifest(bad)  # sealing again would bless the change
    write_manifest(bad, reseal=True)  # an explicit reseal is accepted (and changes the bundle hash)
    assert verify_manifest(bad)["bundle_sha256"] != json.loads((run / MANIFEST).read_text())["bundle_sha256"]


def test_cli_refuses_tampered_bundle_with_one_line(run, tmp_path, capsys):
    bad = copy_run(run, "tampered-cli")
    _flip_byte(bad / "model.safetensors")
    assert main(["export", "--model", str(bad), "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SHA-256 does not match" in err and "model.safetensors" in err
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(UserError, match="SHA-256"):
        load_model(bad)


def test_weights_that_do_not_fit_are_a_user_error(run):
    bad = copy_run(run, "wrong-weights")
    spec = json.loads((bad / "model.json").read_text())
    spec["model_config"]["block_dim"] = 24
    (bad / "model.json").write_text(json.dumps(spec))
    write_manifest(bad, reseal=True)
    with pytest.raises(UserError, match="weights do not fit model.json"):
        verify_and_load(bad)
