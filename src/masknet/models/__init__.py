"""Model zoo: every model maps LongTensor [B, f] (or a data.batch.Batch) -> logits [B] (see base.CTRModel)."""

from __future__ import annotations

from typing import Sequence

from ..config import MODEL_NAMES, ModelConfig
from ..data.batch import MultiValuedField
from .base import CTRModel
from .autoint import AutoInt
from .dcn import DCN, DCNV2
from .deepfm import DeepFM
from .dnn import DNN
from .fm import FM
from .lr import LogisticRegression
from .masknet import ParallelMaskNet, SerialMaskNet
from .xdeepfm import XDeepFM

REGISTRY: dict[str, type[CTRModel]] = {
    "sermasknet": SerialMaskNet,
    "paramasknet": ParallelMaskNet,
    # baselines of the paper's Table 2, plus LR and DCN-V2 (docs/baselines.md)
    "lr": LogisticRegression,
    "fm": FM,
    "dnn": DNN,
    "deepfm": DeepFM,
    "dcn": DCN,
    "dcnv2": DCNV2,
    "xdeepfm": XDeepFM,
    "autoint": AutoInt,
}
# config.MODEL_NAMES is the torch-free copy the CLI and config validation use; keep them equal
if tuple(REGISTRY) != MODEL_NAMES:
    raise RuntimeError(f"config.MODEL_NAMES {MODEL_NAMES} must list the REGISTRY's models {tuple(REGISTRY)}")


def build_model(cfg: ModelConfig, cardinalities: Sequence[int], multi_valued: Sequence[MultiValuedField] = ()) -> CTRModel:
    """Instantiate `cfg.name` for single-valued fields with the given cardinalities (and multi-valued fields)."""
    return REGISTRY[cfg.name](cardinalities, cfg, tuple(multi_valued))


__all__ = [
    "CTRModel", "REGISTRY", "MODEL_NAMES", "build_model", "SerialMaskNet", "ParallelMaskNet", "LogisticRegression",
    "FM", "DNN", "DeepFM", "DCN", "DCNV2", "XDeepFM", "AutoInt",
]
