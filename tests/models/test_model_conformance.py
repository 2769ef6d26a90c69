"""Every registered model honours the CTRModel contract (in the spirit of scikit-learn's check_estimator).

Parametrized from masknet.registry, so a new model is checked as soon as it is registered; each
check is also a plain function (`check_model(name)`) that docs/extending.md's walkthrough calls
on the model it defines. For single-valued input and for multi-valued fields (mean, sum and
weighted max pooling):
  * forward: logits [B] float32, finite; a Batch(x) and the bare LongTensor agree; a row's logit
    does not depend on the other rows of its batch (eval mode);
  * masks (models whose forward takes `return_masks`): one V_mask [B, width] per block, none when
    `model.use_mask` is off;
  * ONNX export (serving.export): onnxruntime's logits == PyTorch's, at several batch sizes;
  * save/load: safetensors bytes of the state dict load into a freshly built model (another seed)
    and give the same logits;
  * config_fields: the same seed builds the same weights whatever the ModelConfig keys the model
    does not declare are set to.
Tiny shapes: the whole file runs in well under a minute.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from masknet import registry
from masknet.config import ModelConfig
from masknet.data.batch import Batch, MultiValuedField
from masknet.models import build_model, model_class

TINY = ModelConfig(embedding_dim=4, num_blocks=2, block_dim=8, top_mlp=[8], dnn_hidden=[8], cin_layers=[4, 4],
                   cross_layers=2, attention_layers=1, attention_heads=2, attention_dim=4)
CARDS = [5, 7, 3]
MULTI = (MultiValuedField("g", 6, 3, "mean"), MultiValuedField("h", 5, 2, "sum"), MultiValuedField("k", 4, 2, "max", weighted=True))
# ModelConfig keys a model may ignore, each with a value that changes any model that reads it
OTHER_VALUES = {"embedding_dim": 6, "dropout": 0.3, "num_blocks": 3, "block_dim": 12, "reduction_ratio": 4.0,
                "use_mask": False, "emb_layernorm": False, "block_layernorm": False, "block_ffn": False,
                "top_mlp": [12, 4], "dnn_hidden": [12, 4], "cross_layers": 3, "cin_layers": [6], "attention_layers": 2,
                "attention_heads": 1, "attention_dim": 6, "attention_residual": False}
B = 9


def tiny_model(name: str, multi: tuple = (), seed: int = 0, cfg: ModelConfig = TINY):
    torch.manual_seed(seed)
    model = build_model(replace(cfg, name=name), CARDS, multi)
    with torch.no_grad():  # move the weights far from init so that every path carries signal
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def tiny_batch(multi: tuple = (), seed: int = 3) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.randint(0, c, (B,), generator=gen) for c in CARDS], dim=1)
    if not multi:
        return Batch(x)
    blocks = []
    for m in multi:  # each row a few values, 0 = padding at the end; row 0 an empty list
        ids = torch.randint(1, m.cardinality, (B, m.max_len), generator=gen)
        length = torch.randint(0, m.max_len + 1, (B, 1), generator=gen)
        length[0] = 0
        blocks.append(torch.where(torch.arange(m.max_len) < length, ids, 0))
    seq = torch.cat(blocks, dim=1)
    weights = torch.rand(seq.shape, generator=gen) + 0.5
    return Batch(x, seq, weights)


def logits(model, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch)


def check_forward(name: str, multi: tuple = ()) -> None:
    model, batch = tiny_model(name, multi), tiny_batch(multi)
    out = logits(model, batch)
    assert out.shape == (B,) and out.dtype == torch.float32 and torch.isfinite(out).all(), (name, out)
    assert out.std() > 1e-4, f"{name}: every row gets the same logit"
    if not multi:
        torch.testing.assert_close(logits(model, batch.x), out)  # the bare LongTensor is the same input
    for i in (0, B - 1):  # a row alone scores as it does within the batch
        alone = Batch(batch.x[i : i + 1], *(None if t is None else t[i : i + 1] for t in (batch.seq, batch.seq_weights)))
        torch.testing.assert_close(logits(model, alone), out[i : i + 1], rtol=1e-5, atol=1e-5)


def check_masks(name: str, multi: tuple = ()) -> None:
    model = tiny_model(name, multi)
    if "return_masks" not in inspect.signature(model.forward).parameters:
        pytest.skip(f"{name} has no instance-guided masks")
    batch = tiny_batch(multi)
    with torch.no_grad():
        out, masks = model(batch, return_masks=True)
    torch.testing.assert_close(out, logits(model, batch))
    assert len(masks) == TINY.num_blocks
    emb_width = model.num_fields * TINY.embedding_dim
    for m in masks:
        assert m.shape[0] == B and m.shape[1] in (emb_width, TINY.block_dim) and torch.isfinite(m).all()
    assert masks[0].shape[1] == emb_width  # the first block masks the embedding itself
    off = tiny_model(name, multi, cfg=replace(TINY, use_mask=False))
    with torch.no_grad():
        assert off(batch, return_masks=True)[1] == []


def check_onnx(name: str, multi: tuple = ()) -> None:
    from masknet.serving.bundle import Bundle
    from masknet.serving.export import export_onnx_bytes, feeds, onnx_session

    model, batch = tiny_model(name, multi), tiny_batch(multi)
    spec = {"model": name, "field_names": [f"f{i}" for i in range(len(CARDS))], "cardinalities": CARDS}
    if multi:
        spec["multi_valued"] = [m.to_dict() for m in multi]
    bundle = Bundle(None, model, None, spec, {"bundle_sha256": "0" * 64})
    want = logits(model, batch).numpy()
    sess = onnx_session(export_onnx_bytes(bundle))
    rows = batch.x.numpy() if not multi else _encoded(batch)
    for n in (B, 1, 4):
        part = rows[:n] if not multi else type(rows)(rows.x[:n], rows.seq[:n], rows.seq_weights[:n])
        (got,) = sess.run(["logit"], feeds(bundle, part))
        assert got.shape == (n,)
        np.testing.assert_allclose(got, want[:n], rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def _encoded(batch: Batch):
    from masknet.data.batch import EncodedRows

    return EncodedRows(batch.x.numpy(), batch.seq.numpy(), batch.seq_weights.numpy())


def check_save_load(name: str, multi: tuple = ()) -> None:
    model, batch = tiny_model(name, multi), tiny_batch(multi)
    blob = save({k: v.detach().contiguous() for k, v in model.state_dict().items()})  # what a run folder holds
    fresh = tiny_model(name, multi, seed=7)
    assert not torch.allclose(logits(fresh, batch), logits(model, batch))  # another seed: other weights
    fresh.load_state_dict(load(blob), strict=True)
    torch.testing.assert_close(logits(fresh.eval(), batch), logits(model, batch), rtol=0, atol=0)


def check_config_fields(name: str) -> None:
    """Undeclared ModelConfig keys change nothing; each declared one that has a test value does
    change something (so the declaration is neither too short nor padded)."""
    declared = set(model_class(name).config_fields)
    base = tiny_model(name)
    state = {k: v.shape for k, v in base.state_dict().items()}
    batch = tiny_batch()
    for key, value in OTHER_VALUES.items():
        other = tiny_model(name, cfg=replace(TINY, **{key: value}))
        same = {k: v.shape for k, v in other.state_dict().items()} == state and torch.equal(logits(other, batch), logits(base, batch))
        if key in declared and key != "dropout":  # dropout is off in eval mode: it changes training only
            assert not same, f"{name}: declares model.{key} but ignores it"
        elif key not in declared:
            assert same, f"{name}: reads model.{key} but does not declare it in config_fields"


def check_model(name: str) -> None:
    """Every check of this file on the registered model `name`."""
    for multi in ((), MULTI):
        check_forward(name, multi)
        try:
            check_masks(name, multi)
        except pytest.skip.Exception:
            pass
        check_save_load(name, multi)
        check_onnx(name, multi)
    check_config_fields(name)


MODELS = list(registry.model_names())
INPUTS = [pytest.param((), id="single"), pytest.param(MULTI, id="multi")]


@pytest.mark.parametrize("multi", INPUTS)
@pytest.mark.parametrize("name", MODELS)
def test_forward(name, multi):
    check_forward(name, multi)


@pytest.mark.parametrize("multi", INPUTS)
@pytest.mark.parametrize("name", MODELS)
def test_masks(name, multi):
    check_masks(name, multi)


@pytest.mark.parametrize("multi", INPUTS)
@pytest.mark.parametrize("name", MODELS)
def test_onnx_export(name, multi):
    check_onnx(name, multi)


@pytest.mark.parametrize("multi", INPUTS)
@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip(name, multi):
    check_save_load(name, multi)


@pytest.mark.parametrize("name", MODELS)
def test_config_fields(name):
    check_config_fields(name)


def test_the_checks_catch_a_model_that_breaks_the_contract(monkeypatch):
    """The conformance checks themselves: a model whose row logits depend on the batch, and one
    that reads an undeclared key, each fail."""
    from masknet.models.dnn import DNN

    class Leaky(DNN):
        def forward(self, x):
            out = super().forward(x)
            return out - out.mean()  # each row's logit depends on the others

    class Undeclared(DNN):
        config_fields = ("embedding_dim", "dnn_hidden")  # reads dropout too... and block_dim:

        def __init__(self, cardinalities, cfg, multi_valued=()):
            super().__init__(cardinalities, replace(cfg, dnn_hidden=[cfg.block_dim]), multi_valued)

    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    registry.register_model("leaky", Leaky, "breaks batch independence")
    registry.register_model("undeclared", Undeclared, "reads model.block_dim")
    with pytest.raises(AssertionError):
        check_forward("leaky")
    with pytest.raises(AssertionError, match="reads model.block_dim but does not declare it"):
        check_config_fields("undeclared")
