"""The models the package can build: one table, the single source of their names.

Each entry names a model, says where its class lives (`"module:Class"`, imported on first use, so
that the CLI and config validation list and check names without importing PyTorch, about 2-3 s),
and the two facts config validation needs before any class is loaded. What a model reads from
`ModelConfig` (`config_fields`), its tuning space (`search_space`) and training defaults
(`train_defaults`) are declared on the class itself, beside its code (models/base.py).

    register_model("mymodel", MyModel, "a one-line summary")   a model outside the package (docs/extending.md)

`masknet.models.model_class(name)` turns an entry into its class; `masknet.models.REGISTRY` is the
name -> class view of this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cls: Any  # "masknet.models.masknet:SerialMaskNet", or a class (a model registered at run time)
    summary: str
    multitask_backbone: bool = False  # models/multitask.py can build its towers on this model
    paper_masknet: bool = False  # one of the paper's two MaskNets (its ablation tables, MaskNetClassifier)


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, cls: Any, summary: str, *, multitask_backbone: bool = False, paper_masknet: bool = False) -> ModelEntry:
    """Add a model to the table (`cls`: a models.base.CTRModel subclass, or its "module:Class" path)."""
    if not name or name != name.strip().lower() or "," in name:
        raise ValueError(f"model name {name!r}: expected a lower-case word (it is a CLI choice and a config value)")
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered ({MODELS[name].cls})")
    entry = ModelEntry(name, cls, summary, multitask_backbone, paper_masknet)
    MODELS[name] = entry
    return entry


def model_names() -> tuple[str, ...]:
    return tuple(MODELS)


def model_entry(name: str) -> ModelEntry:
    """The entry of `name`; an unknown name is a ConfigError naming `model.name` and the choices."""
    entry = MODELS.get(name)
    if entry is None:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return entry


def model_help() -> str:
    """Every model with its summary, for the CLI's help."""
    return "; ".join(f"{e.name}: {e.summary}" for e in MODELS.values())


def multitask_backbones() -> tuple[str, ...]:
    return tuple(n for n, e in MODELS.items() if e.multitask_backbone)


def paper_masknets() -> tuple[str, ...]:
    return tuple(n for n, e in MODELS.items() if e.paper_masknet)


# The built-in models, in the order the CLI lists them (and `masknet bench` runs them).
_M = "masknet.models."
register_model("sermasknet", _M + "masknet:SerialMaskNet", "SerMaskNet: MaskBlocks stacked in series (the paper, section 3)",
               multitask_backbone=True, paper_masknet=True)
register_model("paramasknet", _M + "masknet:ParallelMaskNet", "ParaMaskNet: MaskBlocks side by side, then an MLP (the paper, section 3)",
               multitask_backbone=True, paper_masknet=True)
# baselines of the paper's Table 2, plus LR and DCN-V2 (docs/baselines.md)
register_model("lr", _M + "lr:LogisticRegression", "logistic regression on one-hot fields")
register_model("fm", _M + "fm:FM", "factorization machine (Rendle 2010)")
register_model("dnn", _M + "dnn:DNN", "an MLP over the concatenated embeddings", multitask_backbone=True)
register_model("deepfm", _M + "deepfm:DeepFM", "DeepFM: FM + DNN on shared embeddings (Guo et al. 2017)")
register_model("dcn", _M + "dcn:DCN", "Deep & Cross Network (Wang et al. 2017)")
register_model("dcnv2", _M + "dcn:DCNV2", "DCN-V2: full-rank cross layers (Wang et al. 2021)", multitask_backbone=True)
register_model("xdeepfm", _M + "xdeepfm:XDeepFM", "xDeepFM: compressed interaction network + DNN (Lian et al. 2018)")
register_model("autoint", _M + "autoint:AutoInt", "AutoInt: multi-head self-attention over fields (Song et al. 2019)")
