"""ONNX export of every model in the registry: onnxruntime scores == PyTorch scores on real rows."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from masknet.cli import main
from masknet.config import ModelConfig
from masknet.data.dataset import load_prepared
from masknet.models import REGISTRY, build_model
from masknet.serving.bundle import Bundle, verify_and_load
from masknet.serving.export import export_onnx_bytes, onnx_session

from serving_helpers import prepared, trained

TOL = 1e-5


@pytest.fixture(scope="module")
def real_rows():
    ds = load_prepared(prepared("criteo8k"))
    return ds, np.asarray(ds.splits["test"].x, dtype=np.int64)  # 391 real Criteo rows, encoded


def tiny_bundle(name: str, cardinalities: list[int], field_names: list[str], **settings) -> Bundle:
    cfg = ModelConfig(
        name=name, block_dim=16, num_blocks=2, top_mlp=[16], dnn_hidden=[16], cin_layers=[8, 8],
        attention_layers=2, attention_heads=2, attention_dim=8, cross_layers=2, **settings,
    )
    torch.manual_seed(0)
    model = build_model(cfg, cardinalities)
    with torch.no_grad():  # weights far from init so that every score differs (init embeddings are ~1e-4)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    spec = {"model": name, "field_names": field_names, "cardinalities": cardinalities}
    return Bundle(None, model, None, spec, {"bundle_sha256": "0" * 64})


CASES = [(name, {}) for name in REGISTRY] + [(name, {"linear_term": True}) for name in ("sermasknet", "paramasknet", "deepfm")]


@pytest.mark.parametrize(("name", "settings"), CASES, ids=[f"{n}{'-linear' if s else ''}" for n, s in CASES])
def test_onnx_parity_every_model(name, settings, real_rows):
    """Every model, and the MaskNets and DeepFM fitted LR first (model.linear_term, the small-data default)."""
    ds, x = real_rows
    bundle = tiny_bundle(name, ds.cardinalities, ds.field_names, **settings)
    if name in ("sermasknet", "paramasknet"):
        assert (bundle.model.linear is not None) == bool(settings)
    sess = onnx_session(export_onnx_bytes(bundle))
    with torch.inference_mode():
        want_logit = bundle.model(torch.from_numpy(x)).numpy()
    want = 1 / (1 + np.exp(-want_logit.astype(np.float64)))
    assert want.std() > 0.01  # a real spread of scores, not a constant
    for n in (len(x), 1, 7, 64):  # dynamic batch size
        score, logit = sess.run(["score", "logit"], {"x": x[:n]})
        assert score.shape == (n,) and logit.shape == (n,)
        assert np.max(np.abs(score - want[:n])) < TOL, name
        assert np.max(np.abs(logit - want_logit[:n])) < 1e-4 * max(1.0, np.abs(want_logit).max())


def test_cli_export_of_a_trained_bundle(tmp_path, real_rows, capsys):
    _, x = real_rows
    run = trained("criteo8k")
    out = tmp_path / "model.onnx"
    assert main(["export", "--model", str(run), "--format", "onnx", "--output", str(out)]) == 0
    assert "max |diff|" in capsys.readouterr().out
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    bundle = verify_and_load(run)
    assert meta["masknet.model"] == "sermasknet" and meta["masknet.bundle_sha256"] == bundle.bundle_hash
    assert bundle.model.linear is not None  # criteo-8k's 7,200 train rows: the small-data first-order term
    assert json.loads(meta["masknet.field_names"]) == bundle.field_names
    sess = onnx_session(out.read_bytes())
    got = sess.run(["score"], {"x": x})[0]
    with torch.inference_mode():
        want = torch.sigmoid(bundle.model(torch.from_numpy(x))).numpy()
    assert np.max(np.abs(got - want)) < TOL
    with pytest.raises(SystemExit) as exc:  # argparse: exit 2 with one line naming the choices
        main(["export", "--model", str(run), "--format", "tflite", "--output", str(out)])
    assert exc.value.code == 2
