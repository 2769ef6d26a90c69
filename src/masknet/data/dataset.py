"""The prepared dataset: compact integer arrays on disk, memory-mapped, batched by slicing.

Layout of a prepared dataset folder (written by `PreparedWriter`, read by `load_prepared`):

    meta.json           fields (name, kind, cardinality), rows and positives per split, source, stats
    <split>.x.bin       int32  [rows, f]  per-field category index, 0 <= x[:, i] < cardinality[i]
    <split>.y.bin       uint8  [rows]     label 0/1
    <split>.p.bin       float32 [rows]    true click probability (only for synthetic data: the oracle)

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

if TYPE_CHECKING:  # torch is imported lazily: `masknet prepare` never needs it
    import torch

SPLITS = ("train", "valid", "test")
FORMAT_NAME = "masknet-prepared"
FORMAT_VERSION = 1
# Indices are int32, so no field can have more categories than this; a larger cardinality in
# meta.json is corruption (it would reach the embedding allocator as a traceback).
MAX_CARDINALITY = 2**31 - 1
X_DTYPE = np.dtype("<i4")
Y_DTYPE = np.dtype("u1")
P_DTYPE = np.dtype("<f4")


@dataclass
class Split:
    """One split: x [n, f] int32, y [n] uint8, p [n] float32 or None. Arrays may be memory-mapped."""

    x: np.ndarray
    y: np.ndarray
    p: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class CTRDataset:
    field_names: list[str]
    cardinalities: list[int]
    splits: dict[str, Split]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_fields(self) -> int:
        return len(self.field_names)

    def has_oracle(self) -> bool:
        return all(s.p is not None for s in self.splits.values())


# ---------------------------------------------------------------------------
# Writing and reading


class PreparedWriter:
    """Append encoded chunks to a prepared dataset folder, then `close()` to write meta.json.

    Memory stays bounded by the chunk size, whatever the total number of rows.
    """

    def __init__(self, path: str | Path, fields: list[dict[str, Any]], with_prob: bool = False):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.fields = fields
        self.with_prob = with_prob
        self.rows = {s: 0 for s in SPLITS}
        self.positives = {s: 0 for s in SPLITS}
        self.x_min: dict[str, Optional[np.ndarray]] = {s: None for s in SPLITS}  # per field, recorded in meta.json
        self.x_max: dict[str, Optional[np.ndarray]] = {s: None for s in SPLITS}
        self._files = {}
        for s in SPLITS:
            self._files[s] = [open(self.path / f"{s}.x.bin", "wb"), open(self.path / f"{s}.y.bin", "wb")]
            if with_prob:
                self._files[s].append(open(self.path / f"{s}.p.bin", "wb"))

    def append(self, split: str, x: np.ndarray, y: np.ndarray, p: Optional[np.ndarray] = None) -> None:
        if x.ndim != 2 or x.shape[1] != len(self.fields) or len(y) != len(x):
            raise ValueError(f"chunk shape mismatch: x {x.shape}, y {y.shape}, fields {len(self.fields)}")
        files = self._files[split]
        # written through the buffer protocol: no bytes copy of the chunk
        files[0].write(np.ascontiguousarray(x, dtype=X_DTYPE))
        files[1].write(np.ascontiguousarray(y, dtype=Y_DTYPE))
        if self.with_prob:
            files[2].write(np.ascontiguousarray(p, dtype=P_DTYPE))
        self.rows[split] += len(x)
        self.positives[split] += int(np.count_nonzero(y))
        if len(x):
            lo, hi = x.min(axis=0), x.max(axis=0)
            old_lo, old_hi = self.x_min[split], self.x_max[split]
            self.x_min[split] = lo if old_lo is None else np.minimum(old_lo, lo)
            self.x_max[split] = hi if old_hi is None else np.maximum(old_hi, hi)

    def close(self, source: dict[str, Any] | None = None, stats: dict[str, Any] | None = None) -> Path:
        for files in self._files.values():
            for fh in files:
                fh.close()
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "fields": self.fields,
            "splits": {s: self._split_meta(s) for s in SPLITS},
            "has_prob": self.with_prob,
            "files": integrity.record(array_files(self.path, len(self.fields), self.with_prob)),
            "source": source or {},
            "stats": stats or {},
        }
        (self.path / "meta.json").write_text(json.dumps(meta, indent=2))
        return self.path

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


def array_file_names(with_prob: bool) -> list[str]:
    """The array files a prepared folder holds (the names `array_files` uses)."""
    return [f"{s}.{k}.bin" for s in SPLITS for k in ("x", "y", "p")[: 3 if with_prob else 2]]


def array_files(path: Path, num_fields: int, with_prob: bool) -> list[integrity.ArrayFile]:
    files = []
    for s in SPLITS:
        files.append(integrity.ArrayFile(s, "x", path / f"{s}.x.bin", X_DTYPE, num_fields))
        files.append(integrity.ArrayFile(s, "y", path / f"{s}.y.bin", Y_DTYPE, 1))
        if with_prob:
            files.append(integrity.ArrayFile(s, "p", path / f"{s}.p.bin", P_DTYPE, 1))
    return files


def write_prepared(dataset: CTRDataset, path: str | Path, kinds: Optional[list[str]] = None) -> Path:
    """Write an in-memory dataset to a prepared folder."""
    kinds = kinds or [f.get("kind", "categorical") for f in dataset.meta.get("fields", [])] or ["categorical"] * dataset.num_fields
    fields = [
        {"name": n, "kind": k, "cardinality": c}
        for n, k, c in zip(dataset.field_names, kinds, dataset.cardinalities)
    ]
    writer = PreparedWriter(path, fields, with_prob=dataset.has_oracle())
    for name, split in dataset.splits.items():
        writer.append(name, split.x, split.y, split.p)
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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{meta_path}: not a masknet prepared dataset of version {FORMAT_VERSION}")
    fields, names, cards, rows = check_meta(meta_path, meta)
    f = len(fields)
    splits = {}
    for s in SPLITS:
        x = _map(path / f"{s}.x.bin", X_DTYPE, (rows[s], f))
        y = _map(path / f"{s}.y.bin", Y_DTYPE, (rows[s],))
        p = _map(path / f"{s}.p.bin", P_DTYPE, (rows[s],)) if meta.get("has_prob") else None
        splits[s] = Split(x, y, p)
    try:
        integrity.check(meta_path, meta, array_files(path, f, bool(meta.get("has_prob"))), names, cards, verify)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{meta_path}: malformed ({type(exc).__name__}: {exc}); prepare the dataset again") from None
    return CTRDataset(field_names=names, cardinalities=cards, splits=splits, meta=meta)


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
        if name not in array_file_names(bool(meta.get("has_prob"))):
            raise bad(f"files.{name}", "only the array files of the dataset", entry)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise bad(f"files.{name}", 'an object with a "sha256" string', entry)
        integer(f"files.{name}.bytes", entry.get("bytes", ...), 0, 2**62)
    return fields, [fd["name"] for fd in fields], [fd["cardinality"] for fd in fields], rows


def identity(path: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What identifies a prepared dataset's content: its fields and each array file's SHA-256
    (from meta.json, which `load_prepared(verify=True)` checked against the files; hashed now for
    folders prepared before meta.json recorded them) and one fingerprint over both."""
    path = Path(path)
    files = array_files(path, len(meta["fields"]), bool(meta.get("has_prob")))
    recorded = meta.get("files") or {}
    if all(f.path.name in recorded for f in files):
        shas = {f.path.name: recorded[f.path.name]["sha256"] for f in files}
    else:
        shas = dict(zip((f.path.name for f in files), integrity.sha256_files([f.path for f in files])))
    fields = [[fd["name"], fd.get("kind"), fd["cardinality"]] for fd in meta["fields"]]
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
) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """Yield (x LongTensor [b, f], y FloatTensor [b]) batches by slicing rows [start, stop).

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
        xb = np.asarray(split.x[b0:b1])
        yb = np.asarray(split.y[b0:b1])
        if shuffle_seed is not None:
            order = np.random.default_rng([*shuffle_seed, 1, int(b0)]).permutation(b1 - b0)
            xb, yb = xb[order], yb[order]
        x_t = torch.from_numpy(xb.astype(np.int64, copy=False))
        y_t = torch.from_numpy(yb.astype(np.float32, copy=False))
        for i in range(skip_batches * batch_size, b1 - b0, batch_size):
            yield x_t[i : i + batch_size], y_t[i : i + batch_size]
        skip_batches = 0
