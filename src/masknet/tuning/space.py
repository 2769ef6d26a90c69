"""A search space as Optuna suggestions, checked against RunConfig before any trial runs.

A model's space is `REGISTRY[name].search_space` (models.search); `--space FILE` replaces it with
a YAML mapping of config keys to ranges:

    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}     # Float (Int when low and high are integers)
    train.batch_size: {choices: [256, 1024]}             # Choice
    model.dnn_hidden: {widths: [200, 400], depths: [1, 3]}   # Layers: a list of `depth` equal widths
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, apply_override
from ..errors import ConfigError, UserError
from ..models.search import Choice, Float, Int, Layers, Range, SearchSpace


class SearchSpaceError(UserError):
    """A search space names an unknown config key or a range the key cannot take."""


def format_value(value: Any) -> str:
    """A value as `--set` writes it (lists as a,b,c)."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _range_from_yaml(key: str, spec: Any, where: str) -> Range:
    if not isinstance(spec, dict):
        raise SearchSpaceError(f"{where}: {key}: expected a mapping such as {{low: 1, high: 4}} or {{choices: [...]}}, got {spec!r}")
    keys = set(spec)
    try:
        if keys == {"choices"} and isinstance(spec["choices"], list) and spec["choices"]:
            return Choice(tuple(spec["choices"]))
        if keys == {"widths", "depths"}:
            return Layers(tuple(int(w) for w in spec["widths"]), tuple(int(d) for d in spec["depths"]))
        if keys in ({"low", "high"}, {"low", "high", "log"}):
            low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
            if isinstance(low, int) and isinstance(high, int) and not isinstance(low, bool):
                return Int(low, high, log)
            return Float(float(low), float(high), log)
    except (TypeError, ValueError):
        pass
    raise SearchSpaceError(f"{where}: {key}: expected {{low, high[, log]}}, {{choices: [...]}} or {{widths: [...], depths: [...]}}, got {spec!r}")


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise SearchSpaceError(f"{path}: search space file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SearchSpaceError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise SearchSpaceError(f"{path}: expected a mapping of config keys to ranges")
    return {str(k): _range_from_yaml(str(k), v, str(path)) for k, v in raw.items()}


def space_to_yaml(space: SearchSpace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, r in space.items():
        if isinstance(r, Choice):
            out[key] = {"choices": list(r.values)}
        elif isinstance(r, Layers):
            out[key] = {"widths": list(r.widths), "depths": list(r.depths)}
        else:
            out[key] = {"low": r.low, "high": r.high, "log": r.log}
    return out


def _samples(r: Range) -> list[Any]:
    """Values at the edges of a range (what validation tries on the config)."""
    if isinstance(r, Choice):
        return list(r.values)
    if isinstance(r, Layers):
        return [[w] * d for w in (min(r.widths), max(r.widths)) for d in (min(r.depths), max(r.depths))]
    return [r.low, r.high]


def check_space(space: SearchSpace, base: RunConfig, where: str = "search space") -> None:
    """Every key must be a RunConfig setting and every edge of its range a valid value for it:
    one line naming the key otherwise, before any trial runs."""
    if not space:
        raise SearchSpaceError(f"{where}: empty; name at least one config key to tune")
    for key, r in space.items():
        if key.split(".")[0] not in ("model", "train"):
            raise SearchSpaceError(f"{where}: {key}: only model.* and train.* keys can be tuned")
        if isinstance(r, (Float, Int)) and (not r.low < r.high or (r.log and r.low <= 0)):
            raise SearchSpaceError(f"{where}: {key}: needs low < high (and low > 0 with log), got {r.low}..{r.high}")
        if isinstance(r, Layers) and (not r.widths or not r.depths or min(r.widths) < 1 or min(r.depths) < 1):
            raise SearchSpaceError(f"{where}: {key}: widths and depths must be non-empty and >= 1")
        for value in _samples(r):
            cfg = copy.deepcopy(base)
            try:
                apply_override(cfg, f"{key}={format_value(value)}")
                cfg.validate()
            except ConfigError as exc:
                raise SearchSpaceError(f"{where}: {exc}") from None


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Draw one value per key from an Optuna trial: {config key: value}."""
    params: dict[str, Any] = {}
    for key, r in space.items():
        if isinstance(r, Float):
            params[key] = trial.suggest_float(key, r.low, r.high, log=r.log)
        elif isinstance(r, Int):
            params[key] = trial.suggest_int(key, r.low, r.high, log=r.log)
        elif isinstance(r, Choice):
            params[key] = trial.suggest_categorical(key, list(r.values))
        else:
            width = trial.suggest_categorical(f"{key}.width", list(r.widths))
            depth = trial.suggest_categorical(f"{key}.depth", list(r.depths))
            params[key] = [width] * depth
    return params


def apply_params(cfg: RunConfig, params: dict[str, Any]) -> RunConfig:
    """A copy of `cfg` with the drawn values set."""
    out = copy.deepcopy(cfg)
    for key, value in params.items():
        apply_override(out, f"{key}={format_value(value)}")
    out.validate()
    return out
