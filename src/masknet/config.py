"""Typed run configuration: model, training and data settings.

Every run saves its resolved `RunConfig` as YAML, so any result can be re-run
with `masknet train --config RUN/config.yaml`. Keys are validated at the
boundary: an unknown key, a wrong type or an out-of-range value raises
`ConfigError` naming the key (dotted path, e.g. `model.block_dim`).

Paper-faithful defaults (masknet-paper.md section 8). Choices the paper leaves
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

# Every model in masknet.models.REGISTRY (checked there). Kept here, free of torch, so that the
# CLI can list the choices and validate a config without importing PyTorch (about 2 s).
MODEL_NAMES = ("sermasknet", "paramasknet", "lr", "fm", "dnn", "deepfm", "dcn", "dcnv2", "xdeepfm", "autoint")

MASKNET_MODELS = ("sermasknet", "paramasknet")


@dataclass
class ModelConfig:
    """Architecture. Fields a model does not use are ignored by it."""

    name: str = "sermasknet"
    embedding_dim: int = 10  # k, per field (paper: 10 for all models)
    dropout: float = 0.0  # OPEN: after every hidden ReLU; paper does not state it

    # --- MaskNet (paper section 3) ---
    num_blocks: int = 3  # paper: 3 MaskBlocks in the main comparison
    block_dim: int = 400  # q, OPEN: the paper does not state the block width
    reduction_ratio: float = 2.0  # r = t / z, against the MASKED width z (paper), not the mask input
    use_mask: bool = True  # ablation "w/o mask": V_mask is dropped (identity)
    emb_layernorm: bool = True  # per-field LayerNorm on the embedding (Eq. 9)
    block_layernorm: bool = True  # LayerNorm inside each block's FFN, before ReLU (Eq. 10)
    block_ffn: bool = True  # ablation "w/o block FFN": block output = masked input
    top_mlp: list[int] = field(default_factory=lambda: [400, 400, 400])  # ParaMaskNet, OPEN: 3x400

    # --- baselines (masknet-paper.md section 8: DNN parts 3x400 ReLU) ---
    dnn_hidden: list[int] = field(default_factory=lambda: [400, 400, 400])
    cross_layers: int = 3  # DCN / DCN-V2
    cin_layers: list[int] = field(default_factory=lambda: [200, 200, 200])  # xDeepFM CIN feature maps
    attention_layers: int = 3  # AutoInt
    attention_heads: int = 2
    attention_dim: int = 32  # per head
    attention_residual: bool = True

    def validate(self) -> None:

        if self.name not in MODEL_NAMES:
            raise ConfigError(
                f"model.name: unknown model {self.name!r}; choose one of {', '.join(MODEL_NAMES)}"
            )
        _positive("model.embedding_dim", self.embedding_dim)
        _positive("model.num_blocks", self.num_blocks)
        _positive("model.block_dim", self.block_dim)
        if not self.reduction_ratio > 0:
            raise ConfigError(f"model.reduction_ratio: must be > 0, got {self.reduction_ratio}")
        if not 0.0 <= self.dropout < 1.0:
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


@dataclass
class TrainConfig:
    """Optimisation and evaluation."""

    epochs: int = 10
    batch_size: int = 1024  # paper: 1024
    lr: float = 1e-3  # paper's summary: 1e-3; the paper's own text says 1e-4 (see docs/model.md)
    l2_embedding: float = 0.0  # OPEN (paper: "lambda"): on the embedding rows a batch looks up
    l2_dense: float = 0.0  # OPEN: on every dense weight matrix (mask, FFN, prediction layer)
    sparse_embeddings: bool = True  # update only the embedding rows a batch touched ("lazy" Adam, see docs)
    # stop after this many epochs without a better validation AUC. OPEN (the paper does not say).
    # 1: CTR models with large embedding tables overfit right after their best epoch, usually
    # epoch 1-2 (the "one-epoch phenomenon"; docs/model.md), so waiting longer rarely pays.
    patience: int = 1
    seed: int = 2021
    eval_batch_size: int = 8192
    threads: int = 0  # torch intra-op threads; 0 = PyTorch's default (all cores)
    shuffle_block_rows: int = 1 << 18  # rows read (and shuffled) together from a memory-mapped split
    progress: bool = True  # tqdm progress bar on stderr
    checkpoints: bool = True  # checkpoint at every epoch end (RUN/checkpoints), for --resume
    checkpoint_every_steps: int = 0  # also every N steps; 0 = epoch ends only
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    precision: str = "fp32"  # "bf16": autocast the forward to bfloat16 (weights, optimizer, loss stay fp32)
    on_nan: str = "stop"  # non-finite loss/gradient: "stop" (keep the last good checkpoint) or "skip-batch"
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu" or "cuda"; torchrun ranks use cuda:LOCAL_RANK
    tensorboard: bool = False  # log every evaluation to RUN/tensorboard (needs `pip install tensorboard`)
    mlflow: bool = False  # log every evaluation to an MLflow run (needs `pip install mlflow`; MLFLOW_TRACKING_URI)

    def validate(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.batch_size", self.batch_size)
        _positive("train.eval_batch_size", self.eval_batch_size)
        _positive("train.shuffle_block_rows", self.shuffle_block_rows)
        if not self.lr > 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        for key in ("l2_embedding", "l2_dense"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        _positive("train.patience", self.patience)
        if self.checkpoint_every_steps < 0:
            raise ConfigError(f"train.checkpoint_every_steps: must be >= 0, got {self.checkpoint_every_steps}")
        _positive("train.keep_checkpoints", self.keep_checkpoints)
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision: must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.on_nan not in ("stop", "skip-batch"):
            raise ConfigError(f"train.on_nan: must be 'stop' or 'skip-batch', got {self.on_nan!r}")
        if self.threads < 0:
            raise ConfigError(f"train.threads: must be >= 0, got {self.threads}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device: must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


@dataclass
class SyntheticConfig:
    """The built-in Criteo-like generator (masknet.data.synthetic)."""

    rows: int = 120_000  # split 8:1:1 into train/valid/test
    seed: int = 7

    def validate(self) -> None:
        if self.rows < 100:
            raise ConfigError(f"data.synthetic.rows: must be >= 100, got {self.rows}")


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
        return _from_dict(tp, value, prefix=key + ".")
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


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown config key; known keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return _from_dict(RunConfig, data or {})


def load_config(path: str | Path) -> RunConfig:
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
        return config_from_dict(data or {})
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
