"""Typed run configuration: model, training and data settings.

Every run saves its resolved `RunConfig` as YAML, so any result can be re-run
with `masknet train --config RUN/config.yaml`. Keys are validated at the
boundary: an unknown key, a wrong type or an out-of-range value raises
`ConfigError` naming the key (dotted path, e.g. `model.block_dim`).

Paper-faithful defaults (the paper's Section 4.1, experimental settings). Choices the paper leaves
open are marked "OPEN" in the field comments and listed in docs/model.md.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError
from .registry import model_entry, multitask_backbones

MULTITASK_KINDS = ("none", "shared_bottom", "mmoe")
CALIBRATIONS = ("none", "isotonic", "platt")


@dataclass
class ModelConfig:
    """Architecture. Fields a model does not use are ignored by it."""

    name: str = "sermasknet"
    embedding_dim: int = 10  # k, per field (paper: 10 for all models)
    # OPEN (the paper does not state it): after every hidden ReLU. None = the model's default for the
    # train split's size (its class's `model_defaults`): 0.3 for the MaskNets below 20,000 train
    # rows, where they overfit within a few dozen steps (docs/model.md, "Dropout on small data"); 0 otherwise
    dropout: Optional[float] = None

    # --- MaskNet (paper section 3) ---
    num_blocks: int = 3  # paper: 3 MaskBlocks in the main comparison
    block_dim: int = 400  # q, OPEN: the paper does not state the block width
    reduction_ratio: float = 2.0  # r = t / z, against the MASKED width z (paper), not the mask input
    use_mask: bool = True  # ablation "w/o mask": V_mask is dropped (identity)
    emb_layernorm: bool = True  # per-field LayerNorm on the embedding (Eq. 9)
    block_layernorm: bool = True  # LayerNorm inside each block's FFN, before ReLU (Eq. 10)
    block_ffn: bool = True  # ablation "w/o block FFN": block output = masked input
    top_mlp: list[int] = field(default_factory=lambda: [400, 400, 400])  # ParaMaskNet, OPEN: 3x400
    # DEVIATION (not in the paper): a first-order term w_0 + Σ_i w[x_i] added to the MaskNets' logit and
    # fitted first, as LR's own run, before the deep part joins (training.factor_phase, docs/model.md
    # "MaskNet: LR first"): on small data LR beat every MaskNet. None = the model's default for the train
    # split's size: on below 100,000 train rows, off above and in the paper preset. DeepFM has the term
    # already: for it `true` fits it first (opt-in, no size default; docs/model.md "DeepFM: LR first")
    linear_term: Optional[bool] = None

    # --- baselines (the paper's Section 4.1: DNN parts 3x400 ReLU) ---
    dnn_hidden: list[int] = field(default_factory=lambda: [400, 400, 400])
    cross_layers: int = 3  # DCN / DCN-V2
    cin_layers: list[int] = field(default_factory=lambda: [200, 200, 200])  # xDeepFM CIN feature maps
    attention_layers: int = 3  # AutoInt
    attention_heads: int = 2
    attention_dim: int = 32  # per head
    attention_residual: bool = True

    # --- multi-task (models/multitask.py, docs/multitask.md) ---
    # none: one logit per row (every model); shared_bottom: the backbone feeds one tower per task;
    # mmoe: num_experts backbones (sharing the embedding), a softmax gate per task (Ma et al. 2018)
    multitask: str = "none"
    num_experts: int = 3  # mmoe: OPEN (MMoE's paper uses 8 small experts; 3 full MaskNets cost 3x)
    tower_hidden: list[int] = field(default_factory=lambda: [64])  # per-task tower, OPEN: one ReLU layer of 64
    # Defaults chosen on validation AUC (docs/multitask.md "Results": built-in multi-task data, data seeds 7
    # and 11, 3 training seeds): `first` + one task block keeps the click's validation AUC exactly the click
    # alone's and gave the purchase the largest gain of every mode tried (all, pcgrad, scales 0.1-0.5).
    # Which tasks' losses train the shared embedding and bottom: all; first (the others' towers, gates and
    # task blocks read them detached: they learn from the first task's representation, never change it);
    # or pcgrad (all, but per row the part of another task's gradient that points against the first task's
    # is projected out at the bottom's output; models/multitask.py TaskViews)
    shared_gradient: str = "first"
    # the factor on the other tasks' gradients into the shared parts (all, pcgrad): 1 = all of it,
    # 0 = none (the gradient of `first`)
    shared_gradient_scale: float = 1.0
    # every task but the first also gets this many MaskBlocks of its own on V_emb (block_dim wide), its
    # tower reading [bottom or its MMoE mixture ; own]; 0 = none
    task_blocks: int = 1

    def validate(self) -> None:

        entry = model_entry(self.name)  # the models are listed in masknet.registry (torch-free)
        _positive("model.embedding_dim", self.embedding_dim)
        _positive("model.num_blocks", self.num_blocks)
        _positive("model.block_dim", self.block_dim)
        if not self.reduction_ratio > 0:
            raise ConfigError(f"model.reduction_ratio: must be > 0, got {self.reduction_ratio}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        for key in ("top_mlp", "dnn_hidden", "cin_layers"):
            for width in getattr(self, key):
                _positive(f"model.{key}", width)
        if not self.dnn_hidden:
            raise ConfigError("model.dnn_hidden: needs at least one layer")
        _positive("model.cross_layers", self.cross_layers)
        _positive("model.attention_layers", self.attention_layers)
        _positive("model.attention_heads", self.attention_heads)
        _positive("model.attention_dim", self.attention_dim)
        if self.shared_gradient not in ("all", "first", "pcgrad"):
            raise ConfigError(f"model.shared_gradient: expected 'all', 'first' or 'pcgrad', got {self.shared_gradient!r}")
        if not 0.0 <= self.shared_gradient_scale <= 1.0:
            raise ConfigError(f"model.shared_gradient_scale: must be in [0, 1], got {self.shared_gradient_scale}")
        if self.shared_gradient == "first" and self.shared_gradient_scale != 1.0:
            raise ConfigError(
                "model.shared_gradient_scale: has no effect with model.shared_gradient=first (no other task's gradient "
                "reaches the shared parts); use shared_gradient=all or pcgrad with it"
            )
        if self.multitask not in MULTITASK_KINDS:
            raise ConfigError(f"model.multitask: expected one of {', '.join(MULTITASK_KINDS)}, got {self.multitask!r}")
        if self.multitask != "none" and not entry.multitask_backbone:
            raise ConfigError(
                f"model.multitask: {self.multitask} is built on {', '.join(multitask_backbones())}; got model.name={self.name!r}"
            )
        _positive("model.num_experts", self.num_experts)
        if self.task_blocks < 0:
            raise ConfigError(f"model.task_blocks: must be >= 0, got {self.task_blocks}")
        for width in self.tower_hidden:
            _positive("model.tower_hidden", width)


@dataclass
class TrainConfig:
    """Optimisation and evaluation (docs/model.md, "Training defaults", says what chose each value)."""

    epochs: int = 10  # at most this many passes over the train split (raised to reach min_steps)
    batch_size: int = 1024  # paper: 1024; halved on small data until min_batches_per_epoch is reached
    # small data: at least this many steps per epoch, by halving the batch (not below 64); 0 = off.
    # None = the model's default: 32 for the deep models (an 8,000-row train split trains at 256 rows
    # per batch, 32,768 rows or more at batch_size), off for LR and FM.
    min_batches_per_epoch: Optional[int] = None
    # None = the model's own default (its class's `train_defaults`): 1e-3 for the deep models (the
    # paper's summary; its text says 1e-4, see docs/model.md), larger for the linear ones
    lr: Optional[float] = None
    # the rate of the first phase of a two-phase fit (training.factor_phase): a MaskNet's first-order
    # term fitted alone, as LR is. None = the model's default (LR's 1e-2; unset: `lr`)
    first_phase_lr: Optional[float] = None
    # whether phase 2 of a two-phase fit has a warm-up of its own (lr_warmup_steps from its first step;
    # no early stop within it). None = the model's default: yes for a MaskNet's deep part (on small data
    # it peaks within a warm-up: +0.007-0.013 valid AUC on three selection sets, docs/model.md); unset
    # (no) for FM, where it was no better ("FM: LR first", variant W)
    second_phase_warmup: Optional[bool] = None
    # the learning rate rises linearly from lr/300 to lr over the first 300 steps: on small data the best
    # model is found within them (at about the paper's 1e-4), on large data they are a rounding error
    lr_warmup_steps: int = 300
    # after each evaluation without a better validation AUC the learning rate is multiplied by this
    # (1 = constant; FuxiCTR's "reduce on plateau" uses 0.1)
    lr_plateau_factor: float = 1.0
    l2_embedding: float = 0.0  # OPEN (paper: "lambda"): on the embedding rows a batch looks up
    l2_dense: float = 0.0  # OPEN: on every dense weight matrix (mask, FFN, prediction layer)
    # c of a Gaussian prior on every embedding row: (c / train rows) · Σ_j ||e_j||², applied lazily
    # (scikit-learn LogisticRegression's C = 1 / (2c) for `lr`); see trainer.L2Prior. Several values:
    # a regularisation path, the next one each time patience runs out. None = the model's default.
    l2_prior: Optional[list[float]] = None
    # FM's second phase (training.factor_phase): after the l2_prior path, with the factors held at zero
    # until then, a path of priors on the factor tables alone. [] = one phase. None = the model's default.
    factor_prior: Optional[list[float]] = None
    sparse_embeddings: bool = True  # update only the embedding rows a batch touched ("lazy" Adam, see docs)
    # Validation schedule: evals_per_epoch evaluations spread over each epoch, but never two within
    # eval_min_steps optimizer steps (small data: an epoch can be a handful of steps), and one at the
    # last step. evals_per_epoch = 1, eval_min_steps = 1: once at every epoch end (the paper's protocol).
    evals_per_epoch: int = 4
    eval_min_steps: int = 10
    # stop after this many evaluations in a row without a better validation AUC (the best is restored),
    # never during the warm-up: one epoch on large data, 40 steps on small. OPEN (the paper does not say).
    patience: int = 4
    min_steps: int = 2000  # a step budget of at least this: the epoch cap is raised to reach it (early stopping may end sooner)
    max_steps: int = 0  # stop after this many steps (0 = no cap; `masknet tune` caps every trial)
    seed: int = 2021
    eval_batch_size: int = 8192
    threads: int = 0  # torch intra-op threads; 0 = PyTorch's default (all cores)
    shuffle_block_rows: int = 1 << 18  # rows read (and shuffled) together from a memory-mapped split
    progress: bool = True  # tqdm progress bar on stderr
    checkpoints: bool = True  # checkpoint at evaluations (RUN/checkpoints, see checkpoint_overhead), for --resume
    checkpoint_every_steps: int = 0  # also every N steps; 0 = at evaluations only
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    # at most this share of the run's wall time goes to checkpoints at evaluations: one is written when the
    # time since the last one is at least (1 - x) / x times that one's write (1 = after every evaluation;
    # the run's last evaluation always writes). docs/runs.md: why 0.1
    checkpoint_overhead: float = 0.1
    precision: str = "fp32"  # "bf16": autocast the forward to bfloat16 (weights, optimizer, loss stay fp32)
    on_nan: str = "stop"  # non-finite loss/gradient: "stop" (keep the last good checkpoint) or "skip-batch"
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu" or "cuda"; torchrun ranks use cuda:LOCAL_RANK
    tensorboard: bool = False  # log every evaluation to RUN/tensorboard (needs `pip install tensorboard`)
    mlflow: bool = False  # log every evaluation to an MLflow run (needs `pip install mlflow`; MLFLOW_TRACKING_URI)
    # --- several labels (docs/multitask.md) ---
    tasks: list[str] = field(default_factory=list)  # the labels to train on; empty: every label of the data
    task_weights: list[float] = field(default_factory=list)  # loss weight per task (in `tasks` order); empty: 1 each
    # "first": the first task's validation AUC (docs/multitask.md: the mean let a dense task overfit while a sparse
    # one still improved); "mean": the loss-weighted mean of the tasks' validation AUCs; or one task's name
    early_stopping: str = "first"
    # --- calibration (training/calibration.py, docs/calibration.md) ---
    calibration: str = "none"  # post-hoc, fitted on the validation split: none, isotonic or platt
    calibration_bins: int = 10  # equal-mass bins of ECE and the reliability diagram (docs: why 10)
    calibration_max_slope: float = 10.0  # isotonic: steeper segments are pooled, OPEN (docs/calibration.md: why 10)
    calibration_field: Optional[str] = None  # predicted/observed ratio per value of this field; None: the first field
    negative_sampling_rate: float = 1.0  # keep this share of the training rows negative on the first task; scores corrected

    def validate(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.batch_size", self.batch_size)
        _positive("train.eval_batch_size", self.eval_batch_size)
        _positive("train.shuffle_block_rows", self.shuffle_block_rows)
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if self.first_phase_lr is not None and not self.first_phase_lr > 0:
            raise ConfigError(f"train.first_phase_lr: must be > 0, got {self.first_phase_lr}")
        if self.l2_prior is not None and any(not c >= 0 for c in self.l2_prior):
            raise ConfigError(f"train.l2_prior: every value must be >= 0, got {self.l2_prior}")
        if self.factor_prior is not None and any(not c >= 0 for c in self.factor_prior):
            raise ConfigError(f"train.factor_prior: every value must be >= 0, got {self.factor_prior}")
        if not 0.0 < self.lr_plateau_factor <= 1.0:
            raise ConfigError(f"train.lr_plateau_factor: must be in (0, 1], got {self.lr_plateau_factor}")
        for key in ("l2_embedding", "l2_dense"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        _positive("train.patience", self.patience)
        _positive("train.evals_per_epoch", self.evals_per_epoch)
        _positive("train.eval_min_steps", self.eval_min_steps)
        if self.min_batches_per_epoch is not None and self.min_batches_per_epoch < 0:
            raise ConfigError(f"train.min_batches_per_epoch: must be >= 0, got {self.min_batches_per_epoch}")
        for key in ("lr_warmup_steps", "min_steps", "max_steps", "checkpoint_every_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        _positive("train.keep_checkpoints", self.keep_checkpoints)
        if not 0.0 < self.checkpoint_overhead <= 1.0:
            raise ConfigError(f"train.checkpoint_overhead: must be in (0, 1], got {self.checkpoint_overhead}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision: must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.on_nan not in ("stop", "skip-batch"):
            raise ConfigError(f"train.on_nan: must be 'stop' or 'skip-batch', got {self.on_nan!r}")
        if self.threads < 0:
            raise ConfigError(f"train.threads: must be >= 0, got {self.threads}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device: must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.task_weights and len(self.task_weights) != len(self.tasks):
            raise ConfigError(
                f"train.task_weights: {len(self.task_weights)} weights need as many train.tasks (got {len(self.tasks)}); "
                "name the tasks, e.g. --set train.tasks=click,purchase --set train.task_weights=1,2"
            )
        if any(not w > 0 for w in self.task_weights):
            raise ConfigError(f"train.task_weights: every weight must be > 0, got {self.task_weights}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"train.tasks: a task is listed twice: {self.tasks}")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"train.calibration: expected one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        if not self.calibration_max_slope > 0:
            raise ConfigError(f"train.calibration_max_slope: must be > 0, got {self.calibration_max_slope}")
        if self.calibration_bins < 2:
            raise ConfigError(f"train.calibration_bins: must be >= 2, got {self.calibration_bins}")
        if not 0 < self.negative_sampling_rate <= 1:
            raise ConfigError(f"train.negative_sampling_rate: must be in (0, 1], got {self.negative_sampling_rate}")


# The paper's training protocol (its section 4.1, and the choices it leaves open as this project
# made them until issue 16): one validation per epoch, stop after one epoch without a better AUC,
# Adam at a constant 1e-3 for every model, no L2 prior. `masknet train --preset paper` and
# `masknet reproduce --preset paper` use it; the defaults differ (docs/model.md, "Training defaults").
PAPER_PROTOCOL: dict[str, Any] = {
    "train.epochs": 10,
    "train.batch_size": 1024,
    "train.lr": 1e-3,
    "train.lr_warmup_steps": 0,
    "train.lr_plateau_factor": 1.0,
    "train.l2_prior": [],
    "train.factor_prior": [],
    "train.evals_per_epoch": 1,
    "train.eval_min_steps": 1,
    "train.patience": 1,
    "train.min_steps": 0,
    "train.min_batches_per_epoch": 0,
}
# train keys that change how a run is watched and checkpointed, not its results: a study's identity
# (tuning.study) and whether an experiment's saved run counts as done (experiments.runner) ignore them
TRAIN_BOOKKEEPING = ("threads", "progress", "checkpoints", "checkpoint_every_steps", "keep_checkpoints", "checkpoint_overhead")
# the model settings the defaults choose by data size, as the paper protocol ran them (no dropout:
# the paper states none); every preset built on PAPER_PROTOCOL takes these too
PAPER_MODEL_SETTINGS: dict[str, Any] = {"model.dropout": 0.0, "model.linear_term": False}
TRAIN_PRESETS: dict[str, dict[str, Any]] = {"paper": {**PAPER_PROTOCOL, **PAPER_MODEL_SETTINGS}}


def apply_preset(cfg: "RunConfig", name: str) -> "RunConfig":
    """Set every key of preset `name` (in place)."""
    if name not in TRAIN_PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; choose one of {', '.join(TRAIN_PRESETS)}")
    for key, value in TRAIN_PRESETS[name].items():
        text = "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, list) else str(value)
        apply_override(cfg, f"{key}={text}")
    return cfg


@dataclass
class SyntheticConfig:
    """The built-in Criteo-like generator (masknet.data.synthetic)."""

    rows: int = 120_000  # split 8:1:1 into train/valid/test
    seed: int = 7
    # the planted multi-valued field T1 (data/synthetic.py): none (default: the data without it),
    # list (a multi-valued field), first (only its first value), drop (in the labels, not the inputs)
    multi_valued: str = "none"
    multitask: bool = False  # labels click and purchase (purchase only after a click); off: the single-task data

    def validate(self) -> None:
        if self.rows < 100:
            raise ConfigError(f"data.synthetic.rows: must be >= 100, got {self.rows}")
        if self.multi_valued not in ("none", "list", "first", "drop"):
            raise ConfigError(f"data.synthetic.multi_valued: expected none, list, first or drop, got {self.multi_valued!r}")


@dataclass
class DataConfig:
    path: Optional[str] = None  # a prepared dataset folder; None = the built-in synthetic data
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self) -> None:
        self.synthetic.validate()


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: Optional[str] = None  # run folder; None = runs/<model>-<timestamp>
    base_run: Optional[str] = None  # a finished run folder: RelaImp (Eq. 20) is reported against it

    def validate(self) -> "RunConfig":
        _check_finite(self)  # first: inf passes every "> 0" check, nan fails them with a puzzling message
        self.model.validate()
        self.train.validate()
        self.data.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Loading, overriding, saving


def _check_finite(section: Any, prefix: str = "") -> None:
    """Refuse inf and nan in every float setting (and list of floats), naming the key."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
            continue
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(v, float) and not math.isfinite(v):
                where = f"{prefix}{f.name}" + (f"[{i}]" if isinstance(value, list) else "")
                raise ConfigError(f"{where}: must be a finite number, got {v}")


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a `--set` string) to type `tp`, or raise naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(key, value, non_none[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is list:
        (item_tp,) = args
        if isinstance(value, str):
            text = value.strip().strip("[]")
            value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number: Optional[float] = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # YAML's .inf / .nan, or --set x=inf: no setting takes one
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this module


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown config key; known keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def dotted_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"section.key": value}, in the dict's order (the `--set` spelling)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return from_dict(RunConfig, data or {})


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path, base: Optional[RunConfig] = None) -> RunConfig:
    """The run config in YAML file `path`: its keys over `base` (default: the defaults)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a config is a YAML text file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_error(exc)}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return config_from_dict(_merged(base.to_dict(), data or {}) if base is not None else data or {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _yaml_error(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: where, then what."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
    what = " ".join((what or str(exc)).split())
    return f"{where}not valid YAML ({what})"


def apply_override(cfg: RunConfig, assignment: str) -> None:
    """Apply one `section.key=value` override (the CLI's `--set`) in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. model.block_dim=200")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    target: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            known = ", ".join(f.name for f in dataclasses.fields(target)) if dataclasses.is_dataclass(target) else ""
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"{where}: unknown config key" + (f"; known keys here: {known}" if known else ""))
        if i == len(parts) - 1:
            hints = typing.get_type_hints(type(target))
            if dataclasses.is_dataclass(hints[part]):
                raise ConfigError(f"{key}: is a section; set one of its keys, e.g. {key}.<key>=VALUE")
            setattr(target, part, _coerce(key, raw, hints[part]))
        else:
            target = getattr(target, part)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
