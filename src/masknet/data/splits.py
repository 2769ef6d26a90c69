"""Which split each data row goes to (8:1:1), streaming: see data/prepare.py's module doc.

    random   row r (0-based data row of the input, bad lines included) goes to train if u < 0.8,
             valid if u < 0.9, else test, with u = splitmix64(r XOR splitmix64(seed)) / 2^64
    time     rows ranked by (time column, then file order), or by file order alone when the format
             has no time column: the earliest 80% train, the next 10% valid, the last 10% test
    explicit one file per split

`plan_splits` is prepare's pass 0 (time split only: the row count or the time values' counts) and
returns the `SplitPlan` that assigns every later chunk's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError
from .dataset import SPLITS
from .encoder import TokenCounter, splitmix64, to_numpy
from .readers import count_data_rows
from .rows import ParsedChunk
from .schema import DatasetSpec

TRAIN, VALID, TEST = 0, 1, 2
RATIOS = [0.8, 0.1, 0.1]


def random_split(row_ids: np.ndarray, seed: int) -> np.ndarray:
    """0/1/2 = train/valid/test for each data row, 8:1:1, from a seeded hash of the row index."""
    key = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    u = (splitmix64(row_ids.astype(np.uint64) ^ key) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return ((u >= 0.8).astype(np.uint8) + (u >= 0.9).astype(np.uint8))


def rank_split(rank: np.ndarray, total: int) -> np.ndarray:
    a, b = int(total * 0.8), int(total * 0.9)
    return ((rank >= a).astype(np.uint8) + (rank >= b).astype(np.uint8))


class TimeRanker:
    """Rank of each valid row in (time, file order), from the time values' counts (pass 0)."""

    def __init__(self, counts: pa.Table):
        order = pc.sort_indices(counts, sort_keys=[("t", "ascending")])
        counts = counts.take(order)
        self.times = to_numpy(counts["t"]).astype(np.int64)
        c = to_numpy(counts["c"]).astype(np.int64)
        self.before = np.concatenate([[0], np.cumsum(c)[:-1]])
        self.total = int(c.sum())
        self.seen = np.zeros(len(self.times), dtype=np.int64)

    def reset(self) -> None:
        self.seen[:] = 0

    def ranks(self, t: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.times, t)
        order = np.argsort(pos, kind="stable")
        sp = pos[order]
        within = np.arange(len(sp)) - np.searchsorted(sp, sp, side="left")
        k = np.empty(len(t), dtype=np.int64)
        k[order] = within + self.seen[sp]
        np.add.at(self.seen, pos, 1)
        return self.before[pos] + k


@dataclass
class SplitPlan:
    """How rows are assigned (`describe`: meta.json's `split`)."""

    describe: dict[str, Any]
    kind: str  # "random" or "time" (explicit files: every file's rows get that file's split)
    seed: int
    ranker: Optional[TimeRanker] = None  # time split by a time column
    total_rows: int = 0  # time split by file order: the data rows of the input

    def assign(self, parsed: ParsedChunk, role: Optional[int]) -> np.ndarray:
        """0/1/2 per row of the chunk; `role`: the split of an explicit file."""
        if role is not None:
            return np.full(parsed.n, role, dtype=np.uint8)
        if self.kind == "random":
            return random_split(parsed.row_ids, self.seed)
        if self.ranker is not None:
            codes = np.full(parsed.n, TEST, dtype=np.uint8)
            g = parsed.good
            codes[g] = rank_split(self.ranker.ranks(parsed.time[g]), self.ranker.total)
            return codes
        return rank_split(parsed.row_ids, self.total_rows)


def plan_splits(
    spec: DatasetSpec, sources: list[tuple[str, Optional[int]]], split: str, seed: int,
    chunks: Callable[[str], Iterator[ParsedChunk]], refuse_bad: Callable[[ParsedChunk], None],
) -> SplitPlan:
    """Pass 0: a time split counts the time values (or the rows) of the one input first."""
    if sources[0][1] is not None:
        return SplitPlan({"kind": "explicit", "files": {s: p for s, (p, _) in zip(SPLITS, sources)}}, split, seed)
    if split == "random":
        return SplitPlan({"kind": "random", "ratios": RATIOS, "seed": seed, "method": "splitmix64(row ^ splitmix64(seed))"}, split, seed)
    (input, _), = sources
    if not spec.time:
        total = count_data_rows(spec, input)
        return SplitPlan({"kind": "time", "column": None, "order": "file", "ratios": RATIOS, "data_rows": total}, split, seed, total_rows=total)
    counter = TokenCounter()
    for parsed in chunks(input):
        refuse_bad(parsed)
        g = parsed.good
        if g.any():
            t, c = np.unique(parsed.time[g], return_counts=True)
            counter.add(pa.array(t), c)
    counts = counter.result()
    if counts is None:
        raise DataError(f"{input}: no valid data rows")
    ranker = TimeRanker(counts)
    return SplitPlan({"kind": "time", "column": spec.time, "ratios": RATIOS, "ranked_rows": ranker.total}, split, seed, ranker)
