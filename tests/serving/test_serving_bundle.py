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


# ---------------------------------------------------------------------------
# Review of issue 14, items 5 and 14: sealing never blesses a change; manifests and model.json are
# checked for their structure, in one line


def test_sealing_refuses_a_sealed_folder_whose_weights_changed(run, capsys):
    """Before: `python -m masknet.serving.bundle RUN` re-sealed a flipped bit in the weights, and
    evaluate and --verify then accepted the corrupt weights."""
    from masknet.serving.bundle import main as bundle_main

    bad = copy_run(run, "resealed")
    manifest = (bad / MANIFEST).read_bytes()
    _flip_byte(bad / "model.safetensors")
    assert bundle_main([str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already sealed, and no longer matches its manifest" in err, err
    assert "model.safetensors: SHA-256 does not match" in err and "--reseal" in err
    assert (bad / MANIFEST).read_bytes() == manifest
    with pytest.raises(UserError, match="SHA-256 does not match"):
        verify_and_load(bad)
    assert bundle_main(["--reseal", str(bad)]) == 0  # explicit: the user changed the weights on purpose
    verify_manifest(bad)
    # a sealed folder that still matches seals again (the same files, the same bundle hash)
    good = copy_run(run, "sealed-again")
    assert bundle_main([str(good)]) == 0
    assert verify_manifest(good)["bundle_sha256"] == json.loads((run / MANIFEST).read_text())["bundle_sha256"]


def test_sealing_refuses_a_garbled_manifest_unless_resealed(run):
    bad = copy_run(run, "garbled-seal")
    (bad / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="already sealed.*not valid JSON"):
        write_manifest(bad)
    write_manifest(bad, reseal=True)
    verify_manifest(bad)


def test_manifest_json_that_is_a_folder_is_one_line_when_sealing(run):
    bad = copy_run(run, "manifest-folder")
    (bad / MANIFEST).unlink()
    (bad / MANIFEST).mkdir()
    with pytest.raises(UserError, match=r"manifest\.json: exists and is not a file"):
        write_manifest(bad, reseal=True)


def _edit_manifest(r, edit):
    m = json.loads((r / MANIFEST).read_text())
    edit(m)
    (r / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("edit, key", [
    (lambda m: m["files"]["model.json"].update(bytes="x"), "files.model.json.bytes"),
    (lambda m: m["files"].update({"model.json": ["a", 1]}), "files.model.json"),
    (lambda m: m["files"]["encoder.json"].update(sha256=12), "files.encoder.json.sha256"),
    (lambda m: m["files"]["model.json"].pop("bytes"), "files.model.json.bytes"),
    (lambda m: m.update(files=[1, 2]), "files"),
    (lambda m: m.update(encoder=["x"]), "encoder"),
])
def test_a_manifest_with_wrong_types_is_one_line_everywhere(run, tmp_path, capsys, edit, key):
    """Before: TypeError / AttributeError tracebacks in --verify, evaluate and serve."""
    from masknet.serving.bundle import main as bundle_main

    bad = copy_run(run, "typed-manifest")
    _edit_manifest(bad, lambda m: edit(m))
    with pytest.raises(UserError) as err:
        verify_and_load(bad)  # what serve and export load through
    assert f"manifest.json: {key}: expected" in str(err.value) and "\n" not in str(err.value)
    assert bundle_main(["--verify", str(bad)]) == 2
    assert f"{key}: expected" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(bad), "--data", str(prepared("criteo8k"))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{key}: expected" in err, err
    with pytest.raises(UserError, match=f"{key}: expected"):
        load_model(bad)


@pytest.mark.parametrize("edit, key", [
    (lambda s: s.update(cardinalities=["abc"] * len(s["cardinalities"])), "cardinalities"),
    (lambda s: s.update(cardinalities=s["cardinalities"][:-1]), "cardinalities"),
    (lambda s: s.update(cardinalities=[10**12] * len(s["cardinalities"])), "cardinalities"),
    (lambda s: s.update(field_names="C1"), "field_names"),
    (lambda s: s.update(model="nope"), "model"),
    (lambda s: s.update(encoder="../encoder.json"), "encoder"),
    (lambda s: s["model_config"].update(block_dim="wide"), "model_config.block_dim"),
    (lambda s: s["model_config"].update(num_blocks=0), "model_config.num_blocks"),
])
def test_sealing_and_loading_check_model_json(run, edit, key):
    """Before: sealing accepted `cardinalities: ["abc", ...]`; evaluate and serve then failed with a
    ValueError traceback."""
    bad = copy_run(run, "garbled-spec")
    spec = json.loads((bad / "model.json").read_text())
    edit(spec)
    (bad / "model.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match=rf"model\.json: {key}: expected|model\.json: {key}: must be"):
        write_manifest(bad, reseal=True)
    # sealed by another tool: loading refuses it the same way
    m = json.loads((bad / MANIFEST).read_text())
    import hashlib

    from masknet.runs import bundle_hash

    m["files"]["model.json"] = {"sha256": hashlib.sha256((bad / "model.json").read_bytes()).hexdigest(),
                                "bytes": (bad / "model.json").stat().st_size}
    m["bundle_sha256"] = bundle_hash(m["files"])
    (bad / MANIFEST).write_text(json.dumps(m))
    for load in (verify_and_load, load_model):
        with pytest.raises(UserError, match=rf"model\.json: {key}"):
            load(bad)
