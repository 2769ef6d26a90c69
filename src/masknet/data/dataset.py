"""The prepared dataset: compact integer arrays on disk, memory-mapped, batched by slicing.

Layout of a prepared dataset folder (written by `PreparedWriter`, read by `load_prepared`):

    meta.json           fields (name, kind, cardinality), rows and positives per split, source, stats
    <split>.x.bin       int32  [rows, f]  per-field category index, 0 <= x[:, i] < cardinality[i]
    <split>.y.bin       uint8  [rows]     label 0/1
    <split>.p.bin       float32 [rows]    true click probability (only for synthetic data: the oracle)
    <split>.seq.bin     int32  [rows, ΣL] multi-valued fields' padded ids (only with multi-valued fields;
                                          meta.json's "multi_valued" gives each field's max_len columns)
    <split>.seqw.bin    float32 [rows, ΣL] their per-value weights (only when a field is weighted)

Raw little-endian arrays (not .npy) so a writer can append chunk by chunk without
knowing the final row count; the shapes live in meta.json, with each split's per-field index
range and each file's SHA-256, checked when the folder is opened (integrity.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np

from ..errors import DataError
from . import integrity
from .batch import Batch, EncodedRows, MultiValuedField, check_multi_valued, seq_width

if TYPE_CHECKING:  # torch is imported lazily: `masknet prepare` never needs it
    import torch

SPLITS = ("train", "valid", "test")
FORMAT_NAME = "masknet-prepared"
FORMAT_VERSION = 1
MULTI_VALUED_VERSION = 2  # written only with multi-valued fields (older masknets refuse such folders)
# Indices are int32, so no field can have more categories than this; a larger cardinality in
# meta.json is corruption (it would reach the embedding allocator as a traceback).
MAX_CARDINALITY = 2**31 - 1
X_DTYPE = np.dtype("<i4")
Y_DTYPE = np.dtype("u1")
P_DTYPE = np.dtype("<f4")


@dataclass
class Split:
    """One split: x [n, f] int32, y [n] uint8, p [n] float32 or None; with multi-valued fields
    seq [n, ΣL] int32 (and seq_weights [n, ΣL] float32). Arrays may be memory-mapped."""

    x: np.ndarray
    y: np.ndarray
    p: Optional[np.ndarray] = None
    seq: Optional[np.ndarray] = None
    seq_weights: Optional[np.ndarray] = None

    def rows(self, start: int, stop: int) -> "EncodedRows":
        """Rows [start, stop) as EncodedRows (read from the memory map)."""
        part = lambda a: None if a is None else np.asarray(a[start:stop])  # noqa: E731
        return EncodedRows(np.asarray(self.x[start:stop]), part(self.seq), part(self.seq_weights))

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class CTRDataset:
    field_names: list[str]
    cardinalities: list[int]
    splits: dict[str, Split]
    meta: dict[str, Any] = field(default_factory=dict)
    multi_valued: list[MultiValuedField] = field(default_factory=list)  # after the single-valued fields

    @property
    def num_fields(self) -> int:
        """Single- and multi-valued fields (each one field embedding in the model)."""
        return len(self.field_names) + len(self.multi_valued)

    def has_oracle(self) -> bool:
        return all(s.p is not None for s in self.splits.values())


# ---------------------------------------------------------------------------
# Writing and reading


class PreparedWriter:
    """Append encoded chunks to a prepared dataset folder, then `close()` to write meta.json.

    Memory stays bounded by the chunk size, whatever the total number of rows.
    """

    def __init__(
        self, path: str | Path, fields: list[dict[str, Any]], with_prob: bool = False, multi_valued: Optional[list[dict[str, Any]]] = None
    ):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.fields = fields
        self.with_prob = with_prob
        self.multi_valued = list(multi_valued or [])  # meta entries (MultiValuedField.to_dict() + kind)
        self.seq_width = sum(int(m["max_len"]) for m in self.multi_valued)
        self.weighted = any(m.get("weighted") for m in self.multi_valued)
        self.rows = {s: 0 for s in SPLITS}
        self.positives = {s: 0 for s in SPLITS}
        self.x_min: dict[str, Optional[np.ndarray]] = {s: None for s in SPLITS}  # per field, recorded in meta.json
        self.x_max: dict[str, Optional[np.ndarray]] = {s: None for s in SPLITS}
        self._files = {}
        self._seq_files = {}
        for s in SPLITS:
            self._files[s] = [open(self.path / f"{s}.x.bin", "wb"), open(self.path / f"{s}.y.bin", "wb")]
            if with_prob:
                self._files[s].append(open(self.path / f"{s}.p.bin", "wb"))
            if self.multi_valued:
                self._seq_files[s] = [open(self.path / f"{s}.seq.bin", "wb")]
                if self.weighted:
                    self._seq_files[s].append(open(self.path / f"{s}.seqw.bin", "wb"))

    def append(
        self, split: str, x: np.ndarray, y: np.ndarray, p: Optional[np.ndarray] = None,
        seq: Optional[np.ndarray] = None, seq_weights: Optional[np.ndarray] = None,
    ) -> None:
        if x.ndim != 2 or x.shape[1] != len(self.fields) or len(y) != len(x):
            raise ValueError(f"chunk shape mismatch: x {x.shape}, y {y.shape}, fields {len(self.fields)}")
        files = self._files[split]
        # written through the buffer protocol: no bytes copy of the chunk
        files[0].write(np.ascontiguousarray(x, dtype=X_DTYPE))
        files[1].write(np.ascontiguousarray(y, dtype=Y_DTYPE))
        if self.with_prob:
            files[2].write(np.ascontiguousarray(p, dtype=P_DTYPE))
        if self.multi_valued:
            if seq is None or seq.shape != (len(x), self.seq_width) or (self.weighted and seq_weights is None):
                raise ValueError(f"chunk shape mismatch: seq {None if seq is None else seq.shape}, expected {(len(x), self.seq_width)}")
            self._seq_files[split][0].write(np.ascontiguousarray(seq, dtype=X_DTYPE))
            if self.weighted:
                self._seq_files[split][1].write(np.ascontiguousarray(seq_weights, dtype=P_DTYPE))
        self.rows[split] += len(x)
        self.positives[split] += int(np.count_nonzero(y))
        if len(x):
            lo, hi = x.min(axis=0), x.max(axis=0)
            old_lo, old_hi = self.x_min[split], self.x_max[split]
            self.x_min[split] = lo if old_lo is None else np.minimum(old_lo, lo)
            self.x_max[split] = hi if old_hi is None else np.maximum(old_hi, hi)

    def close(self, source: dict[str, Any] | None = None, stats: dict[str, Any] | None = None) -> Path:
        for files in list(self._files.values()) + list(self._seq_files.values()):
            for fh in files:
                fh.close()
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION if not self.multi_valued else MULTI_VALUED_VERSION,
            "fields": self.fields,
            "splits": {s: self._split_meta(s) for s in SPLITS},
            "has_prob": self.with_prob,
            "files": integrity.record(array_files(self.path, len(self.fields), self.with_prob, self._multi_fields())),
            "source": source or {},
            "stats": stats or {},
        }
        if self.multi_valued:  # absent otherwise: meta.json reads as before multi-valued fields existed
            meta["multi_valued"] = self.multi_valued
        (self.path / "meta.json").write_text(json.dumps(meta, indent=2))
        return self.path

    def _multi_fields(self) -> list[MultiValuedField]:
        return [MultiValuedField.from_dict(m) for m in self.multi_valued]

    def _split_meta(self, s: str) -> dict[str, Any]:
        out = {
            "rows": self.rows[s],
            "positives": self.positives[s],
            "positive_rate": self.positives[s] / self.rows[s] if self.rows[s] else None,
        }
        if self.rows[s]:
            out["x_min"] = [int(v) for v in self.x_min[s]]
            out["x_max"] = [int(v) for v in self.x_max[s]]
        return out


def array_file_names(with_prob: bool, seq: bool = False, seqw: bool = False) -> list[str]:
    """The array files a prepared folder holds (the names `array_files` uses): with multi-valued
    fields also `seq`, and `seqw` when one of them is weighted."""
    kinds = ["x", "y"] + ["p"] * with_prob + ["seq"] * seq + ["seqw"] * seqw
    return [f"{s}.{k}.bin" for s in SPLITS for k in kinds]


def seq_kinds(meta: dict[str, Any]) -> tuple[bool, bool]:
    """(has seq, has seqw) as a meta.json's `multi_valued` list says (read leniently: callers that
    need it valid check it with check_multi_valued)."""
    multi = meta.get("multi_valued") or []
    multi = multi if isinstance(multi, list) else []
    return bool(multi), any(isinstance(m, dict) and m.get("weighted") is True for m in multi)


def array_files(path: Path, num_fields: int, with_prob: bool, multi_valued: Sequence[MultiValuedField] = ()) -> list[integrity.ArrayFile]:
    files = []
    columns = [(m.name, m.cardinality) for m in multi_valued for _ in range(m.max_len)]  # seq's columns
    for s in SPLITS:
        files.append(integrity.ArrayFile(s, "x", path / f"{s}.x.bin", X_DTYPE, num_fields))
        files.append(integrity.ArrayFile(s, "y", path / f"{s}.y.bin", Y_DTYPE, 1))
        if with_prob:
            files.append(integrity.ArrayFile(s, "p", path / f"{s}.p.bin", P_DTYPE, 1))
        if multi_valued:
            files.append(integrity.ArrayFile(s, "seq", path / f"{s}.seq.bin", X_DTYPE, len(columns), columns))
            if any(m.weighted for m in multi_valued):
                files.append(integrity.ArrayFile(s, "seqw", path / f"{s}.seqw.bin", P_DTYPE, len(columns)))
    return files


def write_prepared(dataset: CTRDataset, path: str | Path, kinds: Optional[list[str]] = None) -> Path:
    """Write an in-memory dataset to a prepared folder."""
    kinds = kinds or [f.get("kind", "categorical") for f in dataset.meta.get("fields", [])] or ["categorical"] * dataset.num_fields
    fields = [
        {"name": n, "kind": k, "cardinality": c}
        for n, k, c in zip(dataset.field_names, kinds, dataset.cardinalities)
    ]
    multi = [{"kind": "multi_valued", **m.to_dict()} for m in dataset.multi_valued]
    writer = PreparedWriter(path, fields, with_prob=dataset.has_oracle(), multi_valued=multi)
    for name, split in dataset.splits.items():
        writer.append(name, split.x, split.y, split.p, split.seq, split.seq_weights)
    return writer.close(source=dataset.meta.get("source"), stats=dataset.meta.get("stats"))


def load_prepared(path: str | Path, verify: bool = False) -> CTRDataset:
    """Open a prepared dataset folder with every array memory-mapped.

    Every open checks the file sizes and reads the index and label files once for their ranges
    (about 0.05 s per million rows of 39 fields from the page cache, docs/data.md); `verify=True`
    also checks every file's SHA-256 against meta.json (about 3x that). A DataError names the file
    and field of anything that is not what prepare wrote."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not path.is_dir():
        raise DataError(f"{path}: prepared dataset folder not found (create one with `masknet prepare`)")
    if not meta_path.is_file():
        raise DataError(f"{path}: not a prepared dataset (no meta.json); create one with `masknet prepare`")
    try:
        meta = json.loads(meta_path.read_bytes())
    except OSError as exc:
        raise DataError(f"{meta_path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{meta_path}: not valid JSON ({exc})") from None
    versions = (FORMAT_VERSION, MULTI_VALUED_VERSION)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or meta.get("version") not in versions:
        raise DataError(f"{meta_path}: not a masknet prepared dataset of version {FORMAT_VERSION} or {MULTI_VALUED_VERSION}")
    multi = stored_multi_valued(meta_path, meta)  # first: check_meta's file names depend on it
    fields, names, cards, rows = check_meta(meta_path, meta)
    f = len(fields)
    width = seq_width(multi)
    weighted = any(m.weighted for m in multi)
    splits = {}
    for s in SPLITS:
        x = _map(path / f"{s}.x.bin", X_DTYPE, (rows[s], f))
        y = _map(path / f"{s}.y.bin", Y_DTYPE, (rows[s],))
        p = _map(path / f"{s}.p.bin", P_DTYPE, (rows[s],)) if meta.get("has_prob") else None
        seq = _map(path / f"{s}.seq.bin", X_DTYPE, (rows[s], width)) if multi else None
        seq_w = _map(path / f"{s}.seqw.bin", P_DTYPE, (rows[s], width)) if weighted else None
        splits[s] = Split(x, y, p, seq, seq_w)
    try:
        integrity.check(meta_path, meta, array_files(path, f, bool(meta.get("has_prob")), multi), names, cards, verify)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{meta_path}: malformed ({type(exc).__name__}: {exc}); prepare the dataset again") from None
    return CTRDataset(field_names=names, cardinalities=cards, splits=splits, meta=meta, multi_valued=multi)


def check_meta(meta_path: Path, meta: dict[str, Any]) -> tuple[list, list[str], list[int], dict[str, int]]:
    """Refuse (DataError naming the key) a meta.json whose structure is not what prepare writes:
    wrong types, a cardinality outside 1..MAX_CARDINALITY, negative counts. Returns (fields, names,
    cardinalities, rows per split)."""

    def bad(key: str, want: str, got: Any = ...) -> DataError:
        shown = "missing" if got is ... else f"got {json.dumps(got)[:60]}"
        return DataError(f"{meta_path}: malformed: {key}: expected {want}, {shown}; prepare the dataset again")

    def integer(key: str, v: Any, lo: int, hi: int) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise bad(key, f"an integer in {lo}..{hi:,}", v)
        return v

    fields = meta.get("fields", ...)
    if not isinstance(fields, list) or not fields:
        raise bad("fields", "a non-empty list", fields)
    for i, fd in enumerate(fields):
        if not isinstance(fd, dict) or not isinstance(fd.get("name"), str) or not fd["name"]:
            raise bad(f"fields[{i}]", 'an object with a "name" string', fd)
        integer(f"fields[{i}].cardinality", fd.get("cardinality"), 1, MAX_CARDINALITY)
    splits = meta.get("splits", ...)
    if not isinstance(splits, dict):
        raise bad("splits", "an object", splits)
    rows = {}
    for s in SPLITS:
        info = splits.get(s, ...)
        if not isinstance(info, dict):
            raise bad(f"splits.{s}", "an object", info)
        rows[s] = integer(f"splits.{s}.rows", info.get("rows", ...), 0, 2**62)
        for key in ("x_min", "x_max"):
            if key in info and not (isinstance(info[key], list) and all(isinstance(v, int) and not isinstance(v, bool) for v in info[key])):
                raise bad(f"splits.{s}.{key}", "a list of integers", info[key])
    if not isinstance(meta.get("has_prob", False), bool):
        raise bad("has_prob", "true or false", meta["has_prob"])
    files = meta.get("files", {})
    if not isinstance(files, dict):
        raise bad("files", "an object", files)
    for name, entry in files.items():
        if name not in array_file_names(bool(meta.get("has_prob")), *seq_kinds(meta)):
            raise bad(f"files.{name}", "only the array files of the dataset", entry)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise bad(f"files.{name}", 'an object with a "sha256" string', entry)
        integer(f"files.{name}.bytes", entry.get("bytes", ...), 0, 2**62)
    return fields, [fd["name"] for fd in fields], [fd["cardinality"] for fd in fields], rows


def stored_multi_valued(meta_path: Path, meta: dict[str, Any]) -> list[MultiValuedField]:
    """meta.json's multi-valued fields, checked (a DataError naming the entry and key)."""
    try:
        return check_multi_valued(meta.get("multi_valued", []))
    except ValueError as exc:
        raise DataError(f"{meta_path}: malformed: multi_valued{exc}; prepare the dataset again") from None


def identity(path: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What identifies a prepared dataset's content: its fields and each array file's SHA-256
    (from meta.json, which `load_prepared(verify=True)` checked against the files; hashed now for
    folders prepared before meta.json recorded them) and one fingerprint over both."""
    path = Path(path)
    multi = stored_multi_valued(path / "meta.json", meta)
    files = array_files(path, len(meta["fields"]), bool(meta.get("has_prob")), multi)
    recorded = meta.get("files") or {}
    if all(f.path.name in recorded for f in files):
        shas = {f.path.name: recorded[f.path.name]["sha256"] for f in files}
    else:
        shas = dict(zip((f.path.name for f in files), integrity.sha256_files([f.path for f in files])))
    fields = [[fd["name"], fd.get("kind"), fd["cardinality"]] for fd in meta["fields"]]
    fields += [[m.name, "multi_valued", m.cardinality, m.max_len, m.pooling, m.weighted] for m in multi]  # none: as before
    return {"fingerprint": integrity.fingerprint({"fields": fields, "files": shas}), "files": shas}


def _map(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    expected = int(np.prod(shape)) * dtype.itemsize
    if not path.is_file():
        raise DataError(f"{path}: missing array file of the prepared dataset")
    size = path.stat().st_size
    if size != expected:
        raise DataError(f"{path}: {size} bytes, expected {expected} for shape {shape} (truncated or corrupted)")
    if expected == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


# ---------------------------------------------------------------------------
# Batching


def iterate_batches(
    split: Split,
    batch_size: int,
    shuffle_seed: Optional[Sequence[int]] = None,
    block_rows: int = 1 << 18,
    start: int = 0,
    stop: Optional[int] = None,
    skip_batches: int = 0,
) -> Iterator[tuple[Batch, "torch.Tensor"]]:
    """Yield (Batch, y FloatTensor [b]) batches by slicing rows [start, stop); the Batch holds
    x LongTensor [b, f] and, with multi-valued fields, their padded ids (data.batch).

    With `shuffle_seed` (e.g. (seed, epoch)) shuffling is block-wise: the order of blocks
    of `block_rows` contiguous rows is permuted, and rows are permuted within each block.
    Only one block is in memory at a time, so a memory-mapped split larger than RAM
    trains in bounded memory. Every permutation is a pure function of the seed and the
    block, so `skip_batches=n` resumes exactly at batch n without replaying the rest.
    """
    import torch

    stop = len(split) if stop is None else stop
    block_rows = max(batch_size, (block_rows // batch_size) * batch_size)  # whole batches per block
    starts = np.arange(start, stop, block_rows)
    if shuffle_seed is not None:
        starts = np.random.default_rng([*shuffle_seed, 0]).permutation(starts)
    for b0 in starts:
        b1 = min(b0 + block_rows, stop)
        n_batches = -(-(b1 - b0) // batch_size)
        if skip_batches >= n_batches:
            skip_batches -= n_batches
            continue
        rows = split.rows(b0, b1)
        yb = np.asarray(split.y[b0:b1])
        if shuffle_seed is not None:
            order = np.random.default_rng([*shuffle_seed, 1, int(b0)]).permutation(b1 - b0)
            rows, yb = rows[order], yb[order]
        block = rows.to_batch()
        y_t = torch.from_numpy(yb.astype(np.float32, copy=False))
        for i in range(skip_batches * batch_size, b1 - b0, batch_size):
            yield block[i : i + batch_size], y_t[i : i + batch_size]
        skip_batches = 0
