"""Search spaces for `masknet tune`: which config keys a study varies, over which ranges.

Each model class declares its own (`CTRModel.search_space`, beside its code); this module holds the
kinds of range and the training part they share. Plain data, no Optuna: the tuning layer
(`masknet.tuning.space`) turns a space into Optuna suggestions and validates it against RunConfig.

A space maps a config key (`train.lr`, `model.block_dim`) to one of
    Float(low, high, log)      a real number
    Int(low, high, log)        an integer
    Choice(values)             one of a few values (numbers, strings, booleans)
    Layers(widths, depths)     a list config key (e.g. `model.dnn_hidden`) of `depth` equal widths:
                               two Optuna parameters, `<key>.width` and `<key>.depth`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Int:
    low: int
    high: int
    log: bool = False


@dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Layers:
    widths: tuple[int, ...]
    depths: tuple[int, ...]


Range = Union[Float, Int, Choice, Layers]
SearchSpace = dict[str, Range]

# Shared by every model: the optimiser and the data-size-scaled prior (docs/model.md, "masknet tune").
# Ranges span the values measured in docs/model.md's defaults study, about 10x either side of the default.
TRAINING: SearchSpace = {
    "train.lr": Float(1e-4, 1e-2, log=True),
    # down to 64: the default batch rule trains small splits at 128-256 (criteo-8k: 128), and a study
    # trains at the batch it draws, so the space must hold what the default uses
    "train.batch_size": Choice((64, 128, 256, 512, 1024, 2048)),
    "train.l2_prior": Float(0.01, 100.0, log=True),
}
EMBEDDING: SearchSpace = {"model.embedding_dim": Choice((8, 10, 16, 32))}
DNN: SearchSpace = {
    "model.dnn_hidden": Layers(widths=(100, 200, 400, 800), depths=(1, 2, 3, 4)),
    "model.dropout": Float(0.0, 0.5),
}
