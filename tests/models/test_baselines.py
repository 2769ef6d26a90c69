"""The paper's baselines (docs/baselines.md): each defining computation against an independent one,
parameter counts against the closed forms of the original papers, and a smoke-train of every model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from masknet.config import ModelConfig
from masknet.errors import ConfigError
from masknet.models import REGISTRY, build_model
from masknet.models.autoint import AutoInt, InteractingLayer
from masknet.models.dcn import CrossLayer, CrossLayerV2
from masknet.models.fm import FM, fm_pairwise
from masknet.models.xdeepfm import CIN, CINLayer

BASELINES = ("lr", "fm", "dnn", "deepfm", "dcn", "dcnv2", "xdeepfm", "autoint")
CARDS = [5, 7, 3, 4, 6]  # f = 5 tiny fields


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: a second intra-op thread only adds synchronisation (and the machine is shared).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(name: str, **overrides) -> ModelConfig:
    cfg = ModelConfig(
        name=name, embedding_dim=4, dnn_hidden=[16, 8], cross_layers=2, cin_layers=[6, 5],
        attention_layers=2, attention_heads=2, attention_dim=3,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


def random_x(n: int, cards=CARDS, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, c, (n,), generator=g) for c in cards], dim=1)


def test_registry_names():
    assert set(BASELINES) <= set(REGISTRY)


# --- FM -----------------------------------------------------------------------------------


def test_fm_pairwise_equals_double_loop():
    e = torch.randn(3, 6, 4, dtype=torch.float64)
    brute = torch.zeros(3, dtype=torch.float64)
    for i, j in itertools.combinations(range(6), 2):  # every field pair once, i < j
        brute += (e[:, i] * e[:, j]).sum(dim=1)
    torch.testing.assert_close(fm_pairwise(e), brute)


def test_fm_logit_is_bias_plus_first_order_plus_pairs():
    model = FM(CARDS, tiny_cfg("fm")).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    x = random_x(4)
    w = model.linear.weights.weight[:, 0]  # flat table of first-order weights
    V = model.embedding.weight  # flat table of factor vectors
    offsets = np.cumsum([0] + CARDS[:-1])
    for b in range(4):
        rows = [offsets[i] + int(x[b, i]) for i in range(len(CARDS))]
        expected = model.linear.bias[0] + w[rows].sum()
        expected = expected + sum(V[r] @ V[s] for r, s in itertools.combinations(rows, 2))
        torch.testing.assert_close(model(x[b : b + 1])[0], expected)


# --- DCN / DCN-V2 -------------------------------------------------------------------------


def test_cross_layer_hand_example():
    layer = CrossLayer(3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1], [0.2], [0.3]]))
        layer.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    x0 = torch.tensor([[1.0, 2.0, 3.0]])
    xl = torch.tensor([[0.5, -1.0, 2.0]])
    # x_l · w = 0.05 - 0.2 + 0.6 = 0.45;  x0 * 0.45 = [0.45, 0.9, 1.35];  + b + x_l:
    torch.testing.assert_close(layer(x0, xl), torch.tensor([[1.95, -0.1, 2.35]]))


def test_cross_layer_v2_hand_example():
    layer = CrossLayerV2(2)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.linear.bias.copy_(torch.tensor([0.5, -0.5]))
    x0 = torch.tensor([[1.0, 2.0]])
    xl = torch.tensor([[1.0, -1.0]])
    # W x_l + b = [1 - 2 + 0.5, 3 - 4 - 0.5] = [-0.5, -1.5];  x0 ⊙ that = [-0.5, -3];  + x_l:
    torch.testing.assert_close(layer(x0, xl), torch.tensor([[0.5, -4.0]]))


# --- xDeepFM ------------------------------------------------------------------------------


def test_cin_layer_matches_numpy_einsum():
    rng = np.random.default_rng(0)
    B, H, f, k, H_out = 2, 3, 4, 5, 2
    x_prev, x0 = rng.normal(size=(B, H, k)), rng.normal(size=(B, f, k))
    layer = CINLayer(H, f, H_out).double()
    W = layer.weight.detach().numpy()  # [H_out, H, f]
    # Eq. 6: X^l_{h,d} = Σ_i Σ_j W^{l,h}_{ij} X^{l-1}_{i,d} X^0_{j,d}
    expected = np.einsum("hij,bid,bjd->bhd", W, x_prev, x0)
    got = layer(torch.from_numpy(x_prev), torch.from_numpy(x0)).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_cin_direct_connections_sum_pool_every_layer():
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=(2, 4, 3))
    cin = CIN(4, [3, 2]).double()
    W1, W2 = (layer.weight.detach().numpy() for layer in cin.layers)
    X1 = np.einsum("hij,bid,bjd->bhd", W1, x0, x0)
    X2 = np.einsum("hij,bid,bjd->bhd", W2, X1, x0)
    expected = np.concatenate([X1.sum(axis=2), X2.sum(axis=2)], axis=1)  # p⁺ = [p^1, p^2]
    np.testing.assert_allclose(cin(torch.from_numpy(x0)).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_xdeepfm_needs_a_cin_layer():
    with pytest.raises(ConfigError, match="model.cin_layers"):
        build_model(tiny_cfg("xdeepfm", cin_layers=[]), CARDS)


# --- AutoInt ------------------------------------------------------------------------------


def test_autoint_attention_rows_sum_to_one_and_shapes():
    cfg = tiny_cfg("autoint", attention_layers=3, attention_heads=2, attention_dim=3)
    model = AutoInt(CARDS, cfg)
    with torch.no_grad():
        model.embedding.weight.normal_()  # non-uniform attention
    logits, attentions = model(random_x(7), return_attention=True)
    assert logits.shape == (7,)
    assert len(attentions) == 3
    for a in attentions:
        assert a.shape == (7, 2, len(CARDS), len(CARDS))  # [B, H, f (query), f (key)]
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(dim=-1), torch.ones(7, 2, len(CARDS)))
    assert model.output.in_features == len(CARDS) * 2 * 3  # flatten f x (H d')


def test_interacting_layer_matches_numpy():
    rng = np.random.default_rng(2)
    B, f, d, H, dh = 2, 4, 3, 2, 5
    e = rng.normal(size=(B, f, d))
    layer = InteractingLayer(d, H, dh, residual=True).double()
    Wq, Wk, Wv, Wr = (lin.weight.detach().numpy().T for lin in (layer.query, layer.key, layer.value, layer.residual))
    heads, alphas = [], []
    for h in range(H):
        cols = slice(h * dh, (h + 1) * dh)
        q, k, v = e @ Wq[:, cols], e @ Wk[:, cols], e @ Wv[:, cols]  # [B, f, d']
        s = np.einsum("bmd,bjd->bmj", q, k)  # <W_Q e_m, W_K e_j>
        a = np.exp(s - s.max(axis=-1, keepdims=True))
        a /= a.sum(axis=-1, keepdims=True)
        alphas.append(a)
        heads.append(np.einsum("bmj,bjd->bmd", a, v))
    expected = np.maximum(np.concatenate(heads, axis=-1) + e @ Wr, 0.0)  # ReLU(ẽ ⊕ heads + W_res e)
    out, attention = layer(torch.from_numpy(e))
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(attention.detach().numpy(), np.stack(alphas, axis=1), rtol=1e-10, atol=1e-12)


# --- parameter counts (closed forms from the papers) ---------------------------------------


def mlp_params(input_dim: int, widths: list[int]) -> int:
    """Fully connected ReLU layers: Σ_l (in_l * out_l + out_l)."""
    dims = [input_dim, *widths]
    return sum(dims[i] * dims[i + 1] + dims[i + 1] for i in range(len(widths)))


def expected_params(cfg: ModelConfig) -> int:
    V, f, k = sum(CARDS), len(CARDS), cfg.embedding_dim
    m, h = f * k, cfg.dnn_hidden
    first_order = V + 1  # w_0 + one weight per category
    emb = V * k
    dnn = mlp_params(m, h)
    if cfg.name == "lr":
        return first_order
    if cfg.name == "fm":
        return first_order + emb
    if cfg.name == "dnn":
        return emb + dnn + h[-1] + 1
    if cfg.name == "deepfm":  # one global bias: the DNN output unit has none
        return first_order + emb + dnn + h[-1]
    if cfg.name == "dcn":  # per cross layer w_l, b_l ∈ R^m; output reads [x_L ; h_L]
        return emb + cfg.cross_layers * 2 * m + dnn + (m + h[-1] + 1)
    if cfg.name == "dcnv2":  # per cross layer W_l ∈ R^{m×m}, b_l ∈ R^m
        return emb + cfg.cross_layers * (m * m + m) + dnn + (m + h[-1] + 1)
    if cfg.name == "xdeepfm":  # CIN filters W^{l,h} ∈ R^{H_{l-1}×f}, H_0 = f; output weights over Σ H_l
        maps = [f, *cfg.cin_layers]
        cin = sum(maps[l] * maps[l + 1] * f for l in range(len(cfg.cin_layers))) + sum(cfg.cin_layers)
        return first_order + emb + cin + dnn + h[-1]
    if cfg.name == "autoint":  # W_Q, W_K, W_V, W_Res ∈ R^{H d' × d_in} per layer; d_in = k, then H d'
        width = cfg.attention_heads * cfg.attention_dim
        per_proj = 4 if cfg.attention_residual else 3
        attn = sum(per_proj * (k if l == 0 else width) * width for l in range(cfg.attention_layers))
        return emb + attn + f * width + 1
    raise AssertionError(cfg.name)


@pytest.mark.parametrize("name", BASELINES)
def test_parameter_count_matches_closed_form(name):
    cfg = tiny_cfg(name)
    model = build_model(cfg, CARDS)
    assert sum(p.numel() for p in model.parameters()) == expected_params(cfg)


def test_parameter_count_at_paper_sizes():
    # Defaults: k = 10, DNN 3 x 400, 3 cross layers, CIN 3 x 200, AutoInt 3 layers x 2 heads x 32.
    for name in ("dcn", "dcnv2", "xdeepfm", "autoint"):
        cfg = ModelConfig(name=name)
        assert sum(p.numel() for p in build_model(cfg, CARDS).parameters()) == expected_params(cfg)
    cfg = ModelConfig(name="autoint", attention_residual=False)
    assert sum(p.numel() for p in build_model(cfg, CARDS).parameters()) == expected_params(cfg)


# --- every model: shape, finiteness, gradients, training ------------------------------------


@pytest.mark.parametrize("name", BASELINES)
def test_forward_shape_finite_and_gradients_flow(name):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(name), CARDS)
    x = random_x(16)
    logits = model(x)
    assert logits.shape == (16,) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    F.binary_cross_entropy_with_logits(logits, torch.rand(16).round()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", BASELINES)
def test_trains_on_tiny_batch(name):
    torch.manual_seed(0)
    cards = [4, 4, 3, 5]
    x = random_x(256, cards, seed=3)
    # Label = an interaction of fields 0 and 1 plus a main effect of field 2: every model can fit
    # the main effect, the interaction models the rest.
    y = (((x[:, 0] + x[:, 1]) % 2 == 0) | (x[:, 2] == 0)).float()
    model = build_model(tiny_cfg(name), cards)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    with torch.no_grad():
        start = F.binary_cross_entropy_with_logits(model(x), y).item()
    for _ in range(40):
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = F.binary_cross_entropy_with_logits(model(x), y).item()
    assert end < 0.8 * start, f"{name}: loss {start:.4f} -> {end:.4f}"


@pytest.mark.parametrize("name", ["fm", "dcn", "dcnv2", "xdeepfm", "autoint"])
def test_dense_l2_sees_every_interaction_weight(name):
    # The dense L2 term (train.l2_dense) reads CTRModel.dense_weights(): every weight of the
    # interaction part (cross w_l / W_l, CIN filters, W_Q/W_K/W_V/W_Res) must be in it.
    model = build_model(tiny_cfg(name), CARDS)
    dense = {id(p) for p in model.dense_weights()}
    parts = {"dcn": "cross", "dcnv2": "cross", "xdeepfm": "cin", "autoint": "layers"}
    for pname, p in model.named_parameters():
        if name in parts and pname.startswith(parts[name] + ".") and not pname.endswith("bias"):
            assert id(p) in dense, pname
    assert not any(id(e.weight) in dense for e in model.embeddings())


@pytest.mark.parametrize("name", ["dnn", "deepfm", "dcn", "dcnv2", "xdeepfm"])
def test_dropout_in_dnn_parts(name):
    model = build_model(tiny_cfg(name, dropout=0.5), CARDS)
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    model_no = build_model(tiny_cfg(name, dropout=0.0), CARDS)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model_no.modules())


# --- LR and FM against a standard solver (issue 16) ---------------------------------------


def planted_linear(n: int = 8000, seed: int = 0, cards=(8, 30, 100, 400, 2000, 5000), scale: float = 0.6, pair: float = 0.0):
    """A logistic model on Zipf-distributed categorical fields (many rare categories, as in CTR
    logs): logit = -1 + Σ_f w_f[x_f] (+ pair · u[x_0] v[x_1]), w ~ N(0, scale²), u, v ~ N(0, 1).
    Split 70 / 15 / 15."""
    from masknet.data.dataset import CTRDataset, Split

    rng = np.random.default_rng(seed)
    cols, logit = [], np.full(n, -1.0)
    for c in cards:
        p = 1.0 / np.arange(1, c + 1) ** 1.1
        x = rng.choice(c, size=n, p=p / p.sum())
        logit += rng.normal(0, scale, size=c)[x]
        cols.append(x)
    logit += pair * rng.normal(size=cards[0])[cols[0]] * rng.normal(size=cards[1])[cols[1]]
    x = np.stack(cols, 1).astype(np.int32)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.uint8)
    a, b = int(n * 0.7), int(n * 0.85)
    splits = {"train": Split(x[:a], y[:a]), "valid": Split(x[a:b], y[a:b]), "test": Split(x[b:], y[b:])}
    return CTRDataset([f"f{i}" for i in range(len(cards))], list(cards), splits)


def sklearn_lr_test_auc(data) -> float:
    """scikit-learn LogisticRegression on one-hot of the same fields, C chosen on the valid split."""
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    offsets = np.concatenate([[0], np.cumsum(data.cardinalities)[:-1]])

    def one_hot(x):
        cols = (np.asarray(x, dtype=np.int64) + offsets).ravel()
        rows = np.repeat(np.arange(len(x)), x.shape[1])
        return sparse.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(x), int(sum(data.cardinalities))))

    xs = {s: one_hot(v.x) for s, v in data.splits.items()}
    ys = {s: np.asarray(v.y) for s, v in data.splits.items()}
    fits = [LogisticRegression(C=c, max_iter=2000).fit(xs["train"], ys["train"]) for c in (0.01, 0.03, 0.1, 0.3, 1, 3, 10)]
    best = max(fits, key=lambda m: roc_auc_score(ys["valid"], m.decision_function(xs["valid"])))
    return roc_auc_score(ys["test"], best.decision_function(xs["test"]))


def default_test_auc(name: str, data, **train) -> float:
    from masknet.config import TrainConfig
    from masknet.training.trainer import evaluate, fit, seed_everything

    seed_everything(1)
    model = build_model(ModelConfig(name=name), data.cardinalities)
    fit(model, data, TrainConfig(threads=1, progress=False, **train))
    return evaluate(model, data.splits["test"])["auc"]


@pytest.mark.parametrize("seed", [0, 1])
def test_lr_with_defaults_reaches_scikit_learn_on_a_planted_problem(seed):
    """`--model lr` with its defaults (lr 1e-2, an L2-prior path, validation on a step schedule)
    within 0.005 test AUC of scikit-learn's LogisticRegression with C tuned on validation. The
    paper's protocol (one validation per epoch, patience 1, lr 1e-3, no L2) falls far short: the
    defaults are what closes the gap."""
    from masknet.config import PAPER_PROTOCOL

    data = planted_linear(seed=seed)
    reference = sklearn_lr_test_auc(data)
    assert default_test_auc("lr", data) > reference - 0.005  # reaches it (early stopping can do better)
    paper = {k.split(".", 1)[1]: v for k, v in PAPER_PROTOCOL.items()}
    assert default_test_auc("lr", data, **paper) < reference - 0.02


def default_aucs(name: str, data, **train) -> tuple[float, float]:
    """(best validation AUC, test AUC) of `name` trained with its defaults."""
    from masknet.config import TrainConfig
    from masknet.training.trainer import evaluate, fit, seed_everything

    seed_everything(1)
    model = build_model(ModelConfig(name=name), data.cardinalities)
    result = fit(model, data, TrainConfig(threads=1, progress=False, **train))
    return result.best_valid["auc"], evaluate(model, data.splits["test"])["auc"]


@pytest.mark.parametrize("seed", [0, 1])
def test_fm_with_defaults_is_at_least_lr_on_a_linear_truth(seed):
    """FM contains LR (factors at zero), and its default fit is LR's run first (training.factor_phase):
    on a purely linear truth it keeps up with LR, on validation by construction. One phase with
    the prior path on every table (the defaults before) fell 0.0125 short on seed 0."""
    data = planted_linear(seed=seed)
    lr_valid, lr_test = default_aucs("lr", data)
    fm_valid, fm_test = default_aucs("fm", data)
    assert fm_valid >= lr_valid  # phase 1 is LR's run, and the best evaluation of either phase is kept
    assert fm_test > lr_test - 0.003


def test_fm_with_defaults_finds_a_planted_interaction_lr_cannot():
    """With one pairwise interaction in the truth, FM with its defaults beats LR and the tuned
    scikit-learn LR (the interaction is all FM adds); with the paper's protocol it does not."""
    from masknet.config import PAPER_PROTOCOL

    data = planted_linear(seed=2, pair=1.5)
    reference = sklearn_lr_test_auc(data)
    fm_test = default_test_auc("fm", data)
    assert fm_test > reference + 0.01 and fm_test > default_aucs("lr", data)[1] + 0.01
    paper = {k.split(".", 1)[1]: v for k, v in PAPER_PROTOCOL.items()}
    assert default_test_auc("fm", data, **paper) < reference


def _small_deep_aucs(data, linear_term: bool, name: str = "sermasknet") -> tuple[float, float]:
    """(best validation AUC, test AUC) with the default training of a small deep model: a one-block
    SerMaskNet with the small-data dropout, or a DeepFM of one 64-wide layer, fitted LR first or not."""
    from masknet.config import TrainConfig
    from masknet.training.trainer import evaluate, fit, seed_everything

    seed_everything(1)
    size = {"dropout": 0.3, "num_blocks": 1, "block_dim": 64} if name == "sermasknet" else {"dnn_hidden": [64]}
    model = build_model(ModelConfig(name=name, linear_term=linear_term, **size), data.cardinalities)
    result = fit(model, data, TrainConfig(threads=1, progress=False))
    return result.best_valid["auc"], evaluate(model, data.splits["test"])["auc"]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_masknet_fitted_lr_first_keeps_up_with_lr_on_a_linear_truth(seed):
    """The small-data default (model.linear_term, training.factor_phase): the MaskNet fits its
    first-order term as LR's run first, then the deep part joins from a zero prediction layer.
    On a purely linear truth it keeps up with `--model lr`; without the term it falls behind
    (measured: 0.015-0.024 test AUC on these two seeds)."""
    data = planted_linear(seed=seed)
    lr_valid, lr_test = default_aucs("lr", data)
    first_valid, first_test = _small_deep_aucs(data, linear_term=True)
    plain_test = _small_deep_aucs(data, linear_term=False)[1]
    assert first_valid > lr_valid - 0.003  # its phase 1 is LR's run (in the MaskNet's smaller batches)
    assert first_test > lr_test - 0.005
    assert plain_test < first_test - 0.01


@pytest.mark.parametrize("seed", [0, 1])
def test_a_deepfm_fitted_lr_first_keeps_up_with_lr_on_a_linear_truth(seed):
    """DeepFM's small-data default: its first-order part fitted first as LR's run (embedding and tower
    output at zero), then the shared embedding and the tower join. On a linear truth it keeps up
    with `--model lr` on validation and test (measured, seeds 0 / 1: valid 0.7194 / 0.7524, test
    0.7572 / 0.7417, against LR's valid 0.7168 / 0.7533, test 0.7588 / 0.7409). Plain DeepFM is about
    as good here (test 0.7564 / 0.7418): the rule's gains were on the selection draws, so no gap is asserted."""
    data = planted_linear(seed=seed)
    lr_valid, lr_test = default_aucs("lr", data)
    first_valid, first_test = _small_deep_aucs(data, linear_term=True, name="deepfm")
    assert first_valid > lr_valid - 0.003
    assert first_test > lr_test - 0.005
