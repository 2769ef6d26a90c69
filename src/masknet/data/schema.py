"""What a raw input file looks like and how each column becomes a model field.

A `DatasetSpec` says how to read a file (CSV/TSV with or without header, libFM, Parquet),
which column is the label and how it is written, which columns are ignored, which column
orders rows in time, and the list of `FieldSpec`s: one model field each, made from one
source column by one transform:

    category      the raw string is the category                 (vocabulary or hashing)
    log_bucket    a number, discretized the Criteo way:           (vocabulary over buckets)
                  x > 2 -> floor(ln(x)^2), x <= 2 -> floor(x) (its own bucket each), missing -> 0
    hour_of_day   Avazu's YYMMDDHH -> HH
    weekday       Avazu's YYMMDDHH -> day of week (0 = Monday)
    weekend       Avazu's YYMMDDHH -> 1 on Saturday and Sunday, else 0
    libfm         libFM's `index:1` -> index

The built-in formats (criteo, criteo-csv, avazu, malware, frappe) are declared in formats.py.
Anything else is described by a small YAML/JSON schema file (`load_schema_file`), so a user's own
log needs no code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from ..errors import DataError, UserError

TRANSFORMS = ("category", "log_bucket", "hour_of_day", "weekday", "weekend", "libfm")
NUMERIC_TRANSFORMS = ("log_bucket",)
LABEL_KINDS = ("01", "pm1")  # 0/1, or libFM's -1/1 (0 also accepted as negative); ">=T": a number, positive if >= T;
# "=V": positive when the value is V (a `labels:` entry's `positive`)
TIME_KINDS = ("number", "iso", "avazu_hour")
FILE_TYPES = ("csv", "libfm", "parquet", "auto")  # auto: parquet for *.parquet / *.pq, else csv


@dataclass
class FieldSpec:
    """One model field: `transform` applied to raw column `column`."""

    name: str
    column: str
    transform: str = "category"
    min_count: int = 1  # categories (or buckets) seen fewer times in train -> out-of-vocabulary
    hash_buckets: Optional[int] = None  # hash into this many buckets instead of a vocabulary

    @property
    def kind(self) -> str:
        return "numeric" if self.transform in NUMERIC_TRANSFORMS else "categorical"


@dataclass
class LabelSpec:
    """A further label column (multi-task data): its name is the task's name.

    kind: as DatasetSpec.label_kind ("01", "pm1", or "=V": positive when the value, surrounding
    spaces stripped, is V). optional: a row may leave it missing; the row is then masked out of
    this task's loss and metrics (e.g. a conversion only known after a click)."""

    column: str
    kind: str = "01"
    optional: bool = False


@dataclass
class DatasetSpec:
    name: str
    file_type: str = "csv"
    delimiter: str = ","
    header: bool = True
    columns: Optional[list[str]] = None  # all columns in order; required without a header
    quoting: bool = True
    label: Optional[str] = "label"  # None: no label column (raw rows to predict on)
    label_kind: str = "01"
    fields: list[FieldSpec] = field(default_factory=list)
    time: Optional[str] = None  # column that orders rows in time (for --split time)
    time_kind: str = "number"
    missing_values: list[str] = field(default_factory=lambda: [""])
    schema_path: Optional[str] = None  # the schema file this spec came from (for messages)
    multi_valued: list = field(default_factory=list)  # multivalued.MultiValuedSpec per multi-valued field
    more_labels: list[LabelSpec] = field(default_factory=list)  # tasks after `label` (multi-task data)
    # the format's min count on a small file (fewer than SMALL_FILE_TRAIN_ROWS train rows), applied by
    # prepare once it has counted them; None: the fields' own min counts at any size (and after --min-count)
    small_file_min_count: Optional[int] = None

    @property
    def labels(self) -> list[LabelSpec]:
        """Every label column, the first (`label`, never optional) first; empty without a label."""
        if not self.label:
            return []
        return [LabelSpec(self.label, self.label_kind)] + list(self.more_labels)

    def without_labels(self) -> "DatasetSpec":
        """This spec reading no label column (rows to predict on), as a new spec."""
        return replace(self, label=None, more_labels=[])

    def needed_columns(self) -> list[str]:
        cols = [lab.column for lab in self.labels] + [f.column for f in self.fields]
        if self.time:
            cols.append(self.time)
        cols += [c for mv in self.multi_valued for c in mv.columns()]
        return list(dict.fromkeys(cols))

    def multi_valued_columns(self) -> set[str]:
        """The columns read as lists (their values are split, not dictionary-looked-up)."""
        return {c for mv in self.multi_valued for c in mv.columns()}

    def with_min_count(self, min_count: Optional[int]) -> "DatasetSpec":
        """A new spec with every field's minimum count `min_count` (None: this spec, unchanged)."""
        if min_count is None:
            return self
        if min_count < 1:
            raise UserError(f"--min-count: must be >= 1, got {min_count}")
        return replace(self, fields=[replace(f, min_count=min_count) for f in self.fields],
                       multi_valued=[replace(m, min_count=min_count) for m in self.multi_valued],
                       small_file_min_count=None)  # the user's choice holds at any size

    def for_train_rows(self, train_rows: int) -> Optional["DatasetSpec"]:
        """The small-file rule (`small_file_min_count`): below SMALL_FILE_TRAIN_ROWS train rows, a new spec
        with every field's min count raised to it; None where the rule does not apply. Deterministic in
        the train split's row count; the min count used is recorded per field in meta.json and encoder.json."""
        if self.small_file_min_count is None or train_rows >= SMALL_FILE_TRAIN_ROWS:
            return None
        rule = self.small_file_min_count
        return replace(self, fields=[replace(f, min_count=max(f.min_count, rule)) for f in self.fields],
                       multi_valued=[replace(m, min_count=max(m.min_count, rule)) for m in self.multi_valued])

    def with_hashing(self, buckets: dict[str, int]) -> "DatasetSpec":
        """A new spec with field `name` hashed into `buckets[name]` buckets (categorical and multi-valued fields)."""
        by_name = {f.name: f for f in self.fields + self.multi_valued}
        for name, n in buckets.items():
            if name not in by_name:
                raise UserError(f"--hash {name}={n}: no field {name!r}; fields: {', '.join(by_name)}")
            if by_name[name].kind not in ("categorical", "multi_valued"):
                raise UserError(f"--hash {name}={n}: only categorical fields can be hashed")
            if n < 1:
                raise UserError(f"--hash {name}={n}: the number of buckets must be >= 1")

        def hashed(f):
            return replace(f, hash_buckets=buckets[f.name]) if f.name in buckets else f

        return replace(self, fields=[hashed(f) for f in self.fields], multi_valued=[hashed(m) for m in self.multi_valued])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.multi_valued:  # a spec without them reads (and is saved) exactly as before they existed
            del d["multi_valued"]
        if not self.more_labels:  # a single-label spec is saved exactly as before multi-task data existed
            del d["more_labels"]
        if self.small_file_min_count is None:  # likewise a spec without the small-file rule
            del d["small_file_min_count"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetSpec":
        d = dict(d)
        d["fields"] = [FieldSpec(**f) for f in d.get("fields", [])]
        if d.get("multi_valued"):
            from .multivalued import MultiValuedSpec

            d["multi_valued"] = [MultiValuedSpec.from_dict(m) for m in d["multi_valued"]]
        d["more_labels"] = [LabelSpec(**lab) for lab in d.get("more_labels", [])]
        return cls(**d)


# ---------------------------------------------------------------------------
# Small files (issue 16; docs/model.md "Training defaults", docs/data.md): a format may declare a
# higher min count for files with fewer train rows than this (formats.Format.small_file_min_count).
SMALL_FILE_TRAIN_ROWS = 100_000


# Schema files

SCHEMA_MIN_COUNT = 1  # a schema file keeps every category unless it says `min_count` (docs/data.md)

SCHEMA_KEYS = {
    "file_type": "csv or parquet (default: from the input file name; .parquet -> parquet)",
    "delimiter": "CSV field separator (default ',')",
    "header": "true if the first line names the columns (default true)",
    "columns": "every column name in order (required when header: false)",
    "label": "the 0/1 label column (this or 'labels' is required)",
    "label_threshold": "optional: the label column is a number (e.g. a rating) and a row is positive when it is >= this",
    "labels": "several label columns, one task each (multi-task data), the first being the main one: each a "
    "name (a 0/1 column) or {name, positive, allow_missing} (docs/data.md)",
    "categorical": "list of categorical columns: a name, or {name, column, min_count, hash_buckets}",
    "numeric": "list of numeric columns (discretized floor(ln(x)^2)): a name or {name, column, min_count}",
    "multi_valued": "list of columns holding several values: {name, max_len, separator, pooling, keep, min_count, "
    "hash_buckets, weight_separator, weight_column, column} (docs/data.md)",
    "time": "optional column that orders rows in time (for --split time)",
    "time_format": "number (default; sortable numbers like epoch seconds or YYMMDDHH) or iso (ISO-8601)",
    "min_count": "default minimum count for every field (default 1)",
    "missing_values": "strings that mean missing (default [''])",
    "quoting": "true if fields may be double-quoted (default true)",
}


def load_schema_file(path: str | Path) -> DatasetSpec:
    """Read a YAML (or JSON) schema file. Errors name the file and the key."""
    path = Path(path)
    raw, text = _read_schema(path)
    keys = _Keys(raw, path)
    labels = parse_labels(raw["labels"], str(path)) if "labels" in raw else [LabelSpec(raw["label"])]
    min_count = keys.get("min_count", int, SCHEMA_MIN_COUNT)
    if min_count < 1:
        raise DataError(f"{path}: min_count: must be >= 1, got {min_count}")
    file_type = keys.get("file_type", str, None)
    if file_type is not None and file_type not in ("csv", "parquet"):
        raise DataError(f"{path}: file_type: expected csv or parquet, got {file_type!r}")
    header = keys.get("header", bool, True)
    columns = keys.get("columns", list, None)
    if not header and not columns:
        raise DataError(f"{path}: columns: required when header is false")
    threshold = raw.get("label_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise DataError(f"{path}: label_threshold: expected a number, got {threshold!r}")
    if threshold is not None and "labels" in raw:  # each of several labels says its own `positive`
        raise DataError(f"{path}: label_threshold: goes with 'label'; with 'labels' give each label's 'positive' value")
    time_format = keys.get("time_format", str, "number")
    if time_format not in ("number", "iso"):
        raise DataError(f"{path}: time_format: expected number or iso, got {time_format!r}")
    fields = _feature_fields(keys, path, min_count)
    multi = []
    if "multi_valued" in raw:
        from .multivalued import parse_schema_entries

        delimiter = raw.get("delimiter", ",")
        multi = parse_schema_entries(raw["multi_valued"], str(path), text, delimiter if isinstance(delimiter, str) else ",",
                                     min_count, keys.get("quoting", bool, True))
    _check_features(path, fields, multi, labels)
    missing_values = keys.get("missing_values", list, [""])
    spec = DatasetSpec(
        name=f"schema:{path}",
        file_type=file_type or "auto",
        delimiter=keys.get("delimiter", str, ","),
        header=header,
        columns=[str(c) for c in columns] if columns else None,
        quoting=keys.get("quoting", bool, True),
        label=labels[0].column,
        label_kind=labels[0].kind if threshold is None else f">={threshold:g}",
        fields=fields,
        time=keys.get("time", str, None),
        time_kind=time_format,
        missing_values=[str(v) for v in missing_values],
        schema_path=str(path),
        more_labels=labels[1:],
        multi_valued=multi,
    )
    _check_layout(path, spec)
    return spec


def _read_schema(path: Path) -> tuple[dict[str, Any], str]:
    """The schema file's mapping (known keys only, one label key) and its text."""
    if not path.is_file():
        raise DataError(f"{path}: schema file not found")
    try:
        text = path.read_text()
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML/JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a mapping of schema keys ({', '.join(SCHEMA_KEYS)})")
    unknown = sorted(set(raw) - set(SCHEMA_KEYS))
    if unknown:
        raise DataError(f"{path}: unknown schema key {unknown[0]!r}; known keys: {', '.join(SCHEMA_KEYS)}")
    if ("label" in raw) == ("labels" in raw):
        raise DataError(f"{path}: give either 'label' (the 0/1 label column) or 'labels' (several label columns), not both or neither")
    if "label" in raw and not isinstance(raw["label"], str):
        raise DataError(f"{path}: label: expected the name of the 0/1 label column, got {raw['label']!r}")
    return raw, text


class _Keys:
    """A schema's top-level values, type-checked (a DataError names the file and the key)."""

    def __init__(self, raw: dict[str, Any], path: Path):
        self.raw, self.path = raw, path

    def get(self, key: str, tp: type, default: Any) -> Any:
        v = self.raw.get(key, default)
        if v is not None and not isinstance(v, tp):
            raise DataError(f"{self.path}: {key}: expected {tp.__name__}, got {v!r}")
        return v


def named_entries(entries: list, key: str, known: tuple[str, ...], path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A schema list of columns (`categorical`, `numeric`, `labels`): each entry a column name or a
    mapping with a `name` and only `known` keys. Yields (where, mapping), `where` naming the entry."""
    for i, entry in enumerate(entries):
        where = f"{path}: {key}[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DataError(f"{where}: expected a column name or a mapping with 'name'")
        extra = sorted(set(entry) - set(known))
        if extra:
            raise DataError(f"{where}: unknown key {extra[0]!r}; known: {', '.join(known)}")
        yield where, entry


FEATURE_KEYS = ("name", "column", "min_count", "hash_buckets")


def _feature_fields(keys: _Keys, path: Path, min_count: int) -> list[FieldSpec]:
    """The `categorical` and `numeric` lists -> one FieldSpec each."""
    fields: list[FieldSpec] = []
    for key, transform in (("categorical", "category"), ("numeric", "log_bucket")):
        for where, entry in named_entries(keys.get(key, list, []), key, FEATURE_KEYS, path):
            mc = entry.get("min_count", min_count)
            hb = entry.get("hash_buckets")
            if not isinstance(mc, int) or mc < 1:
                raise DataError(f"{where}: min_count: expected an integer >= 1, got {mc!r}")
            if hb is not None:
                if transform != "category":
                    raise DataError(f"{where}: hash_buckets: only categorical columns can be hashed")
                if not isinstance(hb, int) or hb < 1:
                    raise DataError(f"{where}: hash_buckets: expected an integer >= 1, got {hb!r}")
            fields.append(FieldSpec(entry["name"], str(entry.get("column", entry["name"])), transform, mc, hb))
    if not fields:
        raise DataError(f"{path}: no features: list at least one column under 'categorical' or 'numeric'")
    return fields


def _check_features(path: Path, fields: list[FieldSpec], multi: list, labels: list[LabelSpec]) -> None:
    names = [f.name for f in fields] + [m.name for m in multi]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{path}: field {dup[0]!r} is listed twice")
    for lab in labels:
        if lab.column in [f.column for f in fields] + [c for m in multi for c in m.columns()]:
            raise DataError(f"{path}: the label column {lab.column!r} is also listed as a feature")


def _check_layout(path: Path, spec: DatasetSpec) -> None:
    if len(spec.delimiter) != 1:
        raise DataError(f"{path}: delimiter: expected one character, got {spec.delimiter!r}")
    if spec.columns:
        known = set(spec.columns)
        for col in spec.needed_columns():
            if col not in known:
                raise DataError(f"{path}: column {col!r} is not among the schema's columns: {', '.join(spec.columns)}")


LABEL_KEYS = ("name", "positive", "allow_missing")


def parse_labels(entries: Any, path: str) -> list[LabelSpec]:
    """A schema's `labels:` list: each entry a column name (0/1 values) or a mapping
    {name, positive, allow_missing}; the first label may not be missing in a row."""
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: labels: expected a non-empty list of label columns")
    out = []
    for where, entry in named_entries(entries, "labels", LABEL_KEYS, path):
        positive = entry.get("positive")
        if positive is not None and (isinstance(positive, bool) or not isinstance(positive, (str, int, float))):
            raise DataError(f"{where}: positive: expected the value (a string) that means positive, got {positive!r}")
        optional = entry.get("allow_missing", False)
        if not isinstance(optional, bool):
            raise DataError(f"{where}: allow_missing: expected true or false, got {optional!r}")
        if optional and not out:
            raise DataError(f"{where}: allow_missing: the first label is the main task and must be known in every row")
        out.append(LabelSpec(entry["name"], "01" if positive is None else f"={str(positive).strip()}", optional))
    names = [lab.column for lab in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{path}: labels: {dup[0]!r} is listed twice")
    return out


def spec_json(spec: DatasetSpec) -> str:
    return json.dumps(spec.to_dict(), indent=2)
