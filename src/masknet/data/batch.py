"""The model's input, typed: single-valued ids and multi-valued (padded) ids in one object.

    Batch(x)                       x: int64 [B, f_s], one index per single-valued field
    Batch(x, seq)                  seq: int64 [B, ΣL]: each multi-valued field's ids in its own
                                   block of max_len columns, left-aligned, 0 = padding
    Batch(x, seq, seq_weights)     seq_weights: float32 [B, ΣL], the per-value weights

Every consumer (models, the trainer, predict, ONNX export, serving, the benchmark) passes a
`Batch`; models also take a bare LongTensor for the single-valued case (`model(x)`).
The layout of `seq` (which columns belong to which field, and how each pools) is a list of
`MultiValuedField`s, stored with the model (model.json) and the prepared data (meta.json).

Padded rather than jagged (TorchRec's KeyedJaggedTensor keeps values + lengths): a fixed
[B, ΣL] block memory-maps, slices and shuffles like the single-valued array, exports to ONNX
with static shapes, and costs ΣL int32 per row (80 bytes for one field of max_len 20).
`EncodedRows` is the same thing in NumPy, before it becomes tensors (raw-file and request encoding).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: `masknet prepare` never needs it
    import torch

POOLINGS = ("mean", "sum", "max")


@dataclass(frozen=True)
class MultiValuedField:
    """One multi-valued field as the model sees it: ids in [0, cardinality), max_len columns of `seq`."""

    name: str
    cardinality: int
    max_len: int
    pooling: str = "mean"  # mean (masked, the default), sum or max over the field's values
    weighted: bool = False  # per-value weights in seq_weights scale each value's embedding

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MultiValuedField":
        return cls(str(d["name"]), int(d["cardinality"]), int(d["max_len"]), str(d.get("pooling", "mean")), bool(d.get("weighted", False)))


MAX_ID = 2**31 - 1  # ids are int32 on disk


def check_multi_valued(entries: Any) -> list[MultiValuedField]:
    """A stored `multi_valued` list (meta.json, model.json) checked entry by entry: a ValueError
    naming the entry and key ("[0].max_len: expected ...") for anything prepare and training never
    write, so a garbled file is refused before it sizes a table or a `seq` block."""
    if not isinstance(entries, list):
        raise ValueError(f": expected a list, got {json.dumps(entries)[:60]}")
    out = []
    for i, d in enumerate(entries):
        def bad(key: str, want: str) -> ValueError:
            got = f"got {json.dumps(d.get(key))[:60]}" if key in d else "missing"
            return ValueError(f"[{i}].{key}: expected {want}, {got}")

        if not isinstance(d, dict):
            raise ValueError(f"[{i}]: expected an object, got {json.dumps(d)[:60]}")
        if not isinstance(d.get("name"), str) or not d["name"]:
            raise bad("name", "a non-empty string")
        for key in ("cardinality", "max_len"):
            v = d.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_ID:
                raise bad(key, f"an integer in 1..{MAX_ID:,}")
        if d.get("pooling", "mean") not in POOLINGS:
            raise bad("pooling", " or ".join(POOLINGS))
        if not isinstance(d.get("weighted", False), bool):
            raise bad("weighted", "true or false")
        out.append(MultiValuedField.from_dict(d))
    return out


def seq_width(fields) -> int:
    """ΣL: the number of `seq` columns of these multi-valued fields."""
    return sum(f.max_len for f in fields)


@dataclass
class Batch:
    """A mini-batch of model inputs (see the module docstring). `len(batch)` is B."""

    x: "torch.Tensor"
    seq: Optional["torch.Tensor"] = None
    seq_weights: Optional["torch.Tensor"] = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def memo(self) -> dict:
        """What models derive from this batch's ids alone, computed once for all their tables
        (models.layers.FieldEmbedding's lookup plan: FM's two tables share it). Not a dataclass
        field: equality, repr and dataclasses.replace (DistributedDataParallel's input copy)
        ignore it, and a new Batch (a slice, .to()) starts with an empty one."""
        return self.__dict__.setdefault("_memo", {})

    def __getitem__(self, rows: slice) -> "Batch":
        return Batch(self.x[rows], _rows(self.seq, rows), _rows(self.seq_weights, rows))

    def to(self, device: Any, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.x), move(self.seq), move(self.seq_weights))

    @classmethod
    def of(cls, x: Any) -> "Batch":
        """`x` itself if it is a Batch, else Batch(x) (a bare LongTensor of single-valued ids)."""
        return x if isinstance(x, Batch) else cls(x)


@dataclass
class EncodedRows:
    """Encoded rows in NumPy: x int [n, f_s], seq int [n, ΣL] or None, seq_weights float32 or None."""

    x: np.ndarray
    seq: Optional[np.ndarray] = None
    seq_weights: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, rows: slice) -> "EncodedRows":
        return EncodedRows(self.x[rows], _rows(self.seq, rows), _rows(self.seq_weights, rows))

    def to_batch(self) -> Batch:
        import torch

        as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        w = None if self.seq_weights is None else torch.from_numpy(np.ascontiguousarray(self.seq_weights, dtype=np.float32))
        return Batch(as_long(self.x), None if self.seq is None else as_long(self.seq), w)

    @staticmethod
    def concat(parts: list["EncodedRows"]) -> "EncodedRows":
        cat = lambda xs: None if xs[0] is None else np.concatenate(xs)  # noqa: E731
        return EncodedRows(np.concatenate([p.x for p in parts]), cat([p.seq for p in parts]), cat([p.seq_weights for p in parts]))


def _rows(t: Any, rows: slice) -> Any:
    return None if t is None else t[rows]


def to_batch(x: Any) -> Batch:
    """A Batch from an ndarray of single-valued ids, an EncodedRows, a LongTensor or a Batch."""
    if isinstance(x, Batch):
        return x
    if isinstance(x, EncodedRows):
        return x.to_batch()
    if isinstance(x, np.ndarray):
        return EncodedRows(x).to_batch()
    return Batch(x)
