"""Field transforms, vocabulary fitting and the saved encoder.

Index convention, every field:   0 = missing,  1 = out-of-vocabulary,  2.. = vocabulary
(or, for a hashed field, 2 + hash bucket). A field's cardinality counts those two.

Everything is vectorized over Arrow *dictionary* arrays: a chunk's column is a small
array of distinct raw values plus int32 indices, so a value is parsed, validated,
counted and looked up once per chunk however often it repeats.

Numeric fields (transform `log_bucket`, the Criteo convention) are discretized into
integer tokens that then get a vocabulary like categories do:

    x <= 2   ->  floor(x)                 (0, 1, 2 and each negative integer: their own buckets)
    x > 2    ->  1000 + floor(ln(x)^2)    (the 1000 keeps these apart from the small values)
    missing  ->  index 0

A raw value that is not a number is a bad line, never a silent missing value. Accepted
numbers: optional sign, digits, optional fraction, optional exponent (`-1`, `3.0`,
`1e5`); `nan`, `inf` and anything else are rejected.

Hashing (for fields too large for a vocabulary): 64-bit FNV-1a of the value's UTF-8 bytes,
modulo the number of buckets. Stable across runs, machines and library versions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError
from .schema import DatasetSpec, FieldSpec

ENCODER_FORMAT = "masknet-encoder"
ENCODER_VERSION = 1
MULTI_VALUED_VERSION = 2  # written only by encoders with multi-valued fields (older masknets refuse them)
MISSING, OOV, FIRST = 0, 1, 2
LARGE_OFFSET = 1000
NUMBER_RE = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$"
HOUR_RE = r"^[0-9]{8}$"
LIBFM_RE = r"^([0-9]+):1(\.0*)?$"


# ---------------------------------------------------------------------------
# Transforms on the distinct values of a chunk


@dataclass
class Tokens:
    """Tokens for the distinct raw values of a chunk; `bad[i]` marks raw value i as invalid."""

    tokens: pa.Array  # string or int64, same length as the raw values (bad ones: anything)
    bad: Optional[np.ndarray] = None  # bool per raw value, None = all good
    message: str = ""  # what a bad value is, e.g. "not a number"
    kind: str = "bad_value"


def to_numpy(arr: pa.Array) -> np.ndarray:
    """An Arrow array as NumPy: zero-copy where Arrow's layout allows, else a copy (nulls, booleans, strings)."""
    return arr.to_numpy(zero_copy_only=False)


_np = to_numpy  # this module's short name for it


def as_string(values: pa.Array) -> pa.Array:
    """Raw values as an Arrow string array (Parquet numbers as written: 5.0 -> "5")."""
    if pa.types.is_string(values.type):
        return values
    if pa.types.is_large_string(values.type):
        return values.cast(pa.string())
    if pa.types.is_floating(values.type):  # Parquet floats: 5.0 -> "5", like the integer 5
        f = _np(values.cast(pa.float64()))
        integral = np.isfinite(f) & (f == np.floor(f)) & (np.abs(f) < 2**53)
        as_int = pa.array(np.where(integral, f, 0).astype(np.int64)).cast(pa.string())
        return pc.if_else(pa.array(integral), as_int, values.cast(pa.string()))
    return values.cast(pa.string())


_as_string = as_string  # this module's short name for it


def parse_numbers(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """float64 per value and a bad mask (unparsable or not finite)."""
    if pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_boolean(values.type):
        f = _np(values.cast(pa.float64()))
        return f, ~np.isfinite(f)
    s = _as_string(values)
    ok = _np(pc.match_substring_regex(s, NUMBER_RE))
    if ok.all():
        f = _np(s.cast(pa.float64()))
    else:
        f = np.full(len(s), np.nan)
        if ok.any():
            f[ok] = _np(s.filter(pa.array(ok)).cast(pa.float64()))
    bad = ~ok | ~np.isfinite(f)
    return f, bad


def log_bucket(x: np.ndarray) -> np.ndarray:
    """Criteo discretization of finite floats: int64 tokens (see the module docstring)."""
    out = np.empty(len(x), dtype=np.int64)
    small = x <= 2
    out[small] = np.floor(np.maximum(x[small], -(2.0**62)))
    with np.errstate(divide="ignore", invalid="ignore"):
        out[~small] = LARGE_OFFSET + np.floor(np.log(x[~small]) ** 2)
    return out


def _avazu_hour(values: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """YYMMDDHH -> (hour, weekday, yymmddhh int, bad)."""
    s = _as_string(values)
    ok = _np(pc.match_substring_regex(s, HOUR_RE))
    n = len(s)
    hh = np.zeros(n, np.int64)
    wd = np.zeros(n, np.int64)
    v = np.zeros(n, np.int64)
    if ok.any():
        v[ok] = _np(s.filter(pa.array(ok)).cast(pa.int64()))
    yy, mm, dd, hh = v // 1000000, v // 10000 % 100, v // 100 % 100, v % 100
    ok &= (mm >= 1) & (mm <= 12) & (dd >= 1) & (dd <= 31) & (hh <= 23)
    months = np.where(ok, (2000 + yy - 1970) * 12 + mm - 1, 0).astype("datetime64[M]")
    days = months.astype("datetime64[D]") + np.where(ok, dd - 1, 0)
    ok &= days.astype("datetime64[M]") == months  # e.g. Feb 30
    wd = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday
    return hh, wd, v, ~ok


def transform(fs: FieldSpec, values: pa.Array) -> Tokens:
    """Tokens for the distinct raw values of one chunk's column."""
    t = fs.transform
    if t == "category":
        return Tokens(_as_string(values))
    if t == "log_bucket":
        f, bad = parse_numbers(values)
        f = np.where(bad, 0.0, f)
        return Tokens(pa.array(log_bucket(f)), bad if bad.any() else None, "not a number", "bad_number")
    if t in ("hour_of_day", "weekday", "weekend"):
        hh, wd, _, bad = _avazu_hour(values)
        tok = hh if t == "hour_of_day" else (wd if t == "weekday" else (wd >= 5).astype(np.int64))
        return Tokens(pa.array(tok), bad if bad.any() else None, "not a YYMMDDHH hour", "bad_value")
    if t == "libfm":
        s = _as_string(values)
        ok = _np(pc.match_substring_regex(s, LIBFM_RE))
        tok = pc.replace_substring_regex(s, ":.*$", "")  # bad values are flagged, their token unused
        return Tokens(tok, None if ok.all() else ~ok, "expected a libFM feature index:1", "bad_value")
    raise ValueError(f"unknown transform {t!r}")  # FieldSpec validation makes this a bug


def parse_label(values: pa.Array, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Label 0/1 (uint8) per raw value and a bad mask. kind 01: 0/1; pm1: -1/1 (0 also negative);
    ">=T": any number, positive when >= T (a rating made a click-like label); "=V": positive when the
    value, surrounding spaces stripped, is V, else negative (never bad)."""
    if kind.startswith("="):
        s = pc.utf8_trim_whitespace(_as_string(values))
        hit = pc.fill_null(pc.equal(s, pa.scalar(kind[1:], pa.string())), False)
        return _np(hit).astype(np.uint8), np.zeros(len(values), bool)
    if pa.types.is_boolean(values.type):
        return _np(values).astype(np.uint8), np.zeros(len(values), bool)
    f, bad = parse_numbers(values)
    if kind.startswith(">="):
        return (~bad & (f >= float(kind[2:]))).astype(np.uint8), bad
    allowed = (f == 0) | (f == 1) | ((f == -1) if kind == "pm1" else False)
    bad |= ~allowed
    return (f == 1).astype(np.uint8), bad


def parse_time(values: pa.Array, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A sortable int64 per raw value and a bad mask."""
    if kind == "avazu_hour":
        _, _, v, bad = _avazu_hour(values)
        return v, bad
    if kind == "iso":
        if pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
            return _np(values.cast(pa.timestamp("us")).cast(pa.int64())), np.zeros(len(values), bool)
        s = _as_string(values)
        out = np.zeros(len(s), np.int64)
        bad = np.zeros(len(s), bool)
        try:
            out = _np(s.cast(pa.timestamp("us")).cast(pa.int64()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            for i, v in enumerate(s.to_pylist()):  # slow path, only for a chunk with a bad value
                try:
                    out[i] = pa.scalar(v).cast(pa.timestamp("us")).cast(pa.int64()).as_py()
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    bad[i] = True
        return out, bad
    f, bad = parse_numbers(values)
    return np.where(bad, 0, np.floor(np.where(bad, 0, f))).astype(np.int64), bad


# ---------------------------------------------------------------------------
# Hashing


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on each uint64 (a bijection that mixes every bit)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def fnv1a64(strings: pa.Array) -> np.ndarray:
    """64-bit FNV-1a of each string's UTF-8 bytes (nulls hash like the empty string)."""
    s = _as_string(strings)
    if s.offset or s.null_count:
        s = pc.if_else(s.is_valid(), s, pa.scalar("")) if s.null_count else s
        s = pa.concat_arrays([s])  # materialize at offset 0
    n = len(s)
    h = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    if n == 0:
        return h
    bufs = s.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=s.offset * 4).astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    prime = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max(initial=0))):
            live = np.nonzero(lengths > j)[0]
            h[live] = (h[live] ^ data[offsets[live] + j].astype(np.uint64)) * prime
    return h


# ---------------------------------------------------------------------------
# Counting (pass 1) and the fitted encoder


class TokenCounter:
    """Counts of tokens over the training rows, merged in Arrow as chunks arrive.

    Memory grows with the number of distinct values in the training split, not with rows:
    per-chunk counts are buffered and merged (hash group-by) once the buffer outgrows the
    merged table, so the merging work stays linear.
    """

    def __init__(self) -> None:
        self.merged: Optional[pa.Table] = None
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def add(self, tokens: pa.Array, counts: np.ndarray) -> None:
        keep = counts > 0
        if not keep.any():
            return
        t = pa.table({"t": tokens.filter(pa.array(keep)), "c": pa.array(counts[keep].astype(np.int64))})
        self.pending.append(t)
        self.pending_rows += t.num_rows
        if self.pending_rows > max(1 << 16, (self.merged.num_rows if self.merged is not None else 0) // 2):
            self._merge()

    def _merge(self) -> None:
        parts = ([self.merged] if self.merged is not None else []) + self.pending
        if not parts:
            return
        t = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
        self.merged = t.group_by("t").aggregate([("c", "sum")]).rename_columns(["t", "c"])
        self.pending, self.pending_rows = [], 0

    def result(self) -> Optional[pa.Table]:
        self._merge()
        return self.merged


@dataclass
class FieldEncoder:
    spec: FieldSpec
    vocab: Optional[pa.Array]  # tokens in index order (index = 2 + position); None for hashed fields
    distinct_in_train: int = 0  # distinct tokens seen in train, before the minimum count

    @property
    def cardinality(self) -> int:
        if self.spec.hash_buckets:
            return FIRST + self.spec.hash_buckets
        return FIRST + (len(self.vocab) if self.vocab is not None else 0)

    def codes(self, tokens: pa.Array) -> np.ndarray:
        """int32 index for each token (OOV for unseen ones)."""
        if self.spec.hash_buckets:
            return (FIRST + fnv1a64(tokens) % np.uint64(self.spec.hash_buckets)).astype(np.int32)
        if self.vocab is None or len(self.vocab) == 0 or len(tokens) == 0:
            return np.full(len(tokens), OOV, dtype=np.int32)
        if tokens.type != self.vocab.type:
            tokens = tokens.cast(self.vocab.type)
        pos = pc.index_in(tokens, value_set=self.vocab)
        return _np(pc.fill_null(pos, -1)).astype(np.int32) + FIRST if pos.null_count else _np(pos).astype(np.int32) + FIRST

    def lookup_table(self, tokens: pa.Array) -> np.ndarray:
        """`codes(tokens)` and one last slot, 0, that index -1 reads: indexing it with a chunk's
        per-row token index (-1 = missing) gives each row's code, missing -> MISSING (0)
        (multi-valued ids: padding -> 0)."""
        return np.concatenate([self.codes(tokens), np.zeros(1, np.int32)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "kind": self.spec.kind,
            "column": self.spec.column,
            "transform": self.spec.transform,
            "min_count": self.spec.min_count,
            "hash_buckets": self.spec.hash_buckets,
            "cardinality": self.cardinality,
            "distinct_in_train": self.distinct_in_train,
            "token_type": "int64" if self.vocab is not None and pa.types.is_integer(self.vocab.type) else "string",
            "vocab": None if self.vocab is None else self.vocab.to_pylist(),
        }


def fit_field(fs: FieldSpec, counts: Optional[pa.Table]) -> FieldEncoder:
    """Vocabulary: tokens with count >= min_count, most frequent first (ties: token order)."""
    if fs.hash_buckets:
        return FieldEncoder(fs, None, 0 if counts is None else counts.num_rows)
    if counts is None or counts.num_rows == 0:
        return FieldEncoder(fs, pa.array([], pa.string() if fs.transform in ("category", "libfm") else pa.int64()), 0)
    kept = counts.filter(pc.greater_equal(counts["c"], fs.min_count))
    kept = kept.take(pc.sort_indices(kept, sort_keys=[("c", "descending"), ("t", "ascending")]))
    return FieldEncoder(fs, kept["t"].combine_chunks(), counts.num_rows)


class Encoder:
    """The fitted encoder: the dataset spec (how to read and check raw rows) + one FieldEncoder per
    field, and one multivalued.MultiValuedEncoder per multi-valued field."""

    def __init__(self, spec: DatasetSpec, fields: list[FieldEncoder], multi_valued: Optional[list] = None):
        self.spec = spec
        self.fields = fields
        self.multi_valued = list(multi_valued or [])

    @property
    def cardinalities(self) -> list[int]:
        return [f.cardinality for f in self.fields]

    def multi_valued_fields(self) -> list:
        """data.batch.MultiValuedField per multi-valued field (what the model is built with)."""
        return [m.field() for m in self.multi_valued]

    def field_meta(self) -> list[dict[str, Any]]:
        return [{"name": f.spec.name, "kind": f.spec.kind, "cardinality": f.cardinality} for f in self.fields]

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": ENCODER_FORMAT,
            "version": ENCODER_VERSION if not self.multi_valued else MULTI_VALUED_VERSION,
            "index_convention": {"missing": MISSING, "out_of_vocabulary": OOV, "first_vocabulary": FIRST},
            "numeric_tokens": f"x <= 2: floor(x); x > 2: {LARGE_OFFSET} + floor(ln(x)^2)",
            "hashing": "64-bit FNV-1a of the UTF-8 value, modulo hash_buckets, plus 2",
            "spec": self.spec.to_dict(),
            "fields": [f.to_dict() for f in self.fields],
        }
        if self.multi_valued:  # absent otherwise: an encoder without them is byte-identical to before
            d["multi_valued"] = [m.to_dict() for m in self.multi_valued]
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), separators=(",", ":")))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Encoder":
        path = Path(path)
        if path.is_dir():
            path = path / "encoder.json"
        if not path.is_file():
            raise DataError(f"{path}: encoder file not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if d.get("format") != ENCODER_FORMAT or d.get("version") not in (ENCODER_VERSION, MULTI_VALUED_VERSION):
            raise DataError(f"{path}: not a masknet encoder of version {ENCODER_VERSION} or {MULTI_VALUED_VERSION}")
        spec = DatasetSpec.from_dict(d["spec"])
        fields = []
        for fs, fd in zip(spec.fields, d["fields"]):
            vocab = None
            if fd["vocab"] is not None:
                vocab = pa.array(fd["vocab"], pa.int64() if fd.get("token_type") == "int64" else pa.string())
            fields.append(FieldEncoder(fs, vocab, fd.get("distinct_in_train", 0)))
        multi = []
        if d.get("multi_valued"):
            from .multivalued import MultiValuedEncoder

            multi = [MultiValuedEncoder.from_dict(m, ms) for ms, m in zip(spec.multi_valued, d["multi_valued"])]
        return cls(spec, fields, multi)
