"""FLOPs per sample of a model, from its architecture.

Two counts that must agree where both apply (tests/bench/test_bench.py checks it for MaskNet):

- `linear_flops_per_sample`: the closed form 2 * in * out summed over every nn.Linear the model
  instantiates. Exact for models whose Linear layers each run once per row (MaskNet, DNN,
  DeepFM, DCN); AutoInt's projections run once per field and the CIN and the attention scores
  are einsums, so for those this is a lower bound.
- `counted_flops_per_sample`: every matrix multiply (mm, addmm, bmm, einsum, ...) the forward
  and the backward actually execute on a batch, counted by torch.utils.flop_counter at
  2 * M * N * K each. The count runs the models on PyTorch's own kernels (the flop counter
  does not know oneDNN's op, models.layers.dense): the FLOPs are the model's, whatever runs them. This covers the model-specific terms (FM's and CIN's products, the
  attention scores of AutoInt) without a per-model formula. Elementwise work (LayerNorm,
  ReLU, the mask product, the optimizer) is not counted: the roofline is the matmul roofline.

The backward of a Linear costs two matmuls of the forward's size (grad input, grad weight), so
forward + backward is ~3x the forward; the count is measured, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..data.batch import Batch, MultiValuedField
from ..models.layers import using_gemm_backend


def linear_flops_per_sample(model: nn.Module) -> int:
    """Forward FLOPs per row: 2 * in_features * out_features over every nn.Linear."""
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


@dataclass
class Flops:
    forward: float  # FLOPs per sample, forward only (prediction)
    train: float  # FLOPs per sample, forward + backward (one training step, optimizer excluded)


def random_batch(cardinalities: list[int], multi_valued: Sequence[MultiValuedField], rows: int, gen: torch.Generator) -> Any:
    """Random in-range ids: a LongTensor [rows, f], or a Batch with multi-valued lists of random
    lengths (0..max_len) when the model has multi-valued fields."""
    x = torch.stack([torch.randint(0, c, (rows,), generator=gen) for c in cardinalities], dim=1)
    if not multi_valued:
        return x
    blocks = []
    for m in multi_valued:
        ids = torch.randint(1, max(m.cardinality, 2), (rows, m.max_len), generator=gen)
        lengths = torch.randint(0, m.max_len + 1, (rows, 1), generator=gen)
        blocks.append(torch.where(torch.arange(m.max_len)[None, :] < lengths, ids, torch.zeros_like(ids)))
    seq = torch.cat(blocks, dim=1)
    w = (seq != 0).float() if any(m.weighted for m in multi_valued) else None
    return Batch(x, seq, w)


def counted_flops_per_sample(
    model: nn.Module, cardinalities: list[int], batch: int = 256, multi_valued: Sequence[MultiValuedField] = ()
) -> Flops:
    """Count the matmul FLOPs of one forward and one forward + backward on random indices."""
    gen = torch.Generator().manual_seed(0)
    x = random_batch(cardinalities, multi_valued, batch, gen)
    was_training = model.training
    model.train()
    with using_gemm_backend("torch"), FlopCounterMode(display=False) as fwd:
        model(x)
    with using_gemm_backend("torch"), FlopCounterMode(display=False) as both:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return Flops(forward=fwd.get_total_flops() / batch, train=both.get_total_flops() / batch)
