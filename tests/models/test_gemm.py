"""The fast paths are the same function: every model's linear layers on oneDNN (models.layers.dense)
against PyTorch's own nn.Linear, ParaMaskNet's shared LN_EMB normalization, the embedding tables'
LazyAdam against torch.optim.SparseAdam, and the allocator setting that keeps freed memory."""

from __future__ import annotations

import copy
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from masknet.bench.flops import counted_flops_per_sample
from masknet.bench.matmul import Roofline, record_products
from masknet.bench.runner import QUICK_MODEL
from masknet.config import ModelConfig
from masknet.registry import model_names
from masknet.models import build_model
from masknet.models import layers
from masknet.models.layers import MLP, dense, gemm_backend, onednn_available, using_gemm_backend
from masknet.training.embedding_update import LazyAdam

from model_helpers import random_model

CARDS = [5, 7, 4, 9, 3]
needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN linear op")


def small_model(name: str, seed: int = 0):
    return random_model(ModelConfig(name=name, **QUICK_MODEL), CARDS, seed, scale=0.3)


def rows(n: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, c, (n,), generator=g) for c in CARDS], dim=1)


def forward_backward(model, x, backend):
    model.zero_grad(set_to_none=True)
    with using_gemm_backend(backend):
        logits = model(x)
        (logits * torch.linspace(-1, 1, len(x))).sum().backward()
    grads = {n: p.grad.to_dense() if p.grad.is_sparse else p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def kernels_of(model, x) -> set[str]:
    return {p.kernel for p in record_products(lambda: model(x).sum().backward())}


@needs_onednn
@pytest.mark.parametrize("name", model_names())
def test_onednn_path_equals_torch_path(name):
    """Logits and every gradient agree to float32 rounding; models with matmuls do run on oneDNN."""
    model = small_model(name)
    x = rows()
    ref_logits, ref_grads = forward_backward(model, x, "torch")
    logits, grads = forward_backward(model, x, "onednn")
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        scale = max(1.0, ref_grads[n].abs().max().item())
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-5 * scale, msg=n)
    with using_gemm_backend("onednn"):
        kernels = kernels_of(model, x)
    if counted_flops_per_sample(model, CARDS, batch=8).forward > 0 and name != "fm":
        assert "onednn" in kernels, f"{name} runs no linear layer on oneDNN"
    with using_gemm_backend("torch"):
        assert "onednn" not in kernels_of(model, x)


@needs_onednn
@pytest.mark.parametrize("name", ["sermasknet", "paramasknet", "deepfm"])
def test_hybrid_trains_on_mkl_and_predicts_on_onednn(name):
    """'hybrid' (the default on Intel CPUs): autograd's products are MKL's, prediction's oneDNN's,
    and logits and gradients are nn.Linear's (to float32 rounding: MKL may run a product on fewer
    threads when the machine is busy, another summation order)."""
    model = small_model(name)
    x = rows()
    ref_logits, ref_grads = forward_backward(model, x, "torch")
    logits, grads = forward_backward(model, x, "hybrid")
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)  # training's forward: the same kernels
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        scale = max(1.0, ref_grads[n].abs().max().item())
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-6 * scale, msg=n)
    with using_gemm_backend("hybrid"):
        assert kernels_of(model, x) == {"mkl"}
        with torch.no_grad():
            predicted = {p.kernel for p in record_products(lambda: model(x))}
            torch.testing.assert_close(model(x), ref_logits, rtol=1e-5, atol=1e-5)
    assert predicted == {"onednn"}


@needs_onednn
@pytest.mark.parametrize("backend", ["onednn", "hybrid"])
@pytest.mark.parametrize("case", ["bias-only", "3-d", "no-bias", "double-backward"])
def test_linear_gradients_match_f_linear(backend, case):
    """layers.linear with ReLU: the gradients of F.linear + ReLU in every autograd case, including
    a bias that alone needs a gradient (no silent prediction path) and a 3-D input (F.linear's view)."""
    from masknet.models.layers import linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 6, generator=g) if case == "3-d" else torch.randn(9, 6, generator=g)
    w, b = torch.randn(5, 6, generator=g), torch.randn(5, generator=g)
    w.requires_grad_(case != "bias-only")
    x.requires_grad_(case != "bias-only")
    b.requires_grad_(True)
    bias = None if case == "no-bias" else b
    leaves = [t for t in (x, w, bias) if t is not None and t.requires_grad]

    def grads(f):
        y = f()
        first = torch.autograd.grad((y * y).sum(), leaves, create_graph=case == "double-backward")
        if case != "double-backward":
            return first
        return torch.autograd.grad(sum(t.sum() for t in first), [x, w])

    ref = grads(lambda: torch.relu(F.linear(x, w, bias)))
    with using_gemm_backend(backend):
        if case == "double-backward" and backend == "onednn":  # its hand-written backward: once differentiable
            with pytest.raises(RuntimeError):  # not a silently wrong second derivative
                grads(lambda: linear(x, w, bias, relu=True))
            return
        got = grads(lambda: linear(x, w, bias, relu=True))
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vendor,expected", [("GenuineIntel", "hybrid"), ("AuthenticAMD", "onednn"), ("", "onednn")])
def test_auto_backend_follows_the_cpu_vendor(monkeypatch, vendor, expected):
    monkeypatch.delenv("MASKNET_GEMM", raising=False)
    monkeypatch.setattr(layers, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    layers.auto_gemm_backend.cache_clear()
    try:
        assert layers.auto_gemm_backend() == expected
        assert gemm_backend() == (expected if onednn_available() else "torch")
        monkeypatch.setenv("MASKNET_GEMM", "torch")
        assert gemm_backend() == "torch"  # the variable overrides the vendor rule
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        layers.auto_gemm_backend.cache_clear()
        assert layers.auto_gemm_backend() == "onednn"  # Intel without AVX-512: not measured, the old default
    finally:
        layers.auto_gemm_backend.cache_clear()


def test_cpu_vendor_reads_proc_cpuinfo():
    vendor = layers.cpu_vendor()
    assert isinstance(vendor, str)
    if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64"):
        assert vendor, "no vendor_id line in /proc/cpuinfo"


@needs_onednn
@pytest.mark.parametrize("fin,fout", [(13, 29), (29, 13), (16, 16)])  # widening (X^T dY), narrowing, square
def test_weight_gradient_in_either_layout_is_dy_t_x(fin, fout):
    from masknet.models.layers import _weight_grad, weight_grad_as_xt_dy

    g = torch.Generator().manual_seed(0)
    gy, x = torch.randn(37, fout, generator=g), torch.randn(37, fin, generator=g)
    gw = _weight_grad(gy, x)
    assert weight_grad_as_xt_dy(fin, fout) == (fout >= 1.5 * fin)
    assert gw.shape == (fout, fin) and gw.is_contiguous()  # W's layout: no copy at accumulation
    torch.testing.assert_close(gw, gy.t() @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["onednn", "hybrid"])
def test_dense_falls_back_where_onednn_does_not_apply(backend):
    model = small_model("sermasknet").double()
    x = rows()
    with using_gemm_backend(backend):
        assert kernels_of(model, x) == {"mkl"}  # float64: PyTorch's own kernels
        m32 = small_model("sermasknet")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert "onednn" not in kernels_of(m32, x)  # autocast: bf16 aten ops, as before
    # a quantized MLP keeps working: dense calls the module itself
    from torch.ao.quantization import quantize_dynamic

    mlp = MLP(6, [5, 4]).eval()
    q = quantize_dynamic(mlp, {torch.nn.Linear}, dtype=torch.qint8)
    h = torch.randn(8, 6)
    with torch.no_grad():
        torch.testing.assert_close(q(h), mlp(h), rtol=0.1, atol=0.05)
        assert not isinstance(q[0], torch.nn.Linear) or type(q[0]) is not torch.nn.Linear
    relu_out = dense(q[0], h, relu=True)
    assert (relu_out >= 0).all()


def test_backend_setting_is_validated(monkeypatch):
    with pytest.raises(ValueError, match="onednn"):
        with using_gemm_backend("mkl"):
            pass
    monkeypatch.setenv("MASKNET_GEMM", "torch")
    assert gemm_backend() == "torch"
    monkeypatch.setenv("MASKNET_GEMM", "fast")
    with pytest.raises(ValueError, match="MASKNET_GEMM"):
        gemm_backend()


class _CountLayerNorms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.native_layer_norm.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_paramasknet_normalizes_the_embedding_once(monkeypatch):
    """u blocks on the embedding: one per-field normalization, u block LayerNorms (was 2u)."""
    import masknet.models.layers as layers

    model = small_model("paramasknet")
    u = model.cfg.num_blocks
    field_norms = []
    plain = layers.field_normalize
    monkeypatch.setattr(layers, "field_normalize", lambda x, k, eps=1e-5: field_norms.append(x.shape) or plain(x, k, eps))
    with torch.no_grad(), _CountLayerNorms() as counter:
        model(rows())
    assert len(field_norms) == 1 and counter.calls == u  # the block LayerNorms; LN_EMB's is the GEMV form
    # and each block still applies its own gain and bias (Eq. 9 per block)
    x = rows()
    with torch.no_grad():
        base = model(x).clone()
        model.blocks[1].emb_norm.bias.add_(0.5)
        assert not torch.allclose(model(x), base)


def test_lazy_adam_is_sparse_adam():
    """Same updates (to float32 rounding of the duplicate-row sums) and interchangeable state."""
    rows_, k = 300, 4
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(rows_, k, generator=g)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    sa, la = torch.optim.SparseAdam([a], lr=1e-2), LazyAdam([b], lr=1e-2)
    untouched = torch.ones(rows_, dtype=torch.bool)
    for step in range(25):
        idx = torch.randint(0, rows_ // (1 + step % 3), (200,), generator=g)  # duplicates, a shifting subset
        untouched[idx] = False
        grad = torch.sparse_coo_tensor(idx[None], torch.randn(200, k, generator=g), (rows_, k))
        a.grad, b.grad = grad, grad.clone()
        sa.step()
        la.step()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(la.state[b][key], sa.state[a][key], rtol=1e-5, atol=1e-7)
    assert torch.equal(b[untouched], w0[untouched])  # rows never looked up never move
    # a SparseAdam checkpoint continues in LazyAdam (and back): same keys, same step count
    assert la.state_dict()["param_groups"][0].keys() == sa.state_dict()["param_groups"][0].keys()
    c = torch.nn.Parameter(a.detach().clone())
    lc = LazyAdam([c], lr=1e-2)
    lc.load_state_dict(copy.deepcopy(sa.state_dict()))  # a checkpoint: its own tensors
    grad = torch.sparse_coo_tensor(torch.tensor([[3, 3, 7]]), torch.ones(3, k), (rows_, k))
    a.grad, c.grad = grad, grad.clone()
    sa.step()
    lc.step()
    assert lc.state[c]["step"] == sa.state[a]["step"] == 26
    torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-7)


def test_lazy_adam_refuses_dense_gradients():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="sparse"):
        LazyAdam([p]).step()


_FAULTS = """
import resource, sys, torch
from masknet.config import ModelConfig, TrainConfig
from masknet.models import build_model
from masknet.training.memory import keep_freed_memory
from masknet.training.trainer import Optimizer, train_step
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
cards = [50] * 39
model = build_model(ModelConfig(name="sermasknet"), cards)  # the paper's widths, small tables
cfg = TrainConfig()
opt = Optimizer(model, cfg)
x = torch.stack([torch.randint(0, c, (1024,)) for c in cards], dim=1)
y = (torch.rand(1024) < 0.3).float()
for _ in range(12):  # the heap grows to its steady size first
    train_step(model, opt, x, y, cfg)
windows = []
for _ in range(4):  # faults per step in 4 windows of 5 steps
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        train_step(model, opt, x, y, cfg)
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
print(" ".join(map(str, windows)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_of_training_steps():
    """Minor page faults per training step (paper-size SerMaskNet, batch 1024), without and with."""
    windows = {mode: [float(v) for v in subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                                                     check=True).stdout.split()] for mode in ("default", "keep")}
    # glibc hands the step's large blocks back and the next steps fault them in (the mean over the 20
    # steps); with the setting a steady window has (almost) none: the smallest window of "keep", as
    # MKL's GEMMs (the 'hybrid' backend) now and then allocate a new buffer in one window
    faults = {"default": sum(windows["default"]) / len(windows["default"]), "keep": min(windows["keep"])}
    assert faults["default"] > 200, windows
    assert faults["keep"] < faults["default"] / 5, windows


def test_recorded_products_are_the_counted_flops():
    """The roofline replays exactly the step's matmul FLOPs, on either kernel."""
    model = small_model("sermasknet")
    x = rows(32)
    flops = counted_flops_per_sample(model, CARDS, batch=32)
    for backend in layers.GEMM_BACKENDS if onednn_available() else ("torch",):
        with using_gemm_backend(backend):
            products = record_products(lambda: model(x).sum().backward())
        roof = Roofline(products, torch.float32)
        assert roof.step_flops == pytest.approx(flops.train * len(x))
    roof.choose(rounds=1, min_seconds=0.0005)
    rates = roof.replay(rounds=1, min_seconds=0.0005)
    assert rates["best"] >= rates["step"] > 0 and rates["best"] >= rates["best_mkl"] > 0
    assert all(entry["best"] for entry in roof.layouts())


@needs_onednn
@pytest.mark.parametrize("name, multitask", [("sermasknet", "mmoe"), ("paramasknet", "shared_bottom"), ("dcnv2", "mmoe")])
def test_multitask_and_multivalued_models_run_every_linear_on_onednn(name, multitask):
    """The merge of gemm with multi-task heads and multi-valued fields: MMoE gates, the towers'
    output units and the bodies all go through layers.dense (no product left on MKL's nn.Linear),
    and the function is the same as on PyTorch's nn.Linear."""
    from masknet.bench.flops import random_batch
    from masknet.data.batch import MultiValuedField

    multi = [MultiValuedField("tags", 11, 3, "mean")]
    cfg = ModelConfig(name=name, multitask=multitask, num_experts=2, tower_hidden=[8], **QUICK_MODEL)
    torch.manual_seed(0)
    model = build_model(cfg, CARDS, multi, tasks=["click", "buy"])
    x = random_batch(CARDS, multi, 32, torch.Generator().manual_seed(2))
    with using_gemm_backend("onednn"):
        kernels = [p.kernel for p in record_products(lambda: model(x).sum().backward())]
    model.zero_grad(set_to_none=True)
    assert kernels and set(kernels) == {"onednn"}, kernels
    with torch.no_grad(), using_gemm_backend("torch"):
        ref = model(x)
    with torch.no_grad(), using_gemm_backend("onednn"):
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# LN_EMB's normalization in GEMV form


def test_field_normalize_is_layer_norm():
    """layers.field_normalize = F.layer_norm without gain and bias, to float32 rounding, in its
    GEMV form at prediction; training (autograd) and non-contiguous input run F.layer_norm itself."""
    from masknet.models.layers import field_normalize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 7, 10, generator=g) * 3 + 1
    ref = torch.nn.functional.layer_norm(x, (10,))
    with torch.no_grad():
        ours = field_normalize(x, 10)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6)
    assert not torch.equal(ours, ref)  # the GEMV form ran (another rounding)
    xg = x.clone().requires_grad_()
    assert torch.equal(field_normalize(xg, 10), ref)  # training: aten's LayerNorm, bit for bit
    t = x.transpose(0, 1)  # not contiguous
    with torch.no_grad():
        assert torch.equal(field_normalize(t, 10), torch.nn.functional.layer_norm(t, (10,)))
