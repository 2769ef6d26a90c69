"""Raw feature values from JSON requests -> the model's integer inputs, column-wise.

The serving hot path. A request's rows are turned into one Python list per raw column, and
each column is then handled by Arrow/NumPy as a whole: dictionary-encoded (each distinct value
parsed once), transformed by the saved encoder's own transforms (`data.encoder.transform`: the
same numeric buckets, Avazu hours and libFM indices as `masknet prepare`), and looked up in
the vocabulary with a binary search over a sorted copy built once at start-up (no per-request
hash table over the vocabulary). Unseen categories map to out-of-vocabulary (1), null to
missing (0). Hashed fields use the encoder's FNV-1a hashing.

A value must be a string, a number or null; anything else (a list, an object, true/false), a
missing field, an unknown field or a value the training data would reject (a numeric field
that is not a number, a bad Avazu hour) raises `RequestError`, whose message names the row
and the field.

Bundles trained on the built-in synthetic data have no encoder: their fields take the
already-encoded integer index (0 <= value < cardinality).
"""

from __future__ import annotations

import operator
from collections import Counter
from itertools import chain, repeat
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..data.encoder import FIRST, MISSING, OOV, FieldEncoder, log_bucket, parse_numbers, transform

_FIELD_STRIDE = 1 << 48  # numeric group keys: field * 2^48 + token
_TOKEN_LIMIT = 1 << 46
SHOW_CHARS = 60  # longest part of a bad value quoted in an error message
DEFAULT_MAX_VALUE_CHARS = 1024  # longest string value a request may send (masknet serve --max-value-chars)


class RequestError(ValueError):
    """A bad request; the message names the row and field. `status` is the HTTP status."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def _py_type(v: Any) -> str:
    return {list: "a list", dict: "an object", bool: "a boolean"}.get(type(v), type(v).__name__)


class _Lookup:
    """Token -> index for one vocabulary field: a dict built once at start-up. Looking a value up
    costs the same whatever its length (a sorted fixed-width string array, searched with a long
    value, is widened to that value's length: 688 MB for one 128k-character value)."""

    def __init__(self, fe: FieldEncoder):
        vocab = fe.vocab.to_pylist() if fe.vocab is not None else []
        self.index = dict(zip(vocab, range(FIRST, FIRST + len(vocab))))

    def codes(self, tokens: pa.Array) -> np.ndarray:
        return lookup(self.index, tokens.to_pylist())


def lookup(index: dict, values: Sequence) -> np.ndarray:
    """int64 code per value (OOV for a value not in `index`), in one C-level pass."""
    return np.fromiter(map(index.get, values, repeat(OOV)), np.int64, len(values))


def show(value: Any, limit: int = SHOW_CHARS) -> str:
    """repr(value) for an error message, shortened: a 1 MB bad value is not echoed back whole."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= limit + 20 else f"{text[:limit]}... ({len(text):,} characters)"


def check_strings(arr: pa.Array, where: Callable[[int], str], max_chars: Optional[int]) -> None:
    """RequestError naming the first string longer than `max_chars` characters (checked on the
    UTF-8 byte lengths first: a value of at most max_chars bytes has at most max_chars characters)."""
    if max_chars is None or not len(arr) or not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return
    if (pc.max(pc.binary_length(arr)).as_py() or 0) <= max_chars:
        return
    chars = pc.fill_null(pc.utf8_length(arr), 0).to_numpy(zero_copy_only=False)
    if chars.max() > max_chars:
        i = int(np.argmax(chars > max_chars))
        raise RequestError(
            f"{where(i)}: a value of {int(chars[i]):,} characters; the longest allowed is {max_chars:,} "
            f"(masknet serve --max-value-chars)"
        )


class FeatureEncoder:
    """Encode JSON rows for one bundle. `columns`: the raw column names a row must give."""

    def __init__(
        self, encoder: Any, field_names: Sequence[str], cardinalities: Sequence[int],
        max_value_chars: Optional[int] = DEFAULT_MAX_VALUE_CHARS, multi_valued: Sequence = (),
    ):
        self.encoder = encoder
        self.multi_valued = list(multi_valued)  # data.batch.MultiValuedField: the model's multi-valued fields
        self.max_value_chars = max_value_chars
        self.field_names = list(field_names)
        self.cardinalities = [int(c) for c in cardinalities]
        if encoder is None:
            self.field_columns = list(self.field_names)
            self.lookups: list[Optional[_Lookup]] = []
            self.text_columns: frozenset[str] = frozenset()
        else:
            self.field_columns = [fe.spec.column for fe in encoder.fields]
            self.lookups = [None if fe.spec.hash_buckets else _Lookup(fe) for fe in encoder.fields]
            self.missing = pa.array(list(encoder.spec.missing_values), pa.string())
            self._init_group()
            # columns whose only field is a dict-looked-up category: the request decoder may require
            # a string or null there (a number takes the slower path, which converts it)
            self.text_columns = frozenset(self.group_columns)
        # a multi-valued field's column (and its weight column) takes a list, or its separator string
        if encoder is None:
            self.multi_columns = [m.name for m in self.multi_valued]
        else:
            self.multi_columns = list(dict.fromkeys(c for m in encoder.multi_valued for c in m.spec.columns()))
        self.columns = list(dict.fromkeys(self.field_columns + self.multi_columns))
        self.column_set = frozenset(self.columns)

    def _init_group(self) -> None:
        """Categorical vocabulary fields, each fed by a column of its own, are encoded together: one
        Arrow conversion of all their values (which checks they are strings or null), then one
        C-level dict lookup per value, in a dict per field where null and the format's missing
        values ("") map to missing (0). This removes most per-field calls from a request."""
        uses = Counter(fe.spec.column for fe in self.encoder.fields)
        self.group = [
            j for j, fe in enumerate(self.encoder.fields)
            if fe.spec.transform == "category" and not fe.spec.hash_buckets and uses[fe.spec.column] == 1
            and fe.vocab is not None and pa.types.is_string(fe.vocab.type)
        ]
        self.group_columns = [self.encoder.fields[j].spec.column for j in self.group]
        missing = dict.fromkeys([None, *self.encoder.spec.missing_values], MISSING)
        self.group_index = [{**self.lookups[j].index, **missing} for j in self.group]
        # numeric (log_bucket) fields likewise: one parse and bucketing for all of them, one search over
        # int64 keys field * 2^48 + token (tokens outside +-2^46 cannot be in a vocabulary of buckets)
        self.num_group = [
            j for j, fe in enumerate(self.encoder.fields)
            if fe.spec.transform == "log_bucket" and not fe.spec.hash_buckets and uses[fe.spec.column] == 1
            and fe.vocab is not None and pa.types.is_integer(fe.vocab.type)
        ]
        self.num_columns = [self.encoder.fields[j].spec.column for j in self.num_group]
        nkeys = [np.zeros(0, np.int64)]
        ncodes = [np.zeros(0, np.int64)]
        for g, j in enumerate(self.num_group):
            tok = np.asarray(self.encoder.fields[j].vocab.to_pylist(), dtype=np.int64)
            ok = np.abs(tok) < _TOKEN_LIMIT
            nkeys.append(g * _FIELD_STRIDE + tok[ok])
            ncodes.append((np.arange(len(tok), dtype=np.int64) + 2)[ok])
        nk, nc = np.concatenate(nkeys), np.concatenate(ncodes)
        order = np.argsort(nk, kind="stable")
        self.num_keys, self.num_codes = nk[order], nc[order]

    def _encode_group(
        self, cols: dict[str, Sequence], n: int, x: np.ndarray, where: Callable[[int, str], str], checked: bool
    ) -> set[int]:
        """Fill x's dict-looked-up category fields whose columns `cols` has; returns the fields done
        (none when some value is not a string or null: the per-field path converts numbers and names
        a bad value)."""
        members = [(g, j, c) for g, (j, c) in enumerate(zip(self.group, self.group_columns)) if c in cols]
        if not members or n == 0:
            return set()
        if not checked:
            try:
                arr = pa.array(list(chain.from_iterable(cols[c] for _, _, c in members)), pa.string())
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError):
                return set()
            check_strings(arr, lambda p: where(p % n, members[p // n][2]), self.max_value_chars)
        for g, j, c in members:
            x[:, j] = lookup(self.group_index[g], cols[c])
        return {j for _, j, _ in members}

    def _encode_numeric(self, cols: dict[str, Sequence], n: int, x: np.ndarray, where: Callable[[int, str], str]) -> set[int]:
        """Fill x's numeric (log_bucket) fields whose columns `cols` has, all in one Arrow column:
        dictionary-encoded, so each distinct value is parsed and bucketed once (13,000 values of a
        1,000-candidate Criteo request have about 600 distinct), then one search over int64 keys.
        Returns the fields done (none when the values are of mixed types)."""
        members = [(g, j, c) for g, (j, c) in enumerate(zip(self.num_group, self.num_columns)) if c in cols]
        if not members or n == 0:
            return set()
        fields = [j for _, j, _ in members]
        names = [c for _, _, c in members]
        try:
            arr = pa.array(list(chain.from_iterable(cols[c] for c in names)))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError):
            return set()
        t = arr.type
        if pa.types.is_null(t):
            x[:, fields] = 0
            return set(fields)
        if not (pa.types.is_string(t) or pa.types.is_integer(t) or pa.types.is_floating(t)):
            return set()  # booleans, lists, ...: the per-field path names the bad value
        darr = arr.dictionary_encode()
        ix = self._indices(darr)  # -1: null or a missing-value string
        distinct = darr.dictionary
        first = lambda d: int(np.argmax(ix == d))  # noqa: E731 (the first value equal to distinct value d)
        check_strings(distinct, lambda d: where(first(d) % n, names[first(d) // n]), self.max_value_chars)
        f, bad = parse_numbers(distinct) if len(distinct) else (np.zeros(0), np.zeros(0, bool))
        null = ix < 0
        bad_rows = ~null & bad[np.maximum(ix, 0)] if len(distinct) else np.zeros(len(ix), bool)
        if bad_rows.any():
            p = int(np.argmax(bad_rows))
            raise RequestError(f"{where(p % n, names[p // n])}: not a number: {show(distinct[int(ix[p])].as_py())}")
        tok_d = np.clip(log_bucket(np.where(bad, 0.0, f)), -_TOKEN_LIMIT, _TOKEN_LIMIT)
        tok = tok_d[np.maximum(ix, 0)] if len(distinct) else np.zeros(len(ix), np.int64)
        g = np.asarray([g for g, _, _ in members], dtype=np.int64)
        key = np.repeat(g, n) * _FIELD_STRIDE + tok
        codes = np.full(len(key), OOV, np.int64)
        if len(self.num_keys):
            pos = np.minimum(np.searchsorted(self.num_keys, key), len(self.num_keys) - 1)
            hit = (self.num_keys[pos] == key) & (np.abs(tok) < _TOKEN_LIMIT)
            codes = np.where(hit, self.num_codes[pos], OOV)
        codes[null] = 0
        x[:, fields] = codes.reshape(len(members), n).T
        return set(fields)

    def _indices(self, darr: pa.DictionaryArray) -> np.ndarray:
        """Per row: index into darr.dictionary, or -1 for null and for the format's missing values ("")."""
        ind = darr.indices
        ix = (ind.fill_null(-1) if ind.null_count else ind).to_numpy(zero_copy_only=False).astype(np.int64)
        d = darr.dictionary
        if len(d) and (pa.types.is_string(d.type) or pa.types.is_large_string(d.type)):
            miss = pc.is_in(d, value_set=self.missing).to_numpy(zero_copy_only=False)
            if miss.any():
                ix = np.where((ix >= 0) & miss[np.maximum(ix, 0)], -1, ix)
        return ix

    def describe(self) -> list[dict[str, Any]]:
        """Per field: name, raw column, kind, transform, cardinality (for /metadata)."""
        encoders = self.encoder.multi_valued if self.encoder is not None else [None] * len(self.multi_valued)
        multi = [
            {"name": m.name, "column": e.spec.column if e else m.name, "kind": "multi_valued", "max_len": m.max_len,
             "pooling": m.pooling, "separator": e.spec.separator if e else None, "weighted": m.weighted, "cardinality": m.cardinality}
            for m, e in zip(self.multi_valued, encoders)
        ]
        if self.encoder is None:
            return [
                {"name": n, "column": n, "kind": "index", "transform": "none (already-encoded index)", "cardinality": c}
                for n, c in zip(self.field_names, self.cardinalities)
            ] + multi
        return [
            {
                "name": fe.spec.name,
                "column": fe.spec.column,
                "kind": fe.spec.kind,
                "transform": fe.spec.transform,
                "hash_buckets": fe.spec.hash_buckets,
                "cardinality": fe.cardinality,
            }
            for fe in self.encoder.fields
        ] + multi

    # -- gathering columns from rows --------------------------------------------------------

    def check_keys(self, rows: Sequence[dict], where: Callable[[int], str], extra_ok: frozenset = frozenset()) -> None:
        """Unknown keys anywhere in `rows`: RequestError naming the first row that has one."""
        seen = set().union(*rows) if rows else set()
        unknown = seen - self.column_set - extra_ok
        if unknown:
            for i, r in enumerate(rows):
                bad = sorted(unknown.intersection(r))
                if bad:
                    raise RequestError(
                        f"{where(i)}: unknown field {show(bad[0])}; the model's fields are: {', '.join(self.columns)}"
                    )

    def gather(
        self, rows: Sequence[dict], where: Callable[[int], str], context: Optional[dict] = None
    ) -> dict[str, Sequence]:
        """One sequence of values per raw column; a value missing from a row comes from `context`.

        Fast path: one C-level itemgetter call per row for the columns every row must give, then
        a transpose; only columns that the context gives and some row overrides go value by value."""
        context = context or {}
        own = [c for c in self.columns if c not in context]
        out: dict[str, Sequence] = {}
        if own:
            get = operator.itemgetter(*own)
            try:
                values = [get(r) for r in rows]
            except KeyError:
                for c in own:
                    for i, r in enumerate(rows):
                        if c not in r:
                            raise RequestError(f"{where(i)}: missing field {c!r} (send null for a missing value)") from None
                raise
            cols = list(zip(*values)) if len(own) > 1 else [values]
            if not rows:
                cols = [()] * len(own)
            out.update(zip(own, cols))
        overridden = set().union(*rows) if rows else set()
        for c in self.columns:
            if c in context:
                v = context[c]
                out[c] = [r.get(c, v) for r in rows] if c in overridden else [v] * len(rows)
        return out

    def check_context(self, context: dict, where: Callable[[str], str]) -> None:
        """Check a partial row's values (the /rank context of a request without candidates) by
        encoding the columns it gives as one row."""
        self.check_keys([context], lambda i: "context")
        x = np.empty((1, len(self.field_names)), dtype=np.int64)
        self.encode_into(x, {c: [v] for c, v in context.items()}, 1, lambda i, c: where(c))
        given = {c: [context[c]] for c in self.multi_columns if c in context}
        if given:
            self.with_multi_valued(x, given, 1, lambda i, c: where(c), partial=True)

    def with_multi_valued(
        self, x: np.ndarray, cols: dict[str, Sequence], n: int, where: Callable[[int, str], str], partial: bool = False
    ) -> Any:
        """x with the multi-valued fields' padded ids (a data.batch.EncodedRows), or x itself when the
        model has none. A value is a JSON array, a string with the field's separator, or null (the
        empty list). `partial`: encode (check) only the fields whose columns `cols` gives."""
        if not self.multi_valued:
            return x
        from ..data.batch import EncodedRows
        from ..data.multivalued import ListValueError, encode_indices, encode_values

        seqs, weights = [], []
        for j, m in enumerate(self.multi_valued):
            enc = self.encoder.multi_valued[j] if self.encoder is not None else None
            column = enc.spec.column if enc is not None else m.name
            wcol = enc.spec.weight_column if enc is not None else None
            if partial and column not in cols and (wcol is None or wcol not in cols):
                continue
            try:
                if enc is None:
                    ids, w = encode_indices(m, cols[column]), None
                else:
                    ids, w = encode_values(enc, cols.get(column, [None] * n), cols.get(wcol, [None] * n) if wcol else None,
                                           self.max_value_chars)
            except ListValueError as exc:
                raise RequestError(f"{where(exc.row, exc.column or column)}: {exc}") from None
            seqs.append(ids)
            weights.append(w if w is not None else np.where(ids != 0, np.float32(1), np.float32(0)))
        if partial:
            return x
        w = np.concatenate(weights, axis=1) if any(m.weighted for m in self.multi_valued) else None
        return EncodedRows(x, np.concatenate(seqs, axis=1), w)

    # -- encoding ----------------------------------------------------------------------------

    def encode(self, cols: dict[str, Sequence], n: int, where: Callable[[int, str], str], checked: bool = False) -> np.ndarray:
        """x int64 [n, fields] from the gathered columns (every column). `where(row, column)` names a value."""
        x = np.empty((n, len(self.field_names)), dtype=np.int64)
        self.encode_into(x, cols, n, where, checked)
        return x

    def fields_of(self, columns: Sequence[str]) -> list[int]:
        """The field numbers fed by these columns (Avazu's `hour` feeds three)."""
        wanted = set(columns)
        return [j for j, c in enumerate(self.field_columns) if c in wanted]

    def encode_into(
        self, x: np.ndarray, cols: dict[str, Sequence], n: int, where: Callable[[int, str], str], checked: bool = False
    ) -> None:
        """Fill the fields of x [n, fields] that the columns in `cols` feed; other fields are left alone.
        `checked`: the request decoder has already checked the values (every value of a text column
        is a valid string of at most max_value_chars characters or null; the others are strings,
        numbers or null), so the dict-looked-up categories skip their Arrow check."""
        if self.encoder is None:
            self._encode_indices(x, cols, where)
            return
        done = self._encode_group(cols, n, x, where, checked)
        done |= self._encode_numeric(cols, n, x, where)
        dicts: dict[str, pa.DictionaryArray] = {}
        for j, fe in enumerate(self.encoder.fields):
            col = fe.spec.column
            if j in done or col not in cols:
                continue
            if col not in dicts:
                hint = None if fe.spec.kind == "numeric" else pa.string()  # (a float64 hint would take true as 1.0)
                arr = _to_arrow(cols[col], lambda i, col=col: where(i, col), hint, self.max_value_chars)
                dicts[col] = arr.dictionary_encode() if len(arr) else pa.array([], pa.string()).dictionary_encode()
            x[:, j] = self._encode_field(j, fe, dicts[col], lambda i, col=col: where(i, col))

    def _encode_field(self, j: int, fe: FieldEncoder, darr: pa.DictionaryArray, where: Callable[[int], str]) -> np.ndarray:
        """One field's codes from its column, dictionary-encoded: the encoder's own transform on the
        distinct values, then the vocabulary (or hashing)."""
        values = darr.dictionary
        if fe.spec.transform == "libfm":  # JSON convenience: 123 or "123" means the libFM feature "123:1"
            s = values if pa.types.is_string(values.type) else values.cast(pa.string())
            plain = pc.match_substring_regex(s, r"^[0-9]+$")
            values = pc.if_else(plain, pc.binary_join_element_wise(s, pa.scalar(":1"), pa.scalar("")), s)
        tok = transform(fe.spec, values)
        ix = self._indices(darr)
        if tok.bad is not None:
            bad_rows = (ix >= 0) & tok.bad[np.maximum(ix, 0)]
            if bad_rows.any():
                i = int(np.argmax(bad_rows))
                raise RequestError(f"{where(i)}: {tok.message}: {show(darr.dictionary[int(ix[i])].as_py())}")
        lookup_ = self.lookups[j]
        codes = fe.codes(tok.tokens).astype(np.int64) if lookup_ is None else lookup_.codes(tok.tokens)
        return np.concatenate([codes, np.zeros(1, np.int64)])[ix]  # -1 (null) -> missing (0)

    def _encode_indices(self, x: np.ndarray, cols: dict[str, Sequence], where: Callable[[int, str], str]) -> None:
        """A bundle without an encoder (built-in synthetic data): each value is the field's index."""
        for j, (name, card) in enumerate(zip(self.field_names, self.cardinalities)):
            if name not in cols:
                continue
            arr = _to_arrow(cols[name], lambda i, name=name: where(i, name), max_chars=self.max_value_chars)
            if not pa.types.is_integer(arr.type) or arr.null_count:
                i = _first(cols[name], lambda v: isinstance(v, bool) or not isinstance(v, int))
                raise RequestError(f"{where(i, name)}: expected an integer index (this model was trained on "
                                   f"already-encoded data), got {show(cols[name][i])}")
            v = arr.to_numpy()
            bad = (v < 0) | (v >= card)
            if bad.any():
                i = int(np.argmax(bad))
                raise RequestError(f"{where(i, name)}: index {int(v[i])} out of range [0, {card})")
            x[:, j] = v


def _first(values: Sequence, pred: Callable[[Any], bool]) -> int:
    return next((i for i, v in enumerate(values) if pred(v)), 0)


def _to_arrow(
    values: Sequence, where: Callable[[int], str], hint: Optional[pa.DataType] = None, max_chars: Optional[int] = None
) -> pa.Array:
    """A column of JSON scalars as one Arrow array: string, int64 or float64 when the values
    agree, else every value as a string (numbers written as `_as_string` would, 5.0 -> "5").
    A string longer than `max_chars`, or one that is not valid Unicode (a lone surrogate such as
    "\\ud800", which JSON's escapes allow and UTF-8 cannot encode), is a RequestError."""
    arr = _infer(values, hint)
    if arr is None:
        arr = pa.array([_scalar_text(v, i, where) for i, v in enumerate(values)], pa.string())
    check_strings(arr, where, max_chars)
    return arr


def _infer(values: Sequence, hint: Optional[pa.DataType]) -> Optional[pa.Array]:
    """The column as one Arrow array of a JSON scalar type, or None (mixed types, or a bad value)."""
    if hint is not None:
        try:
            return pa.array(values, hint)  # the common case, without type inference
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError):
            pass
    try:
        arr = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError):
        return None
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_integer(t) or pa.types.is_floating(t):
        return arr
    return arr.cast(pa.string()) if pa.types.is_null(t) else None


def _scalar_text(v: Any, i: int, where: Callable[[int], str]) -> Optional[str]:
    """One value of a mixed or bad column as a string (or None); RequestError for a bad one."""
    if v is None:
        return None
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = v[exc.start]
            raise RequestError(f"{where(i)}: not valid Unicode (a lone surrogate U+{ord(bad):04X}): {show(v)}") from None
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"{where(i)}: expected a string, a number or null, got {_py_type(v)}: {show(v)}")
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return str(v) if isinstance(v, int) else repr(v)
