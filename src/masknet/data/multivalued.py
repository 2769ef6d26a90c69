"""Multi-valued (list / sequence) fields: schema entries, tokenizing, the fitted encoder, stats.

A schema's `multi_valued:` list names columns that hold several values per row:

    multi_valued:
      - {name: genres, separator: "|", max_len: 8}            # "Action|Comedy"
      - {name: history, column: clicks, max_len: 50, keep: last, pooling: sum, hash_buckets: 100000}
      - {name: tags, max_len: 10, weight_separator: ":"}      # "sports:0.7|news:0.3"
      - {name: kw, max_len: 10, weight_column: kw_w}          # weights "0.5|1.0" in column kw_w

Keys: name (required), column (default: name), max_len (required: values kept per row),
separator (default "|"; ignored for a Parquet list column, which is read as a list), pooling
(mean, the default, sum or max), keep (first, the default, or last: which values a list longer
than max_len keeps; `last` keeps the most recent of a time-ordered history), min_count (default:
the schema's), hash_buckets, and at most one of weight_separator (each value written
`value<sep>weight`) and weight_column (a parallel column of as many weights).

Tokens: the raw value is split at the separator (a literal string, not a pattern); empty pieces
are dropped (a trailing separator is harmless); a missing value (one of `missing_values`, or a
Parquet null) and a value with no pieces are the empty list. Each piece is a category token
exactly like a single categorical field's value: vocabulary fitted on the train rows with the
minimum count (0 = padding and empty, 1 = out-of-vocabulary, 2.. = vocabulary, most frequent
first), or 64-bit FNV-1a hashing. Stored per row as the first (or last) max_len ids,
left-aligned, padded with 0 (data.batch; dataset.py stores them beside x).

Vectorized over each chunk's distinct raw values: a value is split and padded once per chunk,
however often it repeats (as for single fields, encoder.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from ..errors import DataError
from .batch import POOLINGS, MultiValuedField
from .encoder import MISSING, OOV, FieldEncoder, as_string, fit_field, parse_numbers, to_numpy
from .schema import FieldSpec

KEEP = ("first", "last")
DEFAULT_SEPARATOR = "|"  # MovieLens' genres, DeepCTR's and FuxiCTR's examples
ENTRY_KEYS = (
    "name", "column", "separator", "max_len", "pooling", "keep", "min_count", "hash_buckets", "weight_separator", "weight_column",
)


@dataclass
class MultiValuedSpec:
    """How one multi-valued field is read from its raw column (see the module docstring)."""

    name: str
    column: str
    max_len: int
    separator: str = DEFAULT_SEPARATOR
    pooling: str = "mean"
    keep: str = "first"
    min_count: int = 1
    hash_buckets: Optional[int] = None
    weight_separator: Optional[str] = None
    weight_column: Optional[str] = None

    @property
    def weighted(self) -> bool:
        return self.weight_separator is not None or self.weight_column is not None

    @property
    def kind(self) -> str:
        return "multi_valued"

    def columns(self) -> list[str]:
        return [self.column] + ([self.weight_column] if self.weight_column else [])

    def token_spec(self) -> FieldSpec:
        """The categorical field each value is encoded as (vocabulary or hashing)."""
        return FieldSpec(self.name, self.column, "category", self.min_count, self.hash_buckets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MultiValuedSpec":
        return cls(**d)


# ---------------------------------------------------------------------------
# Schema entries


def _entry_lines(text: str) -> tuple[Optional[int], list[tuple[int, dict[str, int]]]]:
    """The line of the schema's `multi_valued` key, and per entry its line and the line of each of its keys."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return None, []
    if not isinstance(root, yaml.MappingNode):
        return None, []
    for key, value in root.value:
        if getattr(key, "value", None) == "multi_valued":
            out = []
            for item in value.value if isinstance(value, yaml.SequenceNode) else []:
                keys = {}
                if isinstance(item, yaml.MappingNode):
                    keys = {k.value: k.start_mark.line + 1 for k, _ in item.value if isinstance(k, yaml.ScalarNode)}
                out.append((item.start_mark.line + 1, keys))
            return key.start_mark.line + 1, out
    return None, []


def parse_schema_entries(
    entries: Any, path: str, text: str, delimiter: str, min_count: int, quoting: bool = True
) -> list[MultiValuedSpec]:
    """The schema's `multi_valued:` list -> specs. Errors name the schema file, its line, the entry and the field."""
    key_line, lines = _entry_lines(text)
    if not isinstance(entries, list):
        line = f"line {key_line}: " if key_line else ""
        raise DataError(f"{path}: {line}multi_valued: expected a list of mappings like {{name: genres, separator: '|', max_len: 8}}")
    specs = []
    for i, entry in enumerate(entries):
        line, key_lines = lines[i] if i < len(lines) else (None, {})
        name = entry.get("name") if isinstance(entry, dict) else None

        def fail(msg: str, key: Optional[str] = None) -> DataError:
            at = key_lines.get(key, line) if key else line
            where = f"{path}: line {at}: " if at else f"{path}: "
            what = f"multi_valued[{i}]" + (f" (field {name!r})" if isinstance(name, str) else "")
            return DataError(f"{where}{what}: {msg}")

        specs.append(_parse_entry(entry, fail, delimiter, min_count, quoting))
    return specs


def _parse_entry(entry: Any, fail, delimiter: str, min_count: int, quoting: bool) -> MultiValuedSpec:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise fail("expected a mapping with 'name' and 'max_len', e.g. {name: genres, separator: '|', max_len: 8}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}; known: {', '.join(ENTRY_KEYS)}", unknown[0])

    def integer(key: str, default: Any) -> Any:
        v = entry.get(key, default)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise fail(f"{key}: expected an integer >= 1, got {v!r}", key)
        return v

    def choice(key: str, options: Sequence[str], default: str) -> str:
        v = entry.get(key, default)
        if v not in options:
            raise fail(f"{key}: expected {' or '.join(options)}, got {v!r}", key)
        return v

    if "max_len" not in entry:
        raise fail("max_len: required (the number of values kept per row, e.g. max_len: 8)")
    spec = MultiValuedSpec(
        name=entry["name"],
        column=str(entry.get("column", entry["name"])),
        max_len=integer("max_len", None),
        separator=entry.get("separator", DEFAULT_SEPARATOR),
        pooling=choice("pooling", POOLINGS, "mean"),
        keep=choice("keep", KEEP, "first"),
        min_count=integer("min_count", min_count),
        hash_buckets=integer("hash_buckets", None),
        weight_separator=entry.get("weight_separator"),
        weight_column=entry.get("weight_column"),
    )
    _check_separator(spec.separator, "separator", delimiter, quoting, fail)
    if spec.weight_separator is not None:
        _check_separator(spec.weight_separator, "weight_separator", delimiter, quoting, fail)
        if spec.weight_separator in spec.separator or spec.separator in spec.weight_separator:
            raise fail(f"weight_separator {spec.weight_separator!r} and separator {spec.separator!r} must differ "
                       "(neither may contain the other)", "weight_separator")
    if spec.weight_column is not None:
        if not isinstance(spec.weight_column, str) or not spec.weight_column:
            raise fail(f"weight_column: expected a column name, got {spec.weight_column!r}", "weight_column")
        if spec.weight_separator is not None:
            raise fail("give weight_separator (value:weight tokens) or weight_column, not both", "weight_column")
        if spec.weight_column == spec.column:
            raise fail("weight_column: must be another column than the values'", "weight_column")
    return spec


def _check_separator(sep: Any, key: str, delimiter: str, quoting: bool, fail) -> None:
    if not isinstance(sep, str) or not sep:
        raise fail(f"{key}: expected a non-empty string, got {sep!r}", key)
    if delimiter in sep:
        raise fail(f"{key} {sep!r}: contains the file's delimiter {delimiter!r}, which would split the column; "
                   "choose another separator (or another delimiter)", key)
    if "\n" in sep or "\r" in sep or (quoting and '"' in sep):
        raise fail(f"{key} {sep!r}: a line break or a double quote cannot separate values", key)


# ---------------------------------------------------------------------------
# Tokenizing a chunk


@dataclass
class MultiChunk:
    """One multi-valued field of a chunk: per row, the kept values as indices into `tokens`."""

    ids: np.ndarray  # int32 [n, max_len]: index into `tokens`, -1 = padding
    tokens: pa.Array  # string: the distinct values of the chunk
    lengths: np.ndarray  # int32 [n]: values per row before truncation (0: an empty or missing list)
    weights: Optional[np.ndarray] = None  # float32 [n, max_len], 0 at padding (weighted fields)


@dataclass
class _Lists:
    """Per distinct raw value (or per row, for list columns): the pieces, padded."""

    ix: np.ndarray  # int64 [n rows] -> entry, -1 = missing
    lengths: np.ndarray  # int64 [entries] pieces per entry
    raw: pa.Array  # the entries' raw values (for messages)
    pieces: pa.Array  # string, the kept pieces of every entry, in order
    parents: np.ndarray  # int64 [pieces] the entry of each piece


def _lists(arr: pa.Array, sep: str, column: str) -> _Lists:
    """The column's values as lists of string pieces (split at `sep`, or a list column as it is)."""
    if pa.types.is_dictionary(arr.type):
        values = arr.dictionary
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            raise DataError(f"column {column!r}: a multi-valued field needs a list column or a text column with a separator, "
                            f"found values of type {values.type}")
        ind = arr.indices
        ix = to_numpy(ind.fill_null(-1) if ind.null_count else ind).astype(np.int64)
        lists = pc.split_pattern(values, sep)
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        ix = np.arange(len(arr), dtype=np.int64)
        if arr.null_count:
            ix[~to_numpy(arr.is_valid())] = -1
        lists = arr
    else:
        raise DataError(f"column {column!r}: a multi-valued field needs a list column or a text column with a separator, "
                        f"found values of type {arr.type}")
    flat = pc.list_flatten(lists)
    parents = to_numpy(pc.list_parent_indices(lists)).astype(np.int64)
    pieces = as_string(flat) if len(flat) else pa.array([], pa.string())
    # empty pieces (a trailing separator) and nulls inside a Parquet list are not values
    keep = to_numpy(pc.fill_null(pc.not_equal(pieces, ""), False)).astype(bool) if len(pieces) else np.zeros(0, bool)
    if not keep.all():
        pieces, parents = pieces.filter(pa.array(keep)), parents[keep]
    lengths = np.bincount(parents, minlength=len(lists)).astype(np.int64)
    return _Lists(ix, lengths, lists if not pa.types.is_dictionary(arr.type) else arr.dictionary, pieces, parents)


def _pad(codes: np.ndarray, lengths: np.ndarray, max_len: int, keep: str, fill: Any, dtype: Any) -> np.ndarray:
    """[entries + 1, max_len]: each entry's first (or last) max_len codes, left-aligned; the extra
    last row is all `fill` (the row that index -1, a missing value, picks)."""
    starts = np.cumsum(lengths) - lengths
    take = np.minimum(lengths, max_len)
    first = starts if keep == "first" else starts + lengths - take
    out = np.full((len(lengths) + 1, max_len), fill, dtype=dtype)
    j = np.arange(max_len)
    valid = j[None, :] < take[:, None]
    out[:-1][valid] = codes[(first[:, None] + j[None, :])[valid]]
    return out


def tokenize(mv: MultiValuedSpec, columns: dict[str, pa.Array], n: int) -> tuple[MultiChunk, list[tuple]]:
    """Tokenize one chunk's column for `mv`. Returns the chunk and its checks: (rows_bad, column,
    kind, message, raw values, per-row index into them) for rows.parse_chunk's flag()."""
    lists = _lists(columns[mv.column], mv.separator, mv.column)
    checks: list[tuple] = []
    pieces, w_piece = lists.pieces, None
    if mv.weight_separator is not None:
        pieces, w_piece, bad_piece, message = _split_weights(pieces, mv.weight_separator)
        if bad_piece is not None:
            bad_entry = np.zeros(len(lists.lengths), bool)
            bad_entry[lists.parents[bad_piece]] = True
            rows = (lists.ix >= 0) & bad_entry[np.maximum(lists.ix, 0)]
            checks.append((rows, mv.column, "bad_value", message, lists.raw, lists.ix))
    enc = pc.dictionary_encode(pieces) if len(pieces) else pa.array([], pa.string()).dictionary_encode()
    codes = to_numpy(enc.indices).astype(np.int32)
    lengths_ext = np.append(lists.lengths, 0)
    ids = _pad(codes, lists.lengths, mv.max_len, mv.keep, -1, np.int32)[lists.ix]
    row_lengths = lengths_ext[lists.ix].astype(np.int32)
    weights = None
    if w_piece is not None:
        weights = _pad(w_piece, lists.lengths, mv.max_len, mv.keep, 0.0, np.float32)[lists.ix]
    elif mv.weight_column is not None:
        weights = _weight_column(mv, columns[mv.weight_column], row_lengths, checks)
    return MultiChunk(ids, enc.dictionary, row_lengths, weights), checks


def _split_weights(pieces: pa.Array, wsep: str) -> tuple[pa.Array, np.ndarray, Optional[np.ndarray], str]:
    """`value<wsep>weight` pieces -> (values, float32 weights, bad piece mask or None, message)."""
    if len(pieces) == 0:
        return pieces, np.zeros(0, np.float32), None, ""
    has = to_numpy(pc.match_substring(pieces, wsep)).astype(bool)
    fixed = pieces if has.all() else pc.if_else(pa.array(has), pieces, pc.binary_join_element_wise(pieces, pa.scalar("1"), wsep))
    parts = pc.split_pattern(fixed, wsep, max_splits=1, reverse=True)
    values, weight_text = pc.list_element(parts, 0), pc.list_element(parts, 1)
    w, bad = parse_numbers(weight_text)
    bad = bad | ~has
    message = f"expected values written value{wsep}weight with a numeric weight"
    return values, np.where(bad, 0.0, w).astype(np.float32), (bad if bad.any() else None), message


def _weight_column(mv: MultiValuedSpec, arr: pa.Array, row_lengths: np.ndarray, checks: list) -> np.ndarray:
    wl = _lists(arr, mv.separator, mv.weight_column)
    w, bad = parse_numbers(wl.pieces) if len(wl.pieces) else (np.zeros(0), np.zeros(0, bool))
    if bad.any():
        bad_entry = np.zeros(len(wl.lengths), bool)
        bad_entry[wl.parents[bad]] = True
        rows = (wl.ix >= 0) & bad_entry[np.maximum(wl.ix, 0)]
        checks.append((rows, mv.weight_column, "bad_number", "not a number", wl.raw, wl.ix))
    counts = np.append(wl.lengths, 0)[wl.ix]
    mismatch = counts != row_lengths
    if mismatch.any():
        checks.append((mismatch, mv.weight_column, "bad_value", f"needs one weight per value of {mv.column!r}", wl.raw, wl.ix))
    return _pad(np.where(bad, 0.0, w).astype(np.float32), wl.lengths, mv.max_len, mv.keep, 0.0, np.float32)[wl.ix]


# ---------------------------------------------------------------------------
# The fitted encoder of a multi-valued field


@dataclass
class MultiValuedEncoder:
    """A multi-valued field's spec + the categorical encoder of its values."""

    spec: MultiValuedSpec
    values: FieldEncoder  # vocabulary (or hashing) of the field's values

    @property
    def cardinality(self) -> int:
        return self.values.cardinality

    def codes(self, tokens: pa.Array) -> np.ndarray:
        return self.values.codes(tokens)

    def lookup(self, chunk: MultiChunk) -> np.ndarray:
        """int32 [n, max_len]: the chunk's ids (0 = padding)."""
        return self.values.lookup_table(chunk.tokens)[chunk.ids]  # -1 (padding) -> 0

    def field(self) -> MultiValuedField:
        return MultiValuedField(self.spec.name, self.cardinality, self.spec.max_len, self.spec.pooling, self.spec.weighted)

    def to_dict(self) -> dict[str, Any]:
        d = self.values.to_dict()
        d.update(kind="multi_valued", max_len=self.spec.max_len, pooling=self.spec.pooling, weighted=self.spec.weighted)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], spec: MultiValuedSpec) -> "MultiValuedEncoder":
        """From its encoder.json entry; `spec` is the dataset spec's entry for the field."""
        vocab = None
        if d["vocab"] is not None:
            vocab = pa.array(d["vocab"], pa.string())
        return cls(spec, FieldEncoder(spec.token_spec(), vocab, d.get("distinct_in_train", 0)))


def fit_multi(spec: MultiValuedSpec, counts: Optional[pa.Table]) -> MultiValuedEncoder:
    return MultiValuedEncoder(spec, fit_field(spec.token_spec(), counts))


def meta_entry(enc: MultiValuedEncoder) -> dict[str, Any]:
    """The field's entry in meta.json's `multi_valued` list (what the model needs)."""
    return {"kind": "multi_valued", **enc.field().to_dict()}


def encode_chunk(encoders: Sequence[MultiValuedEncoder], chunks: Sequence[MultiChunk], rows: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(seq int32 [n, ΣL], weights float32 [n, ΣL] or None) for `rows` of a parsed chunk."""
    seq = np.concatenate([e.lookup(c)[rows] for e, c in zip(encoders, chunks)], axis=1)
    if not any(e.spec.weighted for e in encoders):
        return seq, None
    w = np.concatenate([
        (c.weights[rows] if c.weights is not None else np.ones((len(seq), e.spec.max_len), np.float32)) for e, c in zip(encoders, chunks)
    ], axis=1)
    return seq, np.where(seq != 0, w, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------
# Statistics (prepare's meta.json)


@dataclass
class LengthStats:
    """Per split: a histogram of list lengths (before truncation), truncated rows, values and OOV values."""

    max_len: int
    hist: list[np.ndarray] = field(default_factory=lambda: [np.zeros(1, np.int64) for _ in range(3)])
    values: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))
    oov: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))
    with_separator: int = 0  # rows whose raw value had more than one piece

    def add_lengths(self, lengths: np.ndarray, codes: np.ndarray) -> None:
        for s in range(3):
            h = np.bincount(lengths[codes == s], minlength=1)
            if len(h) > len(self.hist[s]):
                h[: len(self.hist[s])] += self.hist[s]
                self.hist[s] = h
            else:
                self.hist[s][: len(h)] += h
        self.with_separator += int(np.count_nonzero(lengths > 1))

    def add_ids(self, ids: np.ndarray, codes: np.ndarray) -> None:
        for s in range(3):
            m = codes == s
            if m.any():
                block = ids[m]
                self.values[s] += int(np.count_nonzero(block != MISSING))
                self.oov[s] += int(np.count_nonzero(block == OOV))

    def to_dict(self, splits: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s, name in enumerate(splits):
            h = self.hist[s]
            rows = int(h.sum())
            if rows == 0:
                out[name] = None
                continue
            cdf = np.cumsum(h)
            pct = {f"p{q}": int(np.searchsorted(cdf, q / 100 * rows)) for q in (50, 90, 99)}
            lengths = np.arange(len(h))
            out[name] = {
                "rows": rows,
                "mean_length": float((h * lengths).sum() / rows),
                "length_percentiles": {**pct, "max": int(lengths[h > 0].max())},
                "empty_rate": float(h[0] / rows),
                "truncated_rows": int(h[self.max_len + 1 :].sum()),
                "truncated_rate": float(h[self.max_len + 1 :].sum() / rows),
                "oov_rate": float(self.oov[s] / self.values[s]) if self.values[s] else None,
            }
        return out


# ---------------------------------------------------------------------------
# JSON values (serving): a list, a separator string or null per row


class ListValueError(ValueError):
    """A request value that is not a list of values; `row` is the offending row, `column` the
    column when it is not the field's own (its weight column)."""

    def __init__(self, row: int, message: str, column: Optional[str] = None):
        super().__init__(message)
        self.row, self.column = row, column


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", float: "a number", int: "a number"}.get(type(v), "null" if v is None else type(v).__name__)


def _as_piece(v: Any) -> Optional[str]:
    if isinstance(v, str):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return str(int(v))  # as a Parquet/CSV number is written (encoder.as_string)
    return str(v) if isinstance(v, int) else repr(v)


def _too_long(i: int, v: str, max_chars: Optional[int]) -> None:
    if max_chars is not None and len(v) > max_chars:
        raise ListValueError(i, f"a value of {len(v):,} characters; the longest allowed is {max_chars:,} (masknet serve --max-value-chars)")


def _py_lists(values: Sequence, sep: str, what: str, max_chars: Optional[int] = None) -> list[list[str]]:
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append([])
        elif isinstance(v, str):
            _too_long(i, v, max_chars)
            out.append([p for p in v.split(sep) if p])
        elif isinstance(v, list):
            row = []
            for item in v:
                p = _as_piece(item)
                if p is None:
                    raise ListValueError(i, f"a list of {what}s holds strings or numbers, got {_kind(item)}: {item!r}")
                _too_long(i, p, max_chars)
                if p:
                    row.append(p)
            out.append(row)
        else:
            raise ListValueError(i, f"expected a list (JSON array) or a {sep!r}-separated string, got {_kind(v)}: {v!r}")
    return out


def encode_values(
    enc: MultiValuedEncoder, values: Sequence, weight_values: Optional[Sequence] = None, max_chars: Optional[int] = None
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Request values (per row: a JSON list, a separator string or null) -> (ids int64 [n, max_len],
    weights float32 [n, max_len] or None), exactly as `prepare` encodes the same raw values.
    A string (or list item) longer than `max_chars` is refused."""
    mv = enc.spec
    rows = _py_lists(values, mv.separator, "value", max_chars)
    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    flat = pa.array([p for r in rows for p in r], pa.string())
    w = None
    if mv.weight_separator is not None:
        flat, wf, bad, message = _split_weights(flat, mv.weight_separator)
        if bad is not None:
            raise ListValueError(int(np.repeat(np.arange(len(rows)), lengths)[np.argmax(bad)]), message)
        w = wf
    elif mv.weight_column is not None:
        try:
            wrows = _py_lists(weight_values if weight_values is not None else [None] * len(rows), mv.separator, "weight", max_chars)
        except ListValueError as exc:
            raise ListValueError(exc.row, str(exc), mv.weight_column) from None
        for i, (r, wr) in enumerate(zip(rows, wrows)):
            if len(wr) != len(r):
                raise ListValueError(i, f"needs one weight per value of {mv.column!r} ({len(r)}), got {len(wr)}", mv.weight_column)
        wv, bad = parse_numbers(pa.array([p for r in wrows for p in r], pa.string()))
        if bad.any():
            raise ListValueError(int(np.repeat(np.arange(len(rows)), lengths)[np.argmax(bad)]), "not a number", mv.weight_column)
        w = wv.astype(np.float32)
    codes = enc.codes(flat).astype(np.int64) if len(flat) else np.zeros(0, np.int64)
    ids = _pad(codes, lengths, mv.max_len, mv.keep, MISSING, np.int64)[:-1]
    weights = None if w is None else _pad(w, lengths, mv.max_len, mv.keep, 0.0, np.float32)[:-1]
    return ids, weights


def token_counts(ids: np.ndarray, n_tokens: int) -> np.ndarray:
    """Occurrences of each token in `ids` ([rows, max_len] indices into the tokens, -1 = padding)."""
    return np.bincount(ids.ravel() + 1, minlength=n_tokens + 1)[1:]


# ---------------------------------------------------------------------------
# prepare's spill (pass 1 -> pass 2), beside the single-valued fields' (spill.Spill)


@dataclass
class MultiWindow:
    """One spilled window of one multi-valued field."""

    ids: np.ndarray  # int32 [rows, max_len]: index into `tokens`, -1 = padding
    tokens: pa.Array  # the window's distinct values
    weights: Optional[np.ndarray]  # float32 [rows, max_len] or None


class MultiSpill:
    """The multi-valued fields' part of a spilled window: per field, the rows' value indices
    ([rows, max_len] int32, one reused buffer), the window's distinct values (Arrow IPC) and the
    weights. Windows are cut where prepare's _Spill cuts them (it calls add/flush in step)."""

    def __init__(self, folder: Any, specs: Sequence[MultiValuedSpec]):
        self.folder, self.specs = folder, list(specs)
        self._ids = [open(folder / f"mv{j}.ids.bin", "wb") for j in range(len(self.specs))]
        self._w = [open(folder / f"mv{j}.w.bin", "wb") if s.weighted else None for j, s in enumerate(self.specs)]
        self._tok: list = [None] * len(self.specs)
        self._buf = [np.empty((0, s.max_len), np.int32) for s in self.specs]
        self._wbuf = [np.empty((0, s.max_len), np.float32) for s in self.specs]
        self._tokens: list[list[pa.Array]] = [[] for _ in self.specs]
        self._chunk_rows: list[int] = []

    def add(self, chunks: Sequence[MultiChunk], good: np.ndarray, start: int, end: int, grow_to: int) -> None:
        all_good = bool(good.all())
        for j, c in enumerate(chunks):
            if end > len(self._buf[j]):  # the first window (or an unusually large chunk): grow once
                self._buf[j] = _grown(self._buf[j], grow_to, start)
                if self.specs[j].weighted:
                    self._wbuf[j] = _grown(self._wbuf[j], grow_to, start)
            self._buf[j][start:end] = c.ids if all_good else c.ids[good]
            if c.weights is not None:
                self._wbuf[j][start:end] = c.weights if all_good else c.weights[good]
            self._tokens[j].append(c.tokens)
        self._chunk_rows.append(end - start)

    def flush(self, rows: int) -> list[MultiWindow]:
        """Write the window's rows; returns them (views of the reused buffers: valid until the next add)."""
        out = []
        chunk_rows, self._chunk_rows = self._chunk_rows, []
        for j, spec in enumerate(self.specs):
            ids = self._buf[j][:rows]
            parts, self._tokens[j] = self._tokens[j], []
            tokens = _merge_tokens(ids, parts, chunk_rows) if len(parts) > 1 else (parts[0] if parts else pa.array([], pa.string()))
            self._ids[j].write(ids)
            w = self._wbuf[j][:rows] if spec.weighted else None
            if w is not None:
                self._w[j].write(w)
            if self._tok[j] is None:
                self._tok[j] = pa.ipc.new_stream(str(self.folder / f"mv{j}.tok.arrow"), pa.schema([("t", pa.string())]))
            self._tok[j].write_batch(pa.record_batch([tokens.cast(pa.string())], names=["t"]))
            out.append(MultiWindow(ids, tokens, w))
        return out

    def close_writers(self) -> None:
        for fh in self._ids + [w for w in self._w if w is not None]:
            fh.close()
        for t in self._tok:
            if t is not None:
                try:
                    t.close()
                except (pa.ArrowInvalid, OSError):
                    pass
        self._tok = [None] * len(self.specs)

    def windows(self, window_rows: Sequence[int]):
        """Per window (in order written), the list of MultiWindow per field. Reused buffers."""
        self.close_writers()
        self._buf = [np.empty((0, s.max_len), np.int32) for s in self.specs]
        self._wbuf = [np.empty((0, s.max_len), np.float32) for s in self.specs]
        cap = max(window_rows, default=0)
        bufs = [np.empty((cap, s.max_len), np.int32) for s in self.specs]
        wbufs = [np.empty((cap, s.max_len), np.float32) if s.weighted else None for s in self.specs]
        files = [open(self.folder / f"mv{j}.ids.bin", "rb") for j in range(len(self.specs))]
        wfiles = [open(self.folder / f"mv{j}.w.bin", "rb") if s.weighted else None for j, s in enumerate(self.specs)]
        # plain file handles: a memory-mapped IPC file's pages would stay resident (see spill.Spill)
        readers = [pa.ipc.open_stream(pa.OSFile(str(self.folder / f"mv{j}.tok.arrow"))) for j in range(len(self.specs))] if window_rows else []
        try:
            for rows in window_rows:
                out = []
                for j in range(len(self.specs)):
                    ids = bufs[j][:rows]
                    if files[j].readinto(ids) != ids.nbytes:
                        raise OSError(f"{self.folder / f'mv{j}.ids.bin'}: spill file is shorter than written")
                    w = None
                    if wbufs[j] is not None:
                        w = wbufs[j][:rows]
                        wfiles[j].readinto(w)
                    out.append(MultiWindow(ids, readers[j].read_next_batch().column(0), w))
                yield out
        finally:
            for fh in files + [w for w in wfiles if w is not None]:
                fh.close()


def _grown(buf: np.ndarray, rows: int, keep: int) -> np.ndarray:
    grown = np.empty((rows, buf.shape[1]), dtype=buf.dtype)
    grown[:keep] = buf[:keep]
    return grown


def _merge_tokens(ids: np.ndarray, parts: list[pa.Array], chunk_rows: list[int]) -> pa.Array:
    """One dictionary for the window's chunks. `ids` holds the chunks' rows one after another, each
    indexing its own chunk's tokens; they are remapped in place into the merged dictionary."""
    bases = np.cumsum([0] + [len(t) for t in parts[:-1]]).astype(np.int32)
    ids += np.where(ids >= 0, np.repeat(bases, chunk_rows)[:, None], np.int32(0))
    enc = pc.dictionary_encode(pa.concat_arrays(parts))
    remap = np.append(to_numpy(enc.indices).astype(np.int32), np.int32(-1))  # -1 (padding) -> the last slot
    ids[:] = remap[ids]
    return enc.dictionary


def encode_indices(field: MultiValuedField, values: Sequence) -> np.ndarray:
    """Already-encoded ids (models trained on the built-in data): per row a JSON list of integers in
    [1, cardinality) or null -> int64 [n, max_len], the first max_len kept (0 = padding)."""
    out = np.zeros((len(values), field.max_len), np.int64)
    for i, v in enumerate(values):
        if v is None:
            continue
        if not isinstance(v, list):
            raise ListValueError(i, f"expected a list (JSON array) of integer ids, got {_kind(v)}: {v!r}")
        for item in v:
            if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item < field.cardinality:
                raise ListValueError(i, f"expected integer ids in [1, {field.cardinality}) (this model was trained on "
                                        f"already-encoded data), got {item!r}")
        kept = v[: field.max_len]
        out[i, : len(kept)] = kept
    return out
