"""Model zoo: every model maps LongTensor [B, f] (or a data.batch.Batch) -> logits [B] (see base.CTRModel);
a multi-task model (model.multitask, models/multitask.py) -> logits [B, T], one per task."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Iterator, Optional, Sequence

from ..config import ModelConfig
from ..registry import model_entry, model_names, register_model
from ..data.batch import MultiValuedField
from .base import CTRModel
from .autoint import AutoInt
from .dcn import DCN, DCNV2
from .deepfm import DeepFM
from .dnn import DNN
from .fm import FM
from .lr import LogisticRegression
from .masknet import ParallelMaskNet, SerialMaskNet
from .multitask import MultiTaskModel
from .xdeepfm import XDeepFM


def model_class(name: str) -> type[CTRModel]:
    """The class of the registered model `name` (masknet.registry); unknown names: a ConfigError."""
    cls = model_entry(name).cls
    if isinstance(cls, str):  # a built-in entry names its class; importing it is this layer's business
        module, _, attr = cls.partition(":")
        cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, CTRModel)):
        raise TypeError(f"model {name!r}: {cls!r} is not a masknet.models.base.CTRModel subclass")
    return cls


class _Registry(Mapping):
    """name -> model class, for every model in masknet.registry (read live: a model registered later
    shows up)."""

    def __getitem__(self, name: str) -> type[CTRModel]:
        if name not in model_names():
            raise KeyError(name)
        return model_class(name)

    def __iter__(self) -> Iterator[str]:
        return iter(model_names())

    def __len__(self) -> int:
        return len(model_names())


REGISTRY: Mapping[str, type[CTRModel]] = _Registry()


def with_size_defaults(cfg: ModelConfig, train_rows: Optional[int]) -> ModelConfig:
    """`cfg` with every setting it leaves to the model (None) set to the model's default for a train
    split of `train_rows` rows (`model_defaults`; None rows: not known, the large-data value). A
    multi-task model takes the large-data values: the small-data rule was measured on one task."""
    rows = train_rows if cfg.multitask == "none" else None
    defaults = model_class(cfg.name).model_defaults(rows)
    filled = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **filled) if filled else cfg


def build_model(
    cfg: ModelConfig, cardinalities: Sequence[int], multi_valued: Sequence[MultiValuedField] = (), tasks: Optional[Sequence[str]] = None
) -> CTRModel:
    """Instantiate `cfg.name` for single-valued fields with the given cardinalities (and multi-valued
    fields); with `cfg.multitask`, a MultiTaskModel on that backbone with one output per task in `tasks`.
    Settings left to the model (None) take its large-data value here; a run fills them for its train
    split first (`with_size_defaults`)."""
    cfg = with_size_defaults(cfg, None)
    if cfg.multitask != "none":
        if not tasks:
            raise ValueError("a multi-task model needs the names of its tasks")
        return MultiTaskModel(cardinalities, cfg, tasks, tuple(multi_valued))
    return model_class(cfg.name)(cardinalities, cfg, tuple(multi_valued))


__all__ = [
    "CTRModel", "REGISTRY", "model_class", "model_names", "register_model", "build_model", "with_size_defaults", "SerialMaskNet", "ParallelMaskNet", "LogisticRegression",
    "FM", "DNN", "DeepFM", "DCN", "DCNV2", "XDeepFM", "AutoInt", "MultiTaskModel",
]
