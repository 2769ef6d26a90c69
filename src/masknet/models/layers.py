"""Layers shared by every model: field embeddings, per-field LayerNorm, MLP, and `dense`,
the call every model makes to run an nn.Linear.

Shapes: B = batch, f = number of fields, k = embedding size.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batch import Batch, MultiValuedField


LOOKUPS = ("auto", "compact", "gather")


# ---------------------------------------------------------------------------
# Dense layers on the fastest fp32 GEMM (docs/performance.md, "GEMM kernels")
#
# PyTorch runs an fp32 nn.Linear on the CPU through MKL's sgemm. MKL takes its AVX-512 code
# path on Intel CPUs only: on an AMD EPYC with AVX-512 it reaches ~100 GFLOP/s per core at the
# models' shapes, while oneDNN's AVX-512 kernels (the same library PyTorch uses for bf16) reach
# ~225. So there the models run their linear layers through oneDNN
# (`torch.ops.mkldnn._linear_pointwise`, the op Inductor emits for CPU linears), with a
# hand-written backward whose three products are oneDNN calls too ('onednn'). On Intel MKL trains
# faster, and prediction stays on oneDNN ('hybrid'; `auto_gemm_backend`). Same arithmetic, another
# summation order: outputs agree with MKL's to float32 rounding (~1e-6 relative).
# MASKNET_GEMM=torch|hybrid|onednn (or set_gemm_backend) overrides the choice.

_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_backend: Optional[str] = None


GEMM_BACKENDS = ("onednn", "hybrid", "torch")


def set_gemm_backend(name: Optional[str]) -> None:
    """'onednn', 'hybrid', 'torch', or None (the default: MASKNET_GEMM, else `auto_gemm_backend`)."""
    global _backend
    if name not in (None, *GEMM_BACKENDS):
        raise ValueError(f"GEMM backend must be one of {', '.join(GEMM_BACKENDS)}, got {name!r}")
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
    """The kernels fp32 CPU linear layers run on: 'onednn' (training and prediction), 'hybrid'
    (training on MKL, i.e. nn.Linear's forward and autograd's backward; prediction on oneDNN)
    or 'torch' (nn.Linear: MKL both ways)."""
    name = _backend or os.environ.get("MASKNET_GEMM", "").strip().lower() or "auto"
    if name not in ("auto", *GEMM_BACKENDS):
        raise ValueError(f"MASKNET_GEMM must be one of auto, {', '.join(GEMM_BACKENDS)}, got {name!r}")
    if not onednn_available():
        return "torch"
    return auto_gemm_backend() if name == "auto" else name


def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's linear op (otherwise every backend is 'torch')."""
    return _ONEDNN_LINEAR is not None and torch.backends.mkldnn.is_available()


def cpu_vendor() -> str:
    """The CPU's vendor string ('GenuineIntel', 'AuthenticAMD', ...) from /proc/cpuinfo, or ''."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=1)
def auto_gemm_backend() -> str:
    """The default backend where PyTorch has oneDNN (docs/performance.md, "GEMM kernels by CPU").

    MKL picks its AVX-512 code path on Intel CPUs only: there it trains faster than oneDNN (the
    products at the step's shapes 1.1-2x, the step 1.19-1.25x, 2 threads, Intel Xeon with
    AVX-512), while prediction on oneDNN (ReLU fused into the GEMM, no autograd) is as fast at
    batch 1024 (within the noise) and 1.07-1.10x faster at 8192: so 'hybrid' on Intel. Elsewhere (AMD EPYC with
    AVX-512: MKL on its AVX2 path, 2.2x slower than oneDNN) 'onednn' both ways, as on Intel CPUs
    without AVX-512 (not measured). torch.compile keeps its own choice (`set_compile_gemm`)."""
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")  # the measured case; AVX2-only Intel: unmeasured
    return "hybrid" if cpu_vendor() == "GenuineIntel" and avx512 else "onednn"


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, backend: str) -> bool:
    """fp32 on the CPU, outside autocast (bf16 already runs on oneDNN) and outside tracing
    (ONNX export sees plain aten.linear; torch.compile: `_compiled_linear`)."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing() and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling() and backend != "torch"
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
    @torch.autograd.function.once_differentiable  # oneDNN's ops have no autograd: a 2nd derivative raises, never silently wrong
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


# ---------------------------------------------------------------------------
# The same layer as an opaque custom op, for torch.compile (benchmarks/compile_step.py): Inductor
# then fuses the elementwise work between the linear layers and leaves each GEMM (forward and the
# three backward products) on oneDNN, in the layouts above. "aten" hands it plain aten.linear
# instead (Inductor's own choice of GEMM: MKL for fp32 training on the CPU).

_compile_gemm = "onednn"


def set_compile_gemm(name: str) -> None:
    """What a torch.compile'd model's linear layers become: 'onednn' (the custom ops) or 'aten'."""
    global _compile_gemm
    if name not in ("onednn", "aten"):
        raise ValueError(f"compile GEMM must be 'onednn' or 'aten', got {name!r}")
    _compile_gemm = name


@torch.library.custom_op("masknet::onednn_linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    return _onednn(x, weight, bias, relu)


@_linear_op.register_fake
def _(x, weight, bias, relu):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("masknet::onednn_linear_backward", mutates_args=())
def _linear_backward_op(
    gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: Optional[torch.Tensor], has_bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if y is not None:
        gy = torch.ops.aten.threshold_backward(gy, y, 0)
    gb = gy.sum(0) if has_bias else gy.new_zeros(0)
    return _onednn(gy, weight.t()), _weight_grad(gy, x), gb


@_linear_backward_op.register_fake
def _(gy, x, weight, y, has_bias):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), gy.new_empty(gy.shape[1] if has_bias else 0)


def _linear_op_setup(ctx, inputs, output):
    x, weight, bias, relu = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, output if relu else None)


def _linear_op_backward(ctx, gy):
    x, weight, y = ctx.saved_tensors
    gx, gw, gb = _linear_backward_op(gy, x, weight, y, ctx.has_bias)
    return gx, gw, gb if ctx.has_bias else None, None


_linear_op.register_autograd(_linear_op_backward, setup_context=_linear_op_setup)


def _compiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """`linear` while torch.compile traces: the custom op (set_compile_gemm("onednn"), where
    PyTorch has oneDNN: MASKNET_GEMM is not read here, as Dynamo would break the graph on it)
    or aten.linear. Only checks Dynamo can guard on, so the graph does not break."""
    if _compile_gemm == "onednn" and _ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32 \
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return _linear_op(x.reshape(-1, x.shape[-1]), weight, bias, relu).view(*x.shape[:-1], weight.shape[0])
    y = F.linear(x, weight, bias)
    return torch.relu(y) if relu else y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """x @ weight.T (+ bias) (then ReLU), on oneDNN where that applies. x: [..., in], weight: [out, in]."""
    if torch.compiler.is_compiling():
        return _compiled_linear(x, weight, bias, relu)
    backend = gemm_backend()  # once per call: it reads MASKNET_GEMM
    if not _onednn_applies(x, weight, backend):
        y = F.linear(x, weight, bias)
        return torch.relu(y) if relu else y
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if not (torch.is_grad_enabled() and needs_grad):
        return _onednn(x, weight, bias, relu)  # prediction: no autograd node
    if backend == "hybrid":  # training on MKL (nn.Linear's kernels and autograd's backward)
        y = F.linear(x, weight, bias)
        if not relu:
            return y
        # in place where y is addmm's own output (its backward keeps the inputs, not y); a view
        # (F.linear's output for [.., in] input of 3+ dimensions) out of place, so autograd need not rewrite it
        return torch.relu_(y) if y._base is None else torch.relu(y)
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


def _field_normalize_gemv(x2: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over each row of x2 [N, k]. The row means are products with a vector of 1/k (one GEMV, aten.mv, over all N rows: not a
    matrix product, so neither the FLOP count nor the roofline of bench/ counts it)."""
    col = x2.new_full((x2.shape[1],), 1.0 / x2.shape[1])
    mean = x2.mv(col).unsqueeze(1)
    d = x2 - mean
    rstd = torch.rsqrt((d * d).mv(col).unsqueeze(1) + eps)
    return d.mul_(rstd)


def field_normalize(x: torch.Tensor, k: int, eps: float = 1e-5) -> torch.Tensor:
    """F.layer_norm(x, (k,), eps) without gain and bias, over the last dimension k of x [..., k]
    (k a Python int, static for ONNX export: x.shape[-1] would be traced as a tensor).

    At prediction (no autograd) in GEMV form (_field_normalize_gemv): aten's LayerNorm loops
    over rows, slow on LN_EMB's short rows (k = 10, B·f = 40k rows a batch), and the GEMV form
    takes 0.45x its time (1 thread, docs/performance.md), the same function up to float rounding
    (~7e-7). Training keeps F.layer_norm: the GEMV form's rounding moved a same-seed test AUC by
    -0.0037 (past the 0.003 tolerance) for ~0.5% of a step. Tracing (ONNX export), torch.compile,
    autocast and other devices or dtypes use F.layer_norm too."""
    fast = (
        not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
        and not torch.jit.is_tracing() and not torch.jit.is_scripting() and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
    )
    if not fast:
        return F.layer_norm(x, (k,), eps=eps)
    return _field_normalize_gemv(x.reshape(-1, k), eps).view(x.shape)


class FieldEmbedding(nn.Embedding):
    """One embedding table of size k per field (Eq. 4), stored as one concatenated table.

    Field i's rows live at `offsets[i] : offsets[i] + cardinalities[i]`, so a whole
    batch is looked up with a single gather; this is the same parameter set as f
    separate tables.

    x: LongTensor [B, f] of per-field indices, 0 <= x[:, i] < cardinalities[i], or a `Batch`
    returns: [B, f, k]

    Multi-valued fields (`multi_valued`, data.batch.MultiValuedField) get their rows after the
    single-valued ones and are pooled to one embedding each (`pool_multi_valued`), appended
    after the single-valued fields: the output is [B, f_s + f_m, k], so every model sees f
    fields whatever their kind.

    With `sparse = True` the backward pass yields a sparse gradient holding only the rows
    the batch looked up (the trainer sets it and pairs it with a sparse optimizer). It is
    an `nn.Embedding` so that DistributedDataParallel knows to expect sparse gradients.

    `lookup` picks how multi-valued fields are looked up: "compact" (only the values that
    count, each distinct one once, pooled by segment; dynamic shapes: the cheaper one to
    train), "gather" (every padded position, static shapes: what ONNX export selects and
    tracing always uses; at no-grad scoring of up to a few hundred rows the faster one), or
    "auto" (the default): compact while autograd records, gather otherwise, so training gets
    the cheap sparse gradient and PyTorch scoring computes exactly what the ONNX graph does.
    Both give the same outputs and gradients up to float rounding (tests/models/test_pooled_lookup.py).
    """

    lookup = "auto"

    def __init__(
        self, cardinalities: Sequence[int], dim: int, init_std: float = 1e-4, multi_valued: Sequence[MultiValuedField] = ()
    ):
        if not cardinalities or min(cardinalities) <= 0:
            raise ValueError(f"cardinalities must be positive, got {list(cardinalities)}")
        multi = tuple(multi_valued)
        single_rows = sum(int(c) for c in cardinalities)
        # multi-valued tables, then one all-zero padding row (never updated: padding_idx)
        rows = single_rows + (sum(m.cardinality for m in multi) + 1 if multi else 0)
        super().__init__(rows, dim, _weight=torch.empty(rows, dim))  # initialised once, below
        self.cardinalities = [int(c) for c in cardinalities]
        self.multi_valued = multi
        self.num_fields = len(self.cardinalities) + len(multi)
        self.dim = dim
        offsets = torch.tensor([0] + self.cardinalities[:-1], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        # Small normal init as in FuxiCTR/DeepCTR (std 1e-4); the paper does not state one.
        nn.init.normal_(self.weight, std=init_std)
        if multi:
            self._init_multi_valued(single_rows)

    def _init_multi_valued(self, single_rows: int) -> None:
        self.pad_row = self.num_embeddings - 1
        with torch.no_grad():
            self.weight[self.pad_row].zero_()
        starts = torch.tensor([0] + [m.cardinality for m in self.multi_valued[:-1]], dtype=torch.long).cumsum(0) + single_rows
        widths = torch.tensor([m.max_len for m in self.multi_valued])
        # per seq column: its field's first table row, whether it is the field's first column
        self.register_buffer("seq_offsets", torch.repeat_interleave(starts, widths), persistent=False)
        first = torch.zeros(int(widths.sum()), dtype=torch.bool)
        first[torch.cat([torch.zeros(1, dtype=torch.long), widths[:-1].cumsum(0)])] = True
        self.register_buffer("seq_first", first, persistent=False)
        # the same, as Python values for the forward's branches (no tensor reads per batch)
        self._first_multi_row = single_rows
        self._plan_key = ("FieldEmbedding.plan", single_rows, self.multi_valued)
        self._weighted = any(m.weighted for m in self.multi_valued)
        self._poolings = tuple(m.pooling for m in self.multi_valued)
        ends = widths.cumsum(0).tolist()
        self._columns = [slice(z - int(w), z) for z, w in zip(ends, widths)]  # each field's block of seq
        self.register_buffer("seq_weighted", torch.repeat_interleave(torch.tensor([m.weighted for m in self.multi_valued]), widths), persistent=False)

    def forward(self, x: torch.Tensor | Batch) -> torch.Tensor:
        batch = Batch.of(x)
        ids = batch.x + self.offsets  # [B, f_s]
        if not self.multi_valued:
            return F.embedding(ids, self.weight, sparse=self.sparse)  # [B, f_s, k]
        if batch.seq is None:
            raise ValueError(f"this model has multi-valued fields ({', '.join(m.name for m in self.multi_valued)}): pass a Batch with seq")
        if any(m.weighted for m in self.multi_valued) and batch.seq_weights is None:
            name = next(m.name for m in self.multi_valued if m.weighted)
            raise ValueError(f"multi-valued field {name!r} is weighted: pass a Batch with seq_weights")
        if self.lookup not in LOOKUPS:
            raise ValueError(f"lookup: expected {' or '.join(LOOKUPS)}, got {self.lookup!r}")
        compact = self.lookup == "compact" or (self.lookup == "auto" and torch.is_grad_enabled())
        if compact and not torch.jit.is_tracing():
            return self._compact_lookup(ids, batch)
        return self._gather_lookup(ids, batch)

    def _valid(self, seq: torch.Tensor) -> torch.Tensor:
        return (seq != 0) | self.seq_first  # an empty list keeps its first position: id 0, the missing row

    def _gather_lookup(self, ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Static shapes (ONNX, tracing): one gather over [B, f_s + ΣL], padding included, then
        a masked reduction per field (`pool_multi_valued`)."""
        valid = self._valid(batch.seq)
        rows = torch.where(valid, batch.seq + self.seq_offsets, self.pad_row)  # [B, ΣL]
        # One gather for both kinds, so one sparse gradient: two lookups of the table cost a
        # sparse-gradient sum more, 8-14% of an FM/LR step (measured, docs/multivalued.md).
        emb = F.embedding(torch.cat([ids, rows], dim=1), self.weight, padding_idx=self.pad_row, sparse=self.sparse)
        fs = ids.shape[1]
        pooled = self.pool_multi_valued(emb[:, fs:], batch.seq, valid, batch.seq_weights)
        return torch.cat([emb[:, :fs], pooled], dim=1)  # [B, f_s + f_m, k]

    def _compact_lookup(self, ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Training: only the positions that count are looked up.

        The padded gather looks up every padding position and its sparse gradient then drops
        them by a boolean mask (index + nonzero over [B·(f_s + ΣL), k]), and the optimizer
        coalesces what remains: for FM and LR, whose step is almost only that, 20 padded
        positions per row cost a third of the step. Here the valid positions are picked first
        (one nonzero over [B, ΣL]), each distinct value looked up once together with the single
        ids in one gather, and pooled by torch.segment_reduce into one bag per row and field:
        the same sums as `pool_multi_valued`, up to float rounding, in 0.71-0.77x the CPU time
        of the padded gather's lookup, backward and SparseAdam step for LR's and FM's tables
        (benchmarks/bench_pooled_lookup.py, docs/multivalued.md).
        """
        (b, fs), fm = ids.shape, len(self.multi_valued)
        pos, values, distinct, occurrence, scale, lengths = self._plan(batch)
        emb = F.embedding(torch.cat([ids.reshape(-1), distinct]), self.weight, sparse=self.sparse)
        e = emb[b * fs :].index_select(0, occurrence)  # [N, k]
        if scale is not None:
            e = e * scale.to(e.dtype).unsqueeze(1)
        pooled = self._pool_segments(e, lengths)
        return torch.cat([emb[: b * fs].view(b, fs, -1), pooled.view(b, fm, -1)], dim=1)  # [B, f_s + f_m, k]

    def _plan(self, batch: Batch) -> tuple:
        """What the compact lookup derives from the ids alone, once per batch and layout (FM's
        first-order table and its factors share it, through `batch.memo()`):
        the valid positions [N] (row-major in [B, ΣL]), their table rows, the distinct rows and
        each value's place among them, the per-value weights (None when no field is weighted)
        and each (row, field) bag's number of values [B·f_m]."""
        key, memo = self._plan_key, batch.memo()
        if key in memo:
            return memo[key]
        width, valid = batch.seq.shape[1], self._valid(batch.seq)
        pos = valid.reshape(-1).nonzero().squeeze(1)
        values = (batch.seq + self.seq_offsets).reshape(-1).index_select(0, pos)  # table rows
        distinct, occurrence = self._distinct(values)
        scale = None
        if self._weighted:
            col = pos % width
            w = batch.seq_weights.reshape(-1).index_select(0, pos)
            weighs = self.seq_weighted[col] & (values != self.seq_offsets[col])  # an empty list (id 0) weighs 1
            scale = torch.where(weighs, w, torch.ones_like(w))
        # Row-major positions put each (row, field) bag's values next to each other, in order:
        # the bags are segments of the values, of the fields' value counts.
        if len(self.multi_valued) == 1:
            lengths = valid.sum(dim=1)
        else:
            lengths = torch.stack([valid[:, sl].sum(dim=1) for sl in self._columns], dim=1).reshape(-1)
        memo[key] = plan = (pos, values, distinct, occurrence, scale, lengths)
        return plan

    def _distinct(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct table rows among `values` and where each value is among them
        (values == distinct[occurrence]), sorted.

        Each distinct value is then looked up once: the sparse gradient holds one row per value
        instead of one per occurrence, and coalescing it (in SparseAdam) is the largest cost
        of an FM/LR step. When the multi-valued tables are small beside the batch (200 tags,
        10k values), one pass over a flag per row replaces torch.unique's sort, the
        largest cost of this lookup's forward.
        """
        first_row, rows = self._first_multi_row, self.pad_row - self._first_multi_row
        if rows > 4 * values.numel():
            return torch.unique(values, return_inverse=True)
        local = values - first_row
        seen = torch.zeros(rows, dtype=torch.bool, device=values.device).index_fill_(0, local, True)
        slot = seen.cumsum(0) - 1  # each row's place among the distinct ones
        return seen.nonzero().squeeze(1) + first_row, slot.index_select(0, local)

    def _pool_segments(self, e: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pool the looked-up values e [N, k] by segments of `lengths` (bags row-major over
        [B, f_m], each >= 1 value) -> [B·f_m, k], each bag by its field's pooling."""
        poolings = set(self._poolings)
        if poolings == {"max"}:
            return self._segment_max(e, lengths)
        if "max" not in poolings and len(poolings) == 1:
            return torch.segment_reduce(e, poolings.pop(), lengths=lengths, axis=0)
        fm = len(self.multi_valued)
        pooled = torch.zeros(len(lengths), e.shape[1], dtype=e.dtype, device=e.device)
        for p in sorted(poolings):
            kind = torch.tensor([m.pooling == p for m in self.multi_valued], device=e.device).repeat(len(lengths) // fm)
            reduced = self._segment_max(e, lengths) if p == "max" else torch.segment_reduce(e, p, lengths=lengths, axis=0)
            pooled = torch.where(kind.unsqueeze(1), reduced, pooled)
        return pooled

    @staticmethod
    def _segment_max(e: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # scatter_reduce, not segment_reduce: the latter's backward misroutes the gradient of
        # tied values (a value listed twice) in torch 2.13 (tests/models/test_pooled_lookup.py). It
        # starts from -inf, not zeros: amax's backward splits a tie's gradient over every
        # element equal to the max, the start value included even with include_self=False.
        bag = torch.repeat_interleave(torch.arange(len(lengths), device=e.device), lengths)
        idx = bag.unsqueeze(1).expand(-1, e.shape[1])
        return e.new_full((len(lengths), e.shape[1]), float("-inf")).scatter_reduce(0, idx, e, "amax", include_self=False)

    def pool_multi_valued(
        self, emb: torch.Tensor, seq: torch.Tensor, valid: torch.Tensor, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """One embedding per multi-valued field: the looked-up rows emb [B, ΣL, k] of seq [B, ΣL]
        (0 = padding; `valid` marks the positions that count) -> [B, f_m, k].

        Pooling over the field's values j (masked: padding never counts):
            mean  Σ_j w_j e_j / n        sum  Σ_j w_j e_j        max  max_j w_j e_j (per dimension)
        with w_j = 1 unless the field is weighted, n the number of values. An empty list is the
        field's missing value: its embedding is row 0 of the field's table (learnt, like a
        single-valued field's missing index), never a zero vector the model cannot tell apart.
        Padding positions look up the shared all-zero row with padding_idx, so their gradient is
        dropped from the sparse gradient and SparseAdam never touches that row.
        """
        pooled, start = [], 0
        for m in self.multi_valued:
            sl = slice(start, start + m.max_len)
            start += m.max_len
            e, ok = emb[:, sl], valid[:, sl]
            if m.weighted:
                if weights is None:
                    raise ValueError(f"multi-valued field {m.name!r} is weighted: pass a Batch with seq_weights")
                w = torch.where(seq[:, sl] != 0, weights[:, sl], torch.ones_like(weights[:, sl]))  # empty: weight 1
                e = e * w.unsqueeze(-1)
            if m.pooling == "max":
                pooled.append(e.masked_fill(~ok.unsqueeze(-1), float("-inf")).amax(dim=1))
            elif m.pooling == "sum":
                pooled.append(e.sum(dim=1))
            else:
                pooled.append(e.sum(dim=1) / ok.sum(dim=1, keepdim=True).to(e.dtype))
        return torch.stack(pooled, dim=1)


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
        return field_normalize(x, self.dim, self.eps)

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
