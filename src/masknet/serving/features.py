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
from itertools import chain
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..data.encoder import OOV, FieldEncoder, log_bucket, parse_numbers, transform

_FIELD_STRIDE = 1 << 48  # numeric group keys: field * 2^48 + token
_TOKEN_LIMIT = 1 << 46



class RequestError(ValueError):
    """A bad request; the message names the row and field. `status` is the HTTP status."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def _py_type(v: Any) -> str:
    return {list: "a list", dict: "an object", bool: "a boolean"}.get(type(v), type(v).__name__)


class _Lookup:
    """Token -> index for one vocabulary field, by binary search in a sorted copy of the vocabulary."""

    def __init__(self, fe: FieldEncoder):
        vocab = fe.vocab
        self.is_int = vocab is not None and pa.types.is_integer(vocab.type)
        values = np.asarray(vocab.to_pylist() if vocab is not None else [], dtype=np.int64 if self.is_int else str)
        if not self.is_int and len(values) == 0:
            values = np.zeros(0, dtype="U1")
        self.order = np.argsort(values, kind="stable")
        self.sorted = values[self.order]

    def codes(self, tokens: pa.Array) -> np.ndarray:
        n = len(tokens)
        if n == 0 or len(self.sorted) == 0:
            return np.full(n, OOV, dtype=np.int64)
        if self.is_int:
            q = (tokens if tokens.type == pa.int64() else tokens.cast(pa.int64())).to_numpy(zero_copy_only=False)
        else:
            q = np.asarray((tokens if tokens.type == pa.string() else tokens.cast(pa.string())).to_pylist(), dtype=str)
        pos = np.searchsorted(self.sorted, q)
        pos_c = np.minimum(pos, len(self.sorted) - 1)
        hit = self.sorted[pos_c] == q
        return np.where(hit, self.order[pos_c] + 2, OOV).astype(np.int64)


class FeatureEncoder:
    """Encode JSON rows for one bundle. `columns`: the raw column names a row must give."""

    def __init__(self, encoder: Any, field_names: Sequence[str], cardinalities: Sequence[int], multi_valued: Sequence = ()):
        self.encoder = encoder
        self.field_names = list(field_names)
        self.cardinalities = [int(c) for c in cardinalities]
        self.multi_valued = list(multi_valued)  # data.batch.MultiValuedField (the model's)
        if encoder is None:
            self.columns = list(self.field_names) + [m.name for m in self.multi_valued]
            self.lookups: list[Optional[_Lookup]] = []
        else:
            multi_columns = [c for m in encoder.multi_valued for c in m.spec.columns()]
            self.columns = list(dict.fromkeys([fe.spec.column for fe in encoder.fields] + multi_columns))
            self.lookups = [None if fe.spec.hash_buckets else _Lookup(fe) for fe in encoder.fields]
            self.missing = pa.array(list(encoder.spec.missing_values), pa.string())
            self._init_group()
        self.column_set = frozenset(self.columns)

    def _init_group(self) -> None:
        """Categorical vocabulary fields, each fed by a column of its own, are encoded together: one
        Arrow column for all of them, one dictionary encoding, one binary search in a single sorted
        array of "field-number US token" keys. This removes most per-field calls from a request."""
        uses = Counter(fe.spec.column for fe in self.encoder.fields)
        self.group = [
            j for j, fe in enumerate(self.encoder.fields)
            if fe.spec.transform == "category" and not fe.spec.hash_buckets and uses[fe.spec.column] == 1
            and fe.vocab is not None and pa.types.is_string(fe.vocab.type)
        ]
        self.group_columns = [self.encoder.fields[j].spec.column for j in self.group]
        self.group_prefix = np.asarray([f"{g}\x1f" for g in range(len(self.group))], dtype=str)
        keys, codes = [np.zeros(0, dtype="U1")], [np.zeros(0, np.int64)]
        for g, j in enumerate(self.group):
            vocab = self.encoder.fields[j].vocab.to_pylist()
            if vocab:
                keys.append(np.char.add(self.group_prefix[g], np.asarray(vocab, dtype=str)))
                codes.append(np.arange(len(vocab), dtype=np.int64) + 2)
        keys_a, codes_a = np.concatenate(keys), np.concatenate(codes)
        order = np.argsort(keys_a, kind="stable")
        self.group_keys, self.group_codes = keys_a[order], codes_a[order]
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

    def _encode_group(self, cols: dict[str, Sequence], n: int, x: np.ndarray) -> bool:
        """Fill x's group columns; False (nothing done) when some value is not a string or null."""
        if not self.group or n == 0:
            return False
        try:
            arr = pa.array(list(chain.from_iterable(cols[c] for c in self.group_columns)), pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError):
            return False  # numbers or bad values: the per-field path converts them or names the bad one
        darr = arr.dictionary_encode()
        ix = self._indices(darr)
        nd = len(darr.dictionary)
        codes = np.zeros(len(ix), np.int64)  # missing -> 0
        valid = ix >= 0
        if valid.any() and len(self.group_keys):
            key = np.repeat(np.arange(len(self.group), dtype=np.int64), n) * nd + ix
            uniq, inv = np.unique(key[valid], return_inverse=True)
            distinct = np.asarray(darr.dictionary.to_pylist(), dtype=str)
            q = np.char.add(self.group_prefix[uniq // nd], distinct[uniq % nd])
            pos = np.minimum(np.searchsorted(self.group_keys, q), len(self.group_keys) - 1)
            codes[valid] = np.where(self.group_keys[pos] == q, self.group_codes[pos], OOV)[inv]
        elif valid.any():
            codes[valid] = OOV
        x[:, self.group] = codes.reshape(len(self.group), n).T
        return True

    def _encode_numeric(self, cols: dict[str, Sequence], n: int, x: np.ndarray, where: Callable[[int, str], str]) -> bool:
        """Fill x's numeric group columns; False (nothing done) when the values are of mixed types."""
        if not self.num_group or n == 0:
            return False
        try:
            arr = pa.array(list(chain.from_iterable(cols[c] for c in self.num_columns)))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError):
            return False
        t = arr.type
        if pa.types.is_null(t):
            x[:, self.num_group] = 0
            return True
        if not (pa.types.is_string(t) or pa.types.is_integer(t) or pa.types.is_floating(t)):
            return False  # booleans, lists, ...: the per-field path names the bad value
        null = ~arr.is_valid().to_numpy(zero_copy_only=False)
        if pa.types.is_string(t) and len(self.missing):
            null |= pc.is_in(arr, value_set=self.missing).to_numpy(zero_copy_only=False)
        if null.any():  # parse_numbers takes no nulls: a placeholder, masked out below
            arr = pc.if_else(pa.array(null), pa.scalar("0" if pa.types.is_string(t) else 0, t), arr)
        f, bad = parse_numbers(arr)
        bad &= ~null
        if bad.any():
            p = int(np.argmax(bad))
            raise RequestError(f"{where(p % n, self.num_columns[p // n])}: not a number: {arr[p].as_py()!r}")
        tok = log_bucket(np.where(null, 0.0, f))
        key = np.repeat(np.arange(len(self.num_group), dtype=np.int64), n) * _FIELD_STRIDE + np.clip(tok, -_TOKEN_LIMIT, _TOKEN_LIMIT)
        codes = np.full(len(key), OOV, np.int64)
        if len(self.num_keys):
            pos = np.minimum(np.searchsorted(self.num_keys, key), len(self.num_keys) - 1)
            hit = (self.num_keys[pos] == key) & (np.abs(tok) < _TOKEN_LIMIT)
            codes = np.where(hit, self.num_codes[pos], OOV)
        codes[null] = 0
        x[:, self.num_group] = codes.reshape(len(self.num_group), n).T
        return True

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
        multi = [
            {"name": m.name, "column": e.spec.column if e else m.name, "kind": "multi_valued", "max_len": m.max_len,
             "pooling": m.pooling, "separator": e.spec.separator if e else None, "cardinality": m.cardinality}
            for m, e in zip(self.multi_valued, self.encoder.multi_valued if self.encoder is not None else [None] * len(self.multi_valued))
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
                        f"{where(i)}: unknown field {bad[0]!r}; the model's fields are: {', '.join(self.columns)}"
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

    # -- encoding ----------------------------------------------------------------------------

    def encode(self, cols: dict[str, list], n: int, where: Callable[[int, str], str]) -> np.ndarray:
        """x int64 [n, fields] from the gathered columns. `where(row, column)` names a value."""
        x = np.empty((n, len(self.field_names)), dtype=np.int64)
        if self.encoder is None:
            for j, (name, card) in enumerate(zip(self.field_names, self.cardinalities)):
                arr = _to_arrow(cols[name], lambda i, name=name: where(i, name))
                if not pa.types.is_integer(arr.type) or arr.null_count:
                    i = _first(cols[name], lambda v: isinstance(v, bool) or not isinstance(v, int))
                    raise RequestError(f"{where(i, name)}: expected an integer index (this model was trained on "
                                       f"already-encoded data), got {cols[name][i]!r}")
                v = arr.to_numpy()
                bad = (v < 0) | (v >= card)
                if bad.any():
                    i = int(np.argmax(bad))
                    raise RequestError(f"{where(i, name)}: index {int(v[i])} out of range [0, {card})")
                x[:, j] = v
            return x
        done = set(self.group) if self._encode_group(cols, n, x) else set()
        if self._encode_numeric(cols, n, x, where):
            done |= set(self.num_group)
        dicts: dict[str, pa.DictionaryArray] = {}
        for j, fe in enumerate(self.encoder.fields):
            if j in done:
                continue
            col = fe.spec.column
            if col not in dicts:
                hint = None if fe.spec.kind == "numeric" else pa.string()  # (a float64 hint would take true as 1.0)
                arr = _to_arrow(cols[col], lambda i, col=col: where(i, col), hint)
                dicts[col] = arr.dictionary_encode() if len(arr) else pa.array([], pa.string()).dictionary_encode()
            darr = dicts[col]
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
                    raise RequestError(f"{where(i, col)}: {tok.message}: {darr.dictionary[int(ix[i])].as_py()!r}")
            lookup = self.lookups[j]
            codes = fe.codes(tok.tokens).astype(np.int64) if lookup is None else lookup.codes(tok.tokens)
            x[:, j] = np.concatenate([codes, np.zeros(1, np.int64)])[ix]  # -1 (null) -> missing (0)
        return x


    def with_multi_valued(self, x: np.ndarray, cols: dict[str, list], n: int, where: Callable[[int, str], str]) -> Any:
        """x with the multi-valued fields' padded ids (a data.batch.EncodedRows), or x itself when the
        model has none. A value is a JSON array, a string with the field's separator, or null (empty)."""
        if not self.multi_valued:
            return x
        from ..data.batch import EncodedRows
        from ..data.multivalued import ListValueError, encode_indices, encode_values

        seqs, weights = [], []
        for j, m in enumerate(self.multi_valued):
            enc = self.encoder.multi_valued[j] if self.encoder is not None else None
            column = enc.spec.column if enc is not None else m.name
            try:
                if enc is None:
                    ids, w = encode_indices(m, cols[column]), None
                else:
                    wcol = enc.spec.weight_column
                    ids, w = encode_values(enc, cols[column], cols[wcol] if wcol else None)
            except ListValueError as exc:
                raise RequestError(f"{where(exc.row, column)}: {exc}") from None
            seqs.append(ids)
            weights.append(w if w is not None else np.where(ids != 0, np.float32(1), np.float32(0)))
        w = np.concatenate(weights, axis=1) if any(m.weighted for m in self.multi_valued) else None
        return EncodedRows(x, np.concatenate(seqs, axis=1), w)


def _first(values: Sequence, pred: Callable[[Any], bool]) -> int:
    return next((i for i, v in enumerate(values) if pred(v)), 0)


def _to_arrow(values: Sequence, where: Callable[[int], str], hint: Optional[pa.DataType] = None) -> pa.Array:
    """A column of JSON scalars as one Arrow array: string, int64 or float64 when the values
    agree, else every value as a string (numbers written as `_as_string` would, 5.0 -> "5")."""
    if hint is not None:
        try:
            return pa.array(values, hint)  # the common case, without type inference
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError):
            pass
    try:
        arr = pa.array(values)
        t = arr.type
        if pa.types.is_string(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t):
            return arr.cast(pa.string()) if pa.types.is_null(t) else arr
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError):
        pass
    out = []
    for i, v in enumerate(values):  # slow path: mixed types, or a bad one somewhere
        if v is None or isinstance(v, str):
            out.append(v)
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RequestError(f"{where(i)}: expected a string, a number or null, got {_py_type(v)}: {v!r}")
        elif isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
            out.append(str(int(v)))
        else:
            out.append(str(v) if isinstance(v, int) else repr(v))
    return pa.array(out, pa.string())
