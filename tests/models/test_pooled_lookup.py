"""FieldEmbedding's two multi-valued lookups (models/layers.py) give the same outputs and gradients.

"compact" (training and PyTorch scoring: only the values that count are looked up) and "gather"
(static shapes, what ONNX export uses): forward, dense and sparse gradients, and a few
optimizer steps, for mean / sum / max, weighted or not, empty lists, duplicates and lists that
fill max_len.
"""

from __future__ import annotations

import pytest
import torch

from masknet.config import ModelConfig, TrainConfig
from masknet.data.batch import Batch, MultiValuedField
from masknet.models import build_model
from masknet.models.layers import FieldEmbedding
from masknet.training.trainer import Optimizer

CARDS = [5, 7, 3]
MIXED = (
    MultiValuedField("g", 9, 5, "mean"),
    MultiValuedField("h", 6, 3, "sum"),
    MultiValuedField("k", 8, 4, "max"),
    MultiValuedField("gw", 7, 4, "mean", weighted=True),
    MultiValuedField("hw", 5, 3, "sum", weighted=True),
    MultiValuedField("kw", 6, 2, "max", weighted=True),
)
LAYOUTS = {
    "mixed": MIXED,
    "mean": (MultiValuedField("g", 9, 5, "mean"), MultiValuedField("g2", 4, 20, "mean")),
    "sum": (MultiValuedField("h", 6, 3, "sum"),),
    "max": (MultiValuedField("k", 8, 4, "max"), MultiValuedField("k2", 3, 6, "max")),
    "weighted": (MultiValuedField("gw", 7, 4, "mean", weighted=True),),
}


def random_batch(fields, rows: int = 64, seed: int = 0) -> Batch:
    """Lists of every length from empty to max_len (left-aligned, 0 = padding), duplicates
    included, and weights of both signs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.randint(0, c, (rows,), generator=gen) for c in CARDS], dim=1)
    blocks = []
    for m in fields:
        lengths = torch.randint(0, m.max_len + 1, (rows,), generator=gen)
        lengths[:2] = torch.tensor([0, m.max_len])  # an empty list and a full one, always
        ids = torch.randint(1, m.cardinality, (rows, m.max_len), generator=gen)
        ids[:, -1] = ids[:, 0]  # a value listed twice (a tie for max)
        blocks.append(torch.where(torch.arange(m.max_len) < lengths[:, None], ids, 0))
    seq = torch.cat(blocks, dim=1)
    weights = torch.randn(seq.shape, generator=gen) if any(m.weighted for m in fields) else None
    return Batch(x, seq, weights)


def both_lookups(fields, dim: int = 4, init_std: float = 1.0):
    torch.manual_seed(0)
    emb = FieldEmbedding(CARDS, dim, init_std=init_std, multi_valued=fields)
    twin = FieldEmbedding(CARDS, dim, init_std=init_std, multi_valued=fields)
    twin.load_state_dict(emb.state_dict())
    emb.lookup, twin.lookup = "compact", "gather"
    return emb, twin


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dim, init_std", [(4, 1.0), (1, 0.0)])  # (1, 0.0): LR's all-zero start, every max a tie
def test_compact_and_gather_give_the_same_outputs_and_gradients(layout, sparse, dim, init_std):
    fields = LAYOUTS[layout]
    compact, gather = both_lookups(fields, dim, init_std)
    batch = random_batch(fields)
    probe = torch.randn(len(batch), compact.num_fields, compact.dim, generator=torch.Generator().manual_seed(1))
    grads = []
    for emb in (compact, gather):
        emb.sparse = sparse
        out = emb(batch)
        assert out.shape == (len(batch), len(CARDS) + len(fields), emb.dim)
        (out * probe).sum().backward()
        grads.append((out.detach(), emb.weight.grad))
    (out_c, grad_c), (out_g, grad_g) = grads
    torch.testing.assert_close(out_c, out_g, rtol=1e-6, atol=1e-6)
    assert grad_c.is_sparse == sparse
    if sparse:
        pad_row = compact.pad_row
        assert pad_row not in grad_c.coalesce().indices()[0].tolist()  # padding is never looked up
        grad_c, grad_g = grad_c.to_dense(), grad_g.to_dense()
    torch.testing.assert_close(grad_c, grad_g, rtol=1e-5, atol=1e-6)  # a tie's gradient split alike
    assert grad_c.abs().sum() > 0


def test_the_compact_lookup_pools_by_the_documented_equations():
    """Hand-computed e_i for one row per pooling, on the compact path (the gather path has the
    same check in test_multivalued.py::test_pooling_math_and_empty_lists)."""
    fields = (MultiValuedField("g", 6, 4, "mean"), MultiValuedField("h", 5, 3, "sum"), MultiValuedField("k", 4, 2, "max", weighted=True))
    compact, _ = both_lookups(fields)
    W = compact.weight.detach()
    base = [15, 21, 26]  # first table row of g, h, k (after the single fields' 5 + 7 + 3 rows)
    seq = torch.tensor([[2, 2, 3, 0, 1, 4, 0, 2, 3], [0] * 9])
    w = torch.tensor([[0.0] * 7 + [0.5, -2.0], [0.0] * 9])
    out = compact(Batch(torch.tensor([[1, 0, 2], [0, 0, 0]]), seq, w))
    torch.testing.assert_close(out[0, 0], W[1])
    torch.testing.assert_close(out[0, 3], (2 * W[base[0] + 2] + W[base[0] + 3]) / 3)  # duplicates count twice
    torch.testing.assert_close(out[0, 4], W[base[1] + 1] + W[base[1] + 4])
    torch.testing.assert_close(out[0, 5], torch.maximum(0.5 * W[base[2] + 2], -2.0 * W[base[2] + 3]))
    for j, b in enumerate(base):  # an empty list: the field's missing row, weight 1
        torch.testing.assert_close(out[1, 3 + j], W[b])


@pytest.mark.parametrize("name", ["fm", "lr", "sermasknet"])
def test_training_steps_match_with_sparse_adam(name):
    """The trainer's Optimizer (SparseAdam on the tables) takes the same steps on both paths,
    up to rounding (which Adam's normalised step amplifies), and neither touches the padding row."""
    fields = LAYOUTS["mixed"]
    cfg = ModelConfig(name=name, embedding_dim=4, block_dim=8, top_mlp=[8], num_blocks=1)
    models = []
    for lookup in ("compact", "gather"):
        torch.manual_seed(0)
        model = build_model(cfg, CARDS, fields)
        with torch.no_grad():  # off LR's all-zero start: a max whose tie rounding alone decides is not compared
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        for table in model.embeddings():
            table.lookup = lookup
            with torch.no_grad():
                table.weight[table.pad_row] = 0
        opt = Optimizer(model, TrainConfig(lr=0.05))
        for step in range(3):
            batch = random_batch(fields, seed=step)
            y = (torch.arange(len(batch)) % 3 == 0).float()  # unbalanced: no gradient near 0, which Adam would blow up
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(batch), y).backward()
            opt.step()
        models.append(model)
    for (key, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    for table in models[0].embeddings():
        assert (table.weight.detach()[table.pad_row] == 0).all()


def test_an_unknown_lookup_is_refused():
    emb, _ = both_lookups(LAYOUTS["sum"])
    emb.lookup = "bag"
    with pytest.raises(ValueError, match="lookup: expected auto or compact or gather"):
        emb(random_batch(LAYOUTS["sum"]))


def test_tables_of_one_layout_share_one_lookup_plan_per_batch():
    """FM's first-order table and its factors derive the valid positions and distinct values
    once per batch (Batch.memo()); a new Batch starts afresh, so no plan outlives its ids."""
    fields = LAYOUTS["mixed"]
    model = build_model(ModelConfig(name="fm", embedding_dim=4), CARDS, fields)
    batch = random_batch(fields)
    model(batch)
    assert len(batch.memo()) == 1
    plan = next(iter(batch.memo().values()))
    assert len(plan[0]) == int(((batch.seq != 0) | model.embedding.seq_first).sum())  # the valid positions
    other = random_batch(fields, seed=5)
    assert other.memo() == {}
    torch.testing.assert_close(model(other), model(random_batch(fields, seed=5)))  # a fresh plan, same scores


def test_auto_is_compact_in_training_and_gather_when_scoring(monkeypatch):
    fields = LAYOUTS["mixed"]
    emb = FieldEmbedding(CARDS, 4, multi_valued=fields)
    assert emb.lookup == "auto"
    called = []
    for name in ("_compact_lookup", "_gather_lookup"):
        real = getattr(emb, name)
        monkeypatch.setattr(emb, name, lambda ids, batch, real=real, name=name: called.append(name) or real(ids, batch))
    batch = random_batch(fields)
    emb(batch)
    with torch.no_grad():
        emb(batch)
    assert called == ["_compact_lookup", "_gather_lookup"]
