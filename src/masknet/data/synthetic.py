"""The built-in synthetic data: Criteo-like fields, labels from a planted model with a known truth.

Schema: 13 numeric fields I1..I13 (heavy-tailed counts with missing values, I2 can be
negative) discretized as Criteo is (floor(ln(x)^2) for x > 2, small values and negatives
as their own buckets, missing as its own bucket), and 26 categorical fields C1..C26 with
Zipf-distributed values and cardinalities from tens to 200,000.

Labels come from a planted model whose logit is

    b + Σ_i w_i[x_i]                                    first-order effects
      + s · g(x) · Σ_{(i,j) in P} <u_i[x_i], u_j[x_j]>  latent-factor (dot-product) interactions
                                                         over a set P of field pairs
    g(x) = 2 · sigmoid(a[x_a] + c[x_c])                  an instance-dependent multiplicative gate

P is 6 pairs drawn per seed from 15 fields with at most 64 values, u are 2-dimensional and
s = 0.7. (Generator v1, until 2026-11-29, had 30 pairs of 4-dimensional factors at s = 0.16:
interactions just as strong in total but spread so thin that the paper's MaskNet needed
about 500k training samples to learn half of them; v2's are learnt from 96k rows in two
epochs, so the default `masknet train` takes about a minute. docs/model.md has both.)

Every row keeps its true click probability p, so the oracle AUC (the best any model can
reach on the sampled labels) is known. The interactions matter: a first-order-only model
stays well below the oracle (tests check at least 0.03 AUC).

Optional planted multi-valued field (`multi_valued`, off by default: the default data is
unchanged byte for byte): a list T1 of 0..20 tags per row (uniform length, mean 10; tags drawn
from a Zipf law over TAG_VOCAB values), adding

    s_T · mean_j v[t_j]     (0 for an empty list)

to the logit, v ~ N(0, 1) per tag, s_T = TAG_SCALE. The truth p includes it in every
representation of the field given to the model:

    "list"   T1 as a multi-valued field (max_len 20): what a model can fully use
    "first"  T1's first tag only, as a single-valued field (0 = empty list)
    "drop"   no T1 at all
    "none"   (default) no planted T1: the data of generator v2

Generation is chunked and deterministic: chunk i of a given seed is the same whatever the
total size, so 10M+ rows can be written to disk without holding them in memory. Rows are
i.i.d., so taking the first 80% as train, the next 10% as valid and the last 10% as test is
a random 8:1:1 split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .batch import MultiValuedField
from .dataset import SPLITS, CTRDataset, PreparedWriter, Split, load_prepared

NUM_NUMERIC = 13
NUM_CATEGORICAL = 26
CHUNK_ROWS = 1 << 17
NUMERIC_BUCKETS = 64  # index 0 = missing, 1..12 = values <= 2 (incl. negatives), then floor(ln(x)^2)

# Cardinalities of C1..C26: from tens to 200k, roughly like Criteo's spread (log-spaced, fixed).
CATEGORICAL_CARDINALITIES = [
    30, 200_000, 1_000, 50, 8_000, 12, 400, 60, 3, 20_000, 3_000, 150_000, 2_500,
    25, 5_000, 100_000, 10, 1_500, 600, 4, 120_000, 15, 14, 30_000, 80, 40_000,
]
# Which fields carry the planted interactions (numeric fields are indices 0..12, C_j is 12 + j).
INTERACTION_FIELDS = [0, 2, 5, 8, 10, 13, 16, 18, 20, 21, 26, 29, 32, 34, 35]  # fields with <= 64 values
GATE_FIELDS = (1, 37)  # a[x_a], c[x_c]: I2 and C25
LATENT_DIM = 2  # size of the latent factors u
INTERACTION_SCALE = 0.7  # s
NUM_PAIRS = 6  # field pairs with a planted interaction
MULTI_VALUED = ("none", "list", "first", "drop")  # the planted multi-valued field (module docstring)
TAG_FIELD = "T1"
TAG_VOCAB = 200  # distinct tags (ids 1..TAG_VOCAB; 0 = padding / empty list)
TAG_MAX_LEN = 20  # tags per row: uniform on 0..TAG_MAX_LEN (mean 10)
TAG_SCALE = 4.0  # s_T (chosen in docs/data.md: the ceiling gaps, oracle with T1 minus the best use of its first tag / of nothing)


def field_names() -> list[str]:
    return [f"I{i}" for i in range(1, NUM_NUMERIC + 1)] + [f"C{i}" for i in range(1, NUM_CATEGORICAL + 1)]


def cardinalities() -> list[int]:
    # categorical: index 0 = missing, 1..card = values
    return [NUMERIC_BUCKETS] * NUM_NUMERIC + [c + 1 for c in CATEGORICAL_CARDINALITIES]


def discretize_numeric(values: np.ndarray, buckets: int = NUMERIC_BUCKETS) -> np.ndarray:
    """Criteo-style bucket index for raw numeric values (NaN = missing).

    0 = missing; values <= 2 (integers, negatives down to -9 clipped) get buckets 1..12;
    x > 2 gets 13 + floor(ln(x)^2), clipped to the last bucket.
    """
    out = np.zeros(values.shape, dtype=np.int32)
    present = ~np.isnan(values)
    v = values[present]
    small = v <= 2
    idx = np.empty(v.shape, dtype=np.int64)
    idx[small] = np.clip(np.floor(v[small]), -9, 2).astype(np.int64) + 10  # -9..2 -> 1..12
    large = ~small
    idx[large] = 13 + np.floor(np.log(v[large]) ** 2).astype(np.int64)
    out[present] = np.minimum(idx, buckets - 1)
    return out


@dataclass
class PlantedModel:
    """The true click model's parameters (drawn once per seed)."""

    bias: float
    first_order: list[np.ndarray]  # per field: [cardinality]
    latent: dict[int, np.ndarray]  # field -> [cardinality, LATENT_DIM]
    pairs: list[tuple[int, int]]
    gate: tuple[np.ndarray, np.ndarray]
    zipf_probs: list[np.ndarray]  # categorical fields: probability of value 1..card
    numeric_params: np.ndarray  # [13, 3]: log-mean, log-std, missing rate

    @classmethod
    def draw(cls, seed: int) -> "PlantedModel":
        rng = np.random.default_rng([seed, 0xC7])
        cards = cardinalities()
        # head-heavy fields carry most of the first-order signal; huge fields' tails are mostly noise
        first = [rng.normal(0, 0.25 if c <= 5_000 else 0.05, size=c) for c in cards]
        for i in range(NUM_NUMERIC):  # numeric effects vary smoothly with the bucket, as counts do
            first[i] = np.cumsum(rng.normal(0, 0.08, size=cards[i]))
            first[i] -= first[i].mean()
        latent = {i: rng.normal(0, 1.0, size=(cards[i], LATENT_DIM)) for i in INTERACTION_FIELDS}
        pairs = [(a, b) for n, a in enumerate(INTERACTION_FIELDS) for b in INTERACTION_FIELDS[n + 1 :]]
        pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), size=NUM_PAIRS, replace=False))]
        gate = (rng.normal(0, 1.0, size=cards[GATE_FIELDS[0]]), rng.normal(0, 1.0, size=cards[GATE_FIELDS[1]]))
        zipf = []
        for c in CATEGORICAL_CARDINALITIES:
            s = rng.uniform(1.2, 1.6)
            w = 1.0 / np.arange(1, c + 1) ** s
            zipf.append(w / w.sum())
        numeric = np.stack(
            [rng.uniform(0.5, 3.5, NUM_NUMERIC), rng.uniform(0.8, 2.0, NUM_NUMERIC), rng.uniform(0.0, 0.45, NUM_NUMERIC)],
            axis=1,
        )
        return cls(-1.9, first, latent, pairs, gate, zipf, numeric)

    def sample_chunk(self, seed: int, chunk: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of chunk `chunk`: x [rows, 39] int32, y [rows] uint8, p [rows] float32."""
        x, y, p, _ = self.sample_chunk_with(seed, chunk, rows, None)
        return x, y, p

    def sample_chunk_with(
        self, seed: int, chunk: int, rows: int, tags: Optional["PlantedTags"]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """As sample_chunk, with the planted multi-valued field T1 when `tags` is given: also its
        ids [rows, TAG_MAX_LEN] (and its effect in y and p)."""
        rng = np.random.default_rng([seed, chunk])
        x = np.empty((rows, NUM_NUMERIC + NUM_CATEGORICAL), dtype=np.int32)
        for i, (mu, sigma, miss) in enumerate(self.numeric_params):
            raw = np.floor(rng.lognormal(mu, sigma, rows))
            if i == 1:  # like Criteo's I2: some small negative values
                raw = np.where(rng.random(rows) < 0.1, -rng.integers(1, 4, rows), raw)
            raw[rng.random(rows) < miss] = np.nan
            x[:, i] = discretize_numeric(raw)
        for j, probs in enumerate(self.zipf_probs):
            cdf = np.cumsum(probs)
            vals = np.searchsorted(cdf, rng.random(rows) * cdf[-1]) + 1
            missing = rng.random(rows) < (0.3 if j % 7 == 3 else 0.02)
            x[:, NUM_NUMERIC + j] = np.where(missing, 0, np.minimum(vals, len(probs)))
        logit = self.logit(x)
        seq = None
        if tags is not None:
            seq = tags.sample(seed, chunk, rows)
            logit = logit + tags.logit(seq)
        p = 1.0 / (1.0 + np.exp(-logit))
        y = (rng.random(rows) < p).astype(np.uint8)
        # float32 rounds p > 1 - 6e-8 to exactly 1 (logits reach about 20): keep p strictly inside (0, 1)
        return x, y, np.clip(p, 1e-7, 1 - 1e-7).astype(np.float32), seq

    def logit(self, x: np.ndarray) -> np.ndarray:
        out = np.full(len(x), self.bias)
        for i, w in enumerate(self.first_order):
            out += w[x[:, i]]
        inter = np.zeros(len(x))
        vecs = {i: u[x[:, i]] for i, u in self.latent.items()}
        for a, b in self.pairs:
            inter += np.einsum("nd,nd->n", vecs[a], vecs[b])
        inter *= INTERACTION_SCALE
        gate = 2.0 / (1.0 + np.exp(-(self.gate[0][x[:, GATE_FIELDS[0]]] + self.gate[1][x[:, GATE_FIELDS[1]]])))
        return out + gate * inter


@dataclass
class PlantedTags:
    """The planted multi-valued field T1 (drawn from its own random streams, so the rest of the
    data is the same with or without it)."""

    zipf_cdf: np.ndarray  # [TAG_VOCAB]
    effect: np.ndarray  # v per tag id, [TAG_VOCAB + 1] (index 0 unused)

    @classmethod
    def draw(cls, seed: int) -> "PlantedTags":
        rng = np.random.default_rng([seed, 0x7A65])
        w = 1.0 / np.arange(1, TAG_VOCAB + 1) ** rng.uniform(0.8, 1.0)
        return cls(np.cumsum(w / w.sum()), np.concatenate([[0.0], rng.normal(0, 1.0, TAG_VOCAB)]))

    def sample(self, seed: int, chunk: int, rows: int) -> np.ndarray:
        """int32 [rows, TAG_MAX_LEN]: each row's tags, left-aligned, 0 = padding."""
        rng = np.random.default_rng([seed, chunk, 0x7A65])
        lengths = rng.integers(0, TAG_MAX_LEN + 1, rows)
        tags = np.searchsorted(self.zipf_cdf, rng.random((rows, TAG_MAX_LEN)) * self.zipf_cdf[-1]) + 1
        tags = np.minimum(tags, TAG_VOCAB)
        return np.where(np.arange(TAG_MAX_LEN)[None, :] < lengths[:, None], tags, 0).astype(np.int32)

    def logit(self, seq: np.ndarray) -> np.ndarray:
        n = np.count_nonzero(seq, axis=1)
        return TAG_SCALE * self.effect[seq].sum(axis=1) / np.maximum(n, 1)


def _chunks(rows: int) -> Iterator[tuple[int, int, int]]:
    for chunk, start in enumerate(range(0, rows, CHUNK_ROWS)):
        yield chunk, start, min(start + CHUNK_ROWS, rows)


def split_bounds(rows: int) -> dict[str, tuple[int, int]]:
    """Row ranges of the 8:1:1 split (rows are i.i.d., so this is a random split)."""
    a, b = int(rows * 0.8), int(rows * 0.9)
    return {"train": (0, a), "valid": (a, b), "test": (b, rows)}


def _field_specs() -> list[dict]:
    kinds = ["numeric"] * NUM_NUMERIC + ["categorical"] * NUM_CATEGORICAL
    return [{"name": n, "kind": k, "cardinality": c} for n, k, c in zip(field_names(), kinds, cardinalities())]


GENERATOR = "masknet.data.synthetic v2"  # bump whenever the same (rows, seed) would give other data


def source(rows: int, seed: int, multi_valued: str = "none") -> dict:
    """What a dataset of `rows` rows from seed `seed` is (its meta's "source")."""
    out = {"name": "synthetic", "rows": rows, "seed": seed, "generator": GENERATOR}
    if multi_valued != "none":
        out["multi_valued"] = multi_valued
    return out


def _check_multi_valued(multi_valued: str) -> None:
    if multi_valued not in MULTI_VALUED:
        raise ValueError(f"multi_valued: expected one of {', '.join(MULTI_VALUED)}, got {multi_valued!r}")


def _layout(multi_valued: str) -> tuple[list[str], list[int], list[dict], list[MultiValuedField]]:
    """Field names, cardinalities, meta field entries and multi-valued fields of a representation of T1."""
    names, cards, specs = field_names(), cardinalities(), _field_specs()
    if multi_valued == "first":
        names, cards = names + [TAG_FIELD], cards + [TAG_VOCAB + 1]
        specs = specs + [{"name": TAG_FIELD, "kind": "categorical", "cardinality": TAG_VOCAB + 1}]
    multi = [MultiValuedField(TAG_FIELD, TAG_VOCAB + 1, TAG_MAX_LEN)] if multi_valued == "list" else []
    return names, cards, specs, multi


def _represent(x: np.ndarray, seq: Optional[np.ndarray], multi_valued: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(x, seq) as the model gets them: T1 as a list, as its first tag, or not at all."""
    if multi_valued == "first":
        return np.concatenate([x, seq[:, :1]], axis=1), None
    return x, (seq if multi_valued == "list" else None)


def generate(rows: int, seed: int = 7, multi_valued: str = "none") -> CTRDataset:
    """Generate `rows` rows in memory, split 8:1:1 (`multi_valued`: the module docstring)."""
    _check_multi_valued(multi_valued)
    model = PlantedModel.draw(seed)
    tags = PlantedTags.draw(seed) if multi_valued != "none" else None
    parts = [model.sample_chunk_with(seed, c, b - a, tags) for c, a, b in _chunks(rows)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    p = np.concatenate([p[2] for p in parts])
    seq = np.concatenate([p[3] for p in parts]) if tags is not None else None
    x, seq = _represent(x, seq, multi_valued)
    names, cards, specs, multi = _layout(multi_valued)
    cut = lambda a_, lo, hi: None if a_ is None else a_[lo:hi]  # noqa: E731
    splits = {s: Split(x[a:b], y[a:b], p[a:b], cut(seq, a, b)) for s, (a, b) in split_bounds(rows).items()}
    meta = {"fields": specs, "source": source(rows, seed, multi_valued)}
    if multi:
        meta["multi_valued"] = [{"kind": "multi_valued", **m.to_dict()} for m in multi]
    return CTRDataset(names, cards, splits, meta, multi)


def write_synthetic(
    path: str | Path, rows: int, seed: int = 7, progress: Optional[callable] = None, multi_valued: str = "none"
) -> CTRDataset:
    """Generate `rows` rows straight to a prepared folder, one chunk in memory at a time."""
    _check_multi_valued(multi_valued)
    model = PlantedModel.draw(seed)
    tags = PlantedTags.draw(seed) if multi_valued != "none" else None
    _, _, specs, multi = _layout(multi_valued)
    writer = PreparedWriter(path, specs, with_prob=True, multi_valued=[{"kind": "multi_valued", **m.to_dict()} for m in multi])
    bounds = split_bounds(rows)
    for c, a, b in _chunks(rows):
        x, y, p, seq = model.sample_chunk_with(seed, c, b - a, tags)
        x, seq = _represent(x, seq, multi_valued)
        for s in SPLITS:  # a chunk may straddle a split boundary
            lo, hi = max(a, bounds[s][0]), min(b, bounds[s][1])
            if lo < hi:
                part = slice(lo - a, hi - a)
                writer.append(s, x[part], y[part], p[part], None if seq is None else seq[part])
        if progress is not None:
            progress(b - a)
    writer.close(source=source(rows, seed, multi_valued))
    return load_prepared(path)
