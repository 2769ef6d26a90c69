"""MaskNet against the paper's model section (Eqs. 4-17): instance-guided mask, layer
normalization, MaskBlock, SerMaskNet and ParaMaskNet.

The reference below is written from the paper, in float64 NumPy, and reads only the
module's weights (by parameter name). It does not call any masknet layer.

    V_emb        = concat(e_1..e_f)                                 Eq. 4
    V_mask       = W_d2 ReLU(W_d1 V_emb + b_d1) + b_d2             Eq. 5   (always from the RAW V_emb)
    LN(x)        = g ⊙ (x - mean) / std + b                         Eq. 7-8 (std with the usual eps=1e-5)
    LN_EMB       = concat(LN_1(e_1), ..., LN_f(e_f))                Eq. 9   (one LN per field)
    block on EMB : ReLU(LN(W_i (V_mask ⊙ LN_EMB(V_emb))))           Eq. 11-12
    block on MB  : ReLU(LN(W_i (V_mask ⊙ V_output^p)))              Eq. 13-14
    ParaMaskNet  : concat blocks (Eq. 15), ReLU FFNs (Eq. 16)
    prediction   : w_0 + Σ w_i x_i                                  Eq. 17 (logit)
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from masknet.config import ModelConfig
from masknet.models import build_model
from masknet.models.layers import FieldLayerNorm

CARDS = [5, 7, 4]
K = 3
Q = 6
R = 2.0
TOP = [5, 4]
LN_EPS = 1e-5

SWITCHES = ("use_mask", "emb_layernorm", "block_layernorm", "block_ffn")
COMBOS = list(itertools.product([True, False], repeat=4))


def tiny_cfg(name: str, **over) -> ModelConfig:
    base = dict(name=name, embedding_dim=K, num_blocks=2, block_dim=Q, reduction_ratio=R, top_mlp=list(TOP))
    base.update(over)
    return ModelConfig(**base)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter a distinct, O(1) random value (default inits hide mistakes:
    LN gains of 1, biases of 0, embeddings of 1e-4)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name == "embedding.weight":
                p.copy_(noise)
            else:
                p.copy_(0.5 * noise)


def all_indices(cards, batch=8, seed=1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = np.stack([rng.integers(0, c, size=batch) for c in cards], axis=1)
    x[0] = 0
    x[1] = np.asarray(cards) - 1  # both ends of every field's range
    return torch.from_numpy(x).long()


# ---------------------------------------------------------------------------
# Independent NumPy reference (float64)


def np_params(model) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def np_relu(v):
    return np.maximum(v, 0.0)


def np_ln(v, g, b):
    mu = v.mean(axis=-1, keepdims=True)
    var = ((v - mu) ** 2).mean(axis=-1, keepdims=True)
    return g * (v - mu) / np.sqrt(var + LN_EPS) + b


def np_v_emb(P, cards, x):
    """Eq. 4. The tables are stored one after another: field i's rows start at Σ_{j<i} card_j."""
    starts = np.concatenate([[0], np.cumsum(cards)[:-1]])
    rows = P["embedding.weight"][x + starts]  # [B, f, k]
    return rows.reshape(len(x), -1)


def np_mask(P, i, v_emb):
    """Eq. 5 for block i."""
    pre = f"blocks.{i}.mask."
    hidden = np_relu(v_emb @ P[pre + "aggregation.weight"].T + P[pre + "aggregation.bias"])
    return hidden @ P[pre + "projection.weight"].T + P[pre + "projection.bias"]


def np_ln_emb(P, i, v, f, k):
    """Eq. 9: one LayerNorm per field, each with its own gain and bias [f, k]."""
    pre = f"blocks.{i}.emb_norm."
    e = v.reshape(len(v), f, k)
    out = np.empty_like(e)
    for j in range(f):
        out[:, j] = np_ln(e[:, j], P[pre + "weight"][j], P[pre + "bias"][j])
    return out.reshape(len(v), f * k)


def np_block(P, cfg, i, v_emb, v_in, on_embedding, f):
    if on_embedding and cfg.emb_layernorm:
        v_in = np_ln_emb(P, i, v_in, f, cfg.embedding_dim)
    mask = np_mask(P, i, v_emb) if cfg.use_mask else None
    h = mask * v_in if cfg.use_mask else v_in  # Eq. 6 / 11 / 13
    if cfg.block_ffn:
        pre = f"blocks.{i}."
        h = h @ P[pre + "hidden.weight"].T
        if cfg.block_layernorm:  # Eq. 10: LN before ReLU
            h = np_ln(h, P[pre + "hidden_norm.weight"], P[pre + "hidden_norm.bias"])
        else:
            h = h + P[pre + "hidden.bias"]
        h = np_relu(h)
    return h, mask


def np_forward(model, cfg, cards, x):
    P = np_params(model)
    x = x.numpy()
    f = len(cards)
    v_emb = np_v_emb(P, cards, x)
    masks = []
    if cfg.name == "sermasknet":
        h = v_emb
        for i in range(cfg.num_blocks):
            h, m = np_block(P, cfg, i, v_emb, h, on_embedding=(i == 0), f=f)
            masks.append(m)
    else:
        outs = []
        for i in range(cfg.num_blocks):
            o, m = np_block(P, cfg, i, v_emb, v_emb, on_embedding=True, f=f)
            outs.append(o)
            masks.append(m)
        h = np.concatenate(outs, axis=1)  # Eq. 15
        top = sorted(
            int(m.group(1)) for k in P if (m := re.fullmatch(r"top\.(\d+)\.weight", k))
        )
        assert len(top) == len(cfg.top_mlp)
        for j in top:  # Eq. 16
            h = np_relu(h @ P[f"top.{j}.weight"].T + P[f"top.{j}.bias"])
    logit = h @ P["prediction.weight"].T + P["prediction.bias"]  # Eq. 17
    return logit[:, 0], [m for m in masks if m is not None]


def assert_close(actual, expected, rtol=1e-5):
    actual = np.asarray(actual, dtype=np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------
# 1. Forward pass = Eqs. 4-17, every ablation combination, both models


@pytest.mark.parametrize("name", ["sermasknet", "paramasknet"])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(f"{s}={int(v)}" for s, v in zip(SWITCHES, c)))
def test_forward_matches_paper_equations(name, combo):
    cfg = tiny_cfg(name, **dict(zip(SWITCHES, combo)))
    torch.manual_seed(0)
    model = build_model(cfg, CARDS).eval()
    randomize(model)
    x = all_indices(CARDS)

    expected_logits, expected_masks = np_forward(model, cfg, CARDS, x)
    with torch.no_grad():
        logits = model(x)
        logits2, masks = model(x, return_masks=True)

    assert logits.shape == (len(x),)
    assert np.abs(expected_logits).max() > 1e-3  # the reference is not trivially zero
    assert_close(logits.numpy(), expected_logits)
    assert_close(logits2.numpy(), expected_logits)
    assert len(masks) == (cfg.num_blocks if cfg.use_mask else 0)
    for got, want in zip(masks, expected_masks):
        assert got.shape == want.shape
        assert_close(got.numpy(), want)


@pytest.mark.parametrize("name", ["sermasknet", "paramasknet"])
def test_forward_matches_in_float64(name):
    """Same check with the module in float64: agreement to ~1e-10, not just float32 noise."""
    cfg = tiny_cfg(name, num_blocks=3)
    model = build_model(cfg, CARDS).double().eval()
    randomize(model, seed=3)
    x = all_indices(CARDS, batch=16, seed=4)
    expected, masks_np = np_forward(model, cfg, CARDS, x)
    with torch.no_grad():
        got, masks = model(x, return_masks=True)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)
    for a, b in zip(masks, masks_np, strict=True):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-10, atol=1e-10)


def test_mask_has_no_output_activation():
    """Eq. 5 has no activation on the projection: mask values can be negative."""
    model = build_model(tiny_cfg("sermasknet"), CARDS).eval()
    randomize(model)
    with torch.no_grad():
        _, masks = model(all_indices(CARDS, batch=32), return_masks=True)
    assert all((m < 0).any() and (m > 0).any() for m in masks)


def test_parallel_blocks_are_independent():
    """Each parallel block has its own weights and all of them reach the output
    (a known bug elsewhere used only the first block)."""
    cfg = tiny_cfg("paramasknet", num_blocks=3)
    model = build_model(cfg, CARDS).eval()
    randomize(model)
    x = all_indices(CARDS)
    with torch.no_grad():
        base = model(x).clone()
        for i in range(3):
            saved = model.blocks[i].hidden.weight.clone()
            model.blocks[i].hidden.weight.mul_(-1.5)
            assert not torch.allclose(model(x), base), f"block {i} does not reach the output"
            model.blocks[i].hidden.weight.copy_(saved)
    ptrs = {model.blocks[i].mask.aggregation.weight.data_ptr() for i in range(3)}
    assert len(ptrs) == 3


# ---------------------------------------------------------------------------
# 2. Per-field LayerNorm is per field


def test_field_layernorm_is_per_field_direct():
    f, k = 4, 5
    ln = FieldLayerNorm(f, k)
    with torch.no_grad():
        ln.weight.copy_(torch.arange(1, f * k + 1, dtype=torch.float32).view(f, k) / 7)
        ln.bias.copy_(-torch.arange(f * k, dtype=torch.float32).view(f, k) / 3)
    x = torch.randn(6, f, k, generator=torch.Generator().manual_seed(0)) * 3 + 1
    y = ln(x).detach()

    # each field: its own mean/std and its own gain/bias
    P = {"w": ln.weight.detach().double().numpy(), "b": ln.bias.detach().double().numpy()}
    xn = x.double().numpy()
    for j in range(f):
        assert_close(y[:, j].numpy(), np_ln(xn[:, j], P["w"][j], P["b"][j]))

    # changing field 2 changes field 2 only
    x2 = x.clone()
    x2[:, 2] = x2[:, 2] * 10 + 4 + torch.randn(6, k)
    y2 = ln(x2).detach()
    for j in range(f):
        if j == 2:
            assert not torch.allclose(y2[:, j], y[:, j], atol=1e-3)
        else:
            torch.testing.assert_close(y2[:, j], y[:, j], rtol=0, atol=0)

    # and it is not one joint LayerNorm over all f*k values
    joint = torch.nn.functional.layer_norm(x.view(6, -1), (f * k,)).view(6, f, k) * ln.weight + ln.bias
    assert not torch.allclose(joint, y, atol=1e-3)


@pytest.mark.parametrize("name", ["sermasknet", "paramasknet"])
def test_model_embedding_layernorm_is_per_field(name):
    model = build_model(tiny_cfg(name), CARDS).eval()
    randomize(model)
    norm = model.blocks[0].emb_norm
    assert isinstance(norm, FieldLayerNorm)
    assert tuple(norm.weight.shape) == (len(CARDS), K) and tuple(norm.bias.shape) == (len(CARDS), K)
    # the gains and biases of different fields are different parameters (randomized apart)
    assert not torch.allclose(norm.weight[0], norm.weight[1])

    seen = []
    handle = norm.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    x = all_indices(CARDS)
    x2 = x.clone()
    x2[:, 1] = (x2[:, 1] + 1) % CARDS[1]  # a different row for field 1 only
    with torch.no_grad():
        model(x)
        model(x2)
    handle.remove()
    a, b = seen
    assert a.shape == (len(x), len(CARDS), K)
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(a[:, 2], b[:, 2], rtol=0, atol=0)
    assert not torch.allclose(a[:, 1], b[:, 1], atol=1e-4)
    # undo each field's own affine: zero mean, unit std per field
    z = (a - norm.bias) / norm.weight
    torch.testing.assert_close(z.mean(-1), torch.zeros(len(x), len(CARDS)), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(len(x), len(CARDS)), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------
# 3. The mask reads the raw, un-normalized embedding


def test_mask_is_computed_from_raw_embedding():
    cfg = tiny_cfg("sermasknet", num_blocks=2, emb_layernorm=True)
    model = build_model(cfg, CARDS).eval()
    randomize(model)
    # known embeddings, deliberately far from normalized (offset and scale per field)
    with torch.no_grad():
        w = torch.arange(sum(CARDS) * K, dtype=torch.float32).view(-1, K)
        model.embedding.weight.copy_(0.05 * w + 0.3 * torch.sin(w))
    x = all_indices(CARDS)
    P = np_params(model)
    v_raw = np_v_emb(P, CARDS, x.numpy())
    v_norm = np_ln_emb(P, 0, v_raw, len(CARDS), K)
    assert np.abs(v_raw - v_norm).max() > 0.5

    with torch.no_grad():
        _, masks = model(x, return_masks=True)
    for i in (0, 1):  # block 1 (on the embedding, emb LN on) and block 2 (on block 1)
        blk = model.blocks[i].mask
        W1, b1 = blk.aggregation.weight.double().detach().numpy(), blk.aggregation.bias.double().detach().numpy()
        W2, b2 = blk.projection.weight.double().detach().numpy(), blk.projection.bias.double().detach().numpy()
        from_raw = np_relu(v_raw @ W1.T + b1) @ W2.T + b2
        from_norm = np_relu(v_norm @ W1.T + b1) @ W2.T + b2
        assert_close(masks[i].numpy(), from_raw)
        assert np.abs(masks[i].numpy() - from_norm).max() > 1e-2, f"block {i + 1} mask matches the normalized input"


def test_serial_later_block_mask_ignores_previous_block_output():
    """Block 2's mask depends on V_emb only: changing block 1's weights leaves it unchanged."""
    model = build_model(tiny_cfg("sermasknet", num_blocks=3), CARDS).eval()
    randomize(model)
    x = all_indices(CARDS)
    with torch.no_grad():
        logits_before, before = model(x, return_masks=True)
        model.blocks[0].hidden.weight.mul_(3.0)
        model.blocks[0].hidden_norm.bias.add_(1.0)
        logits_after, after = model(x, return_masks=True)
    # the change reaches the output (through block 1's output, block 2's input), not the masks
    assert (logits_after - logits_before).abs().max() > 1e-3
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert before[1].shape == (len(x), Q) and before[0].shape == (len(x), len(CARDS) * K)


# ---------------------------------------------------------------------------
# 4. Parameter counts in closed form


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def t_of(r, z):
    return max(1, int(round(r * z)))


def mask_params(m, z, r):
    t = t_of(r, z)
    return m * t + t + t * z + z


def ffn_params(q, n, block_ln):
    return q * n + (2 * q if block_ln else q)  # LN gain+bias replace the bias of W_i


def expected_count(cfg: ModelConfig, cards) -> int:
    f, k, q, r = len(cards), cfg.embedding_dim, cfg.block_dim, cfg.reduction_ratio
    m = f * k
    total = sum(cards) * k  # embeddings
    if cfg.name == "sermasknet":
        n = m
        for i in range(cfg.num_blocks):
            if i == 0 and cfg.emb_layernorm:
                total += 2 * f * k
            if cfg.use_mask:
                total += mask_params(m, n, r)
            if cfg.block_ffn:
                total += ffn_params(q, n, cfg.block_layernorm)
                n = q
        return total + n + 1
    # paramasknet
    for _ in range(cfg.num_blocks):
        if cfg.emb_layernorm:
            total += 2 * f * k
        if cfg.use_mask:
            total += mask_params(m, m, r)
        if cfg.block_ffn:
            total += ffn_params(q, m, cfg.block_layernorm)
    width = cfg.num_blocks * (q if cfg.block_ffn else m)
    for h in cfg.top_mlp:
        total += width * h + h
        width = h
    return total + width + 1


PAPER_CARDS = [int(c) for c in np.random.default_rng(0).integers(2, 60, size=39)]


def paper_cfg(name, **over):
    return ModelConfig(name=name, **over)  # defaults: k=10, 3 blocks, q=400, r=2, top 3x400


@pytest.mark.parametrize("name", ["sermasknet", "paramasknet"])
@pytest.mark.parametrize("switch", (None,) + SWITCHES)
def test_parameter_count_closed_form(name, switch):
    over = {switch: False} if switch else {}
    cfg = paper_cfg(name, **over)
    assert cfg.embedding_dim == 10 and cfg.num_blocks == 3 and cfg.reduction_ratio == 2
    model = build_model(cfg, PAPER_CARDS)
    assert count(model) == expected_count(cfg, PAPER_CARDS)


def test_parameter_count_paper_serial_by_hand():
    """The formula written out once with numbers: f=39, k=10, m=390, q=400, r=2."""
    cards = PAPER_CARDS
    m, q = 390, 400
    emb = sum(cards) * 10
    ln_emb = 2 * 39 * 10
    mask1 = m * 780 + 780 + 780 * m + m  # z = m, t = 2m
    mask23 = m * 800 + 800 + 800 * q + q  # z = q, t = 2q
    ffn1 = q * m + 2 * q
    ffn23 = q * q + 2 * q
    pred = q + 1
    model = build_model(paper_cfg("sermasknet"), cards)
    assert count(model) == emb + ln_emb + mask1 + 2 * mask23 + ffn1 + 2 * ffn23 + pred


@pytest.mark.parametrize("name", ["sermasknet", "paramasknet"])
def test_each_ablation_removes_exactly_its_part(name):
    cards, f, k, q, u, r = PAPER_CARDS, 39, 10, 400, 3, 2.0
    m = f * k
    full = build_model(paper_cfg(name), cards)
    full_names = [n for n, _ in full.named_parameters()]
    ser = name == "sermasknet"

    # without mask: every block's mask (serial: first on m, then on q)
    ab = build_model(paper_cfg(name, use_mask=False), cards)
    masks = mask_params(m, m, r) + (u - 1) * (mask_params(m, q, r) if ser else mask_params(m, m, r))
    assert count(full) - count(ab) == masks
    assert not any(".mask." in n for n, _ in ab.named_parameters())
    assert all(b.mask is None for b in ab.blocks)
    assert sum(".mask." in n for n in full_names) == 4 * u

    # without embedding LayerNorm: 2fk per block on the embedding
    ab = build_model(paper_cfg(name, emb_layernorm=False), cards)
    assert count(full) - count(ab) == (1 if ser else u) * 2 * f * k
    assert not any("emb_norm" in n for n, _ in ab.named_parameters())
    assert all(b.emb_norm is None for b in ab.blocks)
    assert sum("emb_norm" in n for n in full_names) == 2 * (1 if ser else u)

    # without block LayerNorm: the LN (2q) goes, W_i gets its bias back (q)
    ab = build_model(paper_cfg(name, block_layernorm=False), cards)
    assert count(full) - count(ab) == u * (2 * q - q)
    assert not any("hidden_norm" in n for n, _ in ab.named_parameters())
    assert all(b.hidden.bias is not None for b in ab.blocks)
    assert all(b.hidden.bias is None for b in full.blocks)

    # without block FFN: no W_i, no LN; widths downstream change accordingly
    ab = build_model(paper_cfg(name, block_ffn=False), cards)
    assert not any(("hidden" in n) for n, _ in ab.named_parameters())
    if ser:
        # masks of blocks 2..u now act on width m; prediction reads m
        part = ffn_params(q, m, True) + (u - 1) * ffn_params(q, q, True)
        width_change = (u - 1) * (mask_params(m, q, r) - mask_params(m, m, r)) + (q - m)
        assert count(full) - count(ab) == part + width_change
    else:
        part = u * ffn_params(q, m, True)
        top_change = (u * q - u * m) * 400  # first top layer reads u*m instead of u*q
        assert count(full) - count(ab) == part + top_change


# ---------------------------------------------------------------------------
# 5. Reduction ratio is relative to the masked width z


@pytest.mark.parametrize("r", [0.5, 3.0, 2.0, 1.0])
def test_reduction_ratio_relative_to_masked_width(r):
    cards, k, q = [5, 7, 4, 9], 5, 8  # m = 20 != q = 8: the two readings differ
    m = len(cards) * k
    ser = build_model(ModelConfig(name="sermasknet", embedding_dim=k, num_blocks=3, block_dim=q, reduction_ratio=r), cards)
    widths = [(b.mask.aggregation.out_features, b.mask.projection.out_features, b.mask.aggregation.in_features) for b in ser.blocks]
    assert widths[0] == (round(r * m), m, m)
    for t, z, inp in widths[1:]:
        assert (t, z, inp) == (round(r * q), q, m)
        assert t / z == pytest.approx(r)  # t / z, not t / (mask input width m)
    par = build_model(ModelConfig(name="paramasknet", embedding_dim=k, num_blocks=2, block_dim=q, reduction_ratio=r, top_mlp=[4]), cards)
    for b in par.blocks:
        assert (b.mask.aggregation.out_features, b.mask.projection.out_features) == (round(r * m), m)
