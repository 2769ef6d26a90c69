"""Layers shared by every model: field embeddings, per-field LayerNorm, MLP, and `dense`,
the call every model makes to run an nn.Linear.

Shapes: B = batch, f = number of fields, k = embedding size.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------
# Dense layers on the fastest fp32 GEMM (docs/performance.md, "GEMM kernels")
#
# PyTorch runs an fp32 nn.Linear on the CPU through MKL's sgemm. On this project's AMD EPYC
# (AVX-512) MKL takes its AVX2 code path and reaches ~100 GFLOP/s per core at the models'
# shapes, while oneDNN's AVX-512 kernels (the same library PyTorch uses for bf16) reach ~225
# (~1.15x MKL with oneDNN limited to AVX2). So the models run their linear layers through
# oneDNN (`torch.ops.mkldnn._linear_pointwise`, the op Inductor emits for CPU linears), with a
# hand-written backward whose three products are oneDNN calls too. Same arithmetic, another
# summation order: outputs agree with MKL's to float32 rounding (~1e-6 relative).
# MASKNET_GEMM=torch (or set_gemm_backend("torch")) returns to plain nn.Linear.

_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_backend: Optional[str] = None


def set_gemm_backend(name: Optional[str]) -> None:
    """'onednn', 'torch', or None (the default: MASKNET_GEMM, else oneDNN where PyTorch has it)."""
    global _backend
    if name not in (None, "onednn", "torch"):
        raise ValueError(f"GEMM backend must be 'onednn' or 'torch', got {name!r}")
    _backend = name


@contextlib.contextmanager
def using_gemm_backend(name: Optional[str]) -> Iterator[None]:
    """set_gemm_backend(name) for the duration of a with block (benchmarks, FLOP counting)."""
    global _backend
    saved = _backend
    set_gemm_backend(name)
    try:
        yield
    finally:
        _backend = saved


def gemm_backend() -> str:
    """The kernel fp32 CPU linear layers run on: 'onednn' or 'torch' (MKL)."""
    name = _backend or os.environ.get("MASKNET_GEMM", "").strip().lower() or "auto"
    if name not in ("auto", "onednn", "torch"):
        raise ValueError(f"MASKNET_GEMM must be 'onednn' or 'torch', got {name!r}")
    available = _ONEDNN_LINEAR is not None and torch.backends.mkldnn.is_available()
    return "onednn" if name != "torch" and available else "torch"


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 on the CPU, outside autocast (bf16 already runs on oneDNN) and outside tracing
    (ONNX export and torch.compile see plain aten.linear)."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing() and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling() and gemm_backend() == "onednn"
    )


def _onednn(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """x @ w.T (+ b) (then ReLU, fused into the GEMM's output pass); any strides."""
    return _ONEDNN_LINEAR(x, w, b, "relu" if relu else "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b (ReLU optional) on 2-D x [B, in], W [out, in]. Backward, all on oneDNN:

        dX = dY W           [B, out] @ [out, in]   (W is read as is: no copy)
        dW = dY^T X         [out, B] @ [B, in]     (transposed views: written in W's layout)
           = (X^T dY)^T     when out >= 1.5 in: oneDNN's faster layout for wide layers (below)
        db = Σ_rows dY
    with dY masked by y > 0 first when the ReLU is fused.

    Where a layer widens (out >= 1.5 in: the masks' aggregation layers, 390 -> 780/800), oneDNN
    runs dW as X^T dY (X copied to [in, B], the result transposed back into W's layout)
    1.1-1.2x faster than as dY^T X, copies included; elsewhere dY^T X is as fast or faster
    (benchmarks/backward_layouts.py, docs/performance.md).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, relu: bool):
        y = _onednn(x, weight, bias, relu)
        ctx.relu, ctx.has_bias = relu, bias is not None
        ctx.save_for_backward(x, weight, y if relu else None)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, y = ctx.saved_tensors
        if ctx.relu:
            gy = torch.ops.aten.threshold_backward(gy, y, 0)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = _onednn(gy, weight.t()) if need_x else None
        gw = _weight_grad(gy, x) if need_w else None
        gb = gy.sum(0) if need_b and ctx.has_bias else None
        return gx, gw, gb, None


def weight_grad_as_xt_dy(in_features: int, out_features: int) -> bool:
    """Whether dW runs as (X^T dY)^T rather than dY^T X: for widening layers (_OneDnnLinear)."""
    return out_features >= 1.5 * in_features  # near-square layers: a wash, so the copy-free layout


def _weight_grad(gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dY^T X [out, in], contiguous, in the faster of the two layouts (see _OneDnnLinear)."""
    if weight_grad_as_xt_dy(x.shape[1], gy.shape[1]):
        return _onednn(x.t().contiguous(), gy.t()).t().contiguous()
    return _onednn(gy.t(), x.t())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """x @ weight.T (+ bias) (then ReLU), on oneDNN where that applies. x: [..., in], weight: [out, in]."""
    if not _onednn_applies(x, weight):
        y = F.linear(x, weight, bias)
        return torch.relu(y) if relu else y
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _onednn(x, weight, bias, relu)  # prediction: no autograd node
    lead = x.shape[:-1]
    y = _OneDnnLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, relu)
    return y.view(*lead, y.shape[-1])


def dense(layer: nn.Module, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """`layer(x)` (then ReLU) for an nn.Linear `layer`, through `linear`.

    Any other module (a quantized Linear after quantize_dynamic, say) runs `layer(x)` itself,
    so swapping or wrapping the module keeps working."""
    if type(layer) is not nn.Linear:
        y = layer(x)
        return torch.relu(y) if relu else y
    return linear(x, layer.weight, layer.bias, relu)


class FieldEmbedding(nn.Embedding):
    """One embedding table of size k per field (Eq. 4), stored as one concatenated table.

    Field i's rows live at `offsets[i] : offsets[i] + cardinalities[i]`, so a whole
    batch is looked up with a single gather; this is the same parameter set as f
    separate tables.

    x: LongTensor [B, f] of per-field indices, 0 <= x[:, i] < cardinalities[i]
    returns: [B, f, k]

    With `sparse = True` the backward pass yields a sparse gradient holding only the rows
    the batch looked up (the trainer sets it and pairs it with a sparse optimizer). It is
    an `nn.Embedding` so that DistributedDataParallel knows to expect sparse gradients.
    """

    def __init__(self, cardinalities: Sequence[int], dim: int, init_std: float = 1e-4):
        if not cardinalities or min(cardinalities) <= 0:
            raise ValueError(f"cardinalities must be positive, got {list(cardinalities)}")
        rows = sum(int(c) for c in cardinalities)
        super().__init__(rows, dim, _weight=torch.empty(rows, dim))  # initialised once, below
        self.cardinalities = [int(c) for c in cardinalities]
        self.num_fields = len(self.cardinalities)
        self.dim = dim
        offsets = torch.tensor([0] + self.cardinalities[:-1], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        # Small normal init as in FuxiCTR/DeepCTR (std 1e-4); the paper does not state one.
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x + self.offsets, self.weight, sparse=self.sparse)  # [B, f, k]


class FieldLayerNorm(nn.Module):
    """LN_EMB (Eq. 9): a separate LayerNorm on each field's embedding.

    Each field is normalized over its own k values and has its own gain and bias,
    so a change in field j's embedding never changes field i's output.

    x: [B, f, k] -> [B, f, k]

    The normalization (x - mean) / std has no parameters, so several LN_EMBs over the same x
    (ParaMaskNet's blocks) can share it: `normalize(x)` once, then each module's
    `forward(x, normed)` applies only its own gain and bias (the same function, computed once).
    """

    def __init__(self, num_fields: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(num_fields, dim))
        self.bias = nn.Parameter(torch.zeros(num_fields, dim))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / sqrt(var + eps) per field, over its own k values (static k: exportable)."""
        return F.layer_norm(x, (self.dim,), eps=self.eps)

    def forward(self, x: torch.Tensor, normed: Optional[torch.Tensor] = None) -> torch.Tensor:
        normed = self.normalize(x) if normed is None else normed
        return torch.addcmul(self.bias, normed, self.weight)  # gain * normed + bias, one pass


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) for each hidden width. [B, in] -> [B, widths[-1]].

    forward runs each Linear with its ReLU through `dense` (one fused GEMM + ReLU); the
    modules stay an nn.Sequential of Linear, ReLU (, Dropout) for state dicts and quantization."""

    def __init__(self, input_dim: int, widths: Sequence[int], dropout: float = 0.0):
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Linear(input_dim, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            input_dim = width
        super().__init__(*layers)
        self.output_dim = input_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mods = list(self)
        i = 0
        while i < len(mods):
            if i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU):
                h, i = dense(mods[i], h, relu=True), i + 2
            else:
                h, i = mods[i](h), i + 1
        return h
