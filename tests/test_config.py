"""Run configuration: validation naming the dotted key, YAML round trip, --set parsing."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from masknet.config import (
    RunConfig,
    apply_override,
    config_from_dict,
    load_config,
    save_config,
)
from masknet.errors import ConfigError, UserError


def test_defaults_are_the_papers_and_valid():
    cfg = RunConfig().validate()
    m, t = cfg.model, cfg.train
    assert (m.embedding_dim, m.num_blocks, m.reduction_ratio) == (10, 3, 2.0)
    assert (m.use_mask, m.emb_layernorm, m.block_layernorm, m.block_ffn) == (True,) * 4
    assert m.dnn_hidden == [400, 400, 400]
    assert t.batch_size == 1024
    assert issubclass(ConfigError, UserError)


# ---------------------------------------------------------------------------
# validation: the error names the dotted key


@pytest.mark.parametrize(
    "data, key",
    [
        ({"model": {"blocks": 3}}, "model.blocks"),
        ({"train": {"learning_rate": 0.1}}, "train.learning_rate"),
        ({"data": {"synthetic": {"row": 5}}}, "data.synthetic.row"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_unknown_key(data, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert key in str(err.value)
    assert "unknown" in str(err.value)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"model": {"block_dim": "wide"}}, "model.block_dim"),
        ({"model": {"block_dim": 1.5}}, "model.block_dim"),
        ({"model": {"block_dim": True}}, "model.block_dim"),
        ({"model": {"use_mask": "maybe"}}, "model.use_mask"),
        ({"model": {"use_mask": 1}}, "model.use_mask"),
        ({"model": {"top_mlp": 400}}, "model.top_mlp"),
        ({"model": {"top_mlp": [400, "x"]}}, "model.top_mlp[1]"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"lr": False}}, "train.lr"),
        ({"model": "sermasknet"}, "model"),
        ({"data": {"synthetic": 5}}, "data.synthetic"),
    ],
)
def test_wrong_type(data, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert str(err.value).startswith(key + ":"), str(err.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.name", "masknet9000"),
        ("model.embedding_dim", 0),
        ("model.block_dim", -4),
        ("model.num_blocks", 0),
        ("model.reduction_ratio", 0.0),
        ("model.reduction_ratio", -1.0),
        ("model.dropout", 1.0),
        ("model.dropout", -0.1),
        ("model.top_mlp", [400, -1]),
        ("model.dnn_hidden", []),
        ("model.dnn_hidden", [0]),
        ("train.epochs", 0),
        ("train.batch_size", -1),
        ("train.lr", 0.0),
        ("train.l2_embedding", -1e-6),
        ("train.l2_dense", -1.0),
        ("train.patience", 0),
        ("train.threads", -1),
        ("data.synthetic.rows", 10),
    ],
)
def test_out_of_range(key, value):
    cfg = RunConfig()
    *path, last = key.split(".")
    target = cfg
    for p in path:
        target = getattr(target, p)
    setattr(target, last, value)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_in_range_edges_are_accepted():
    cfg = RunConfig()
    cfg.model.dropout = 0.0
    cfg.model.reduction_ratio = 0.5
    cfg.train.l2_embedding = 0.0
    cfg.train.threads = 0
    cfg.data.synthetic.rows = 100
    cfg.validate()


# ---------------------------------------------------------------------------
# YAML round trip


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig()
    cfg.model.name = "paramasknet"
    cfg.model.top_mlp = [64, 32]
    cfg.model.reduction_ratio = 0.5
    cfg.model.use_mask = False
    cfg.train.lr = 1e-4
    cfg.train.l2_embedding = 3e-7
    cfg.data.synthetic.rows = 12345
    cfg.output = str(tmp_path / "run")
    cfg.base_run = None
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    loaded = load_config(path)
    assert loaded == cfg
    assert dataclasses.asdict(loaded) == dataclasses.asdict(cfg)
    assert yaml.safe_load(path.read_text())["model"]["top_mlp"] == [64, 32]  # plain YAML, no python tags


def test_default_round_trip(tmp_path):
    save_config(RunConfig(), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == RunConfig()


def test_partial_yaml_and_yaml_float_forms(tmp_path):
    p = tmp_path / "c.yaml"
    # YAML 1.1 reads 1e-4 (no dot) as a string; it must still become a float
    p.write_text("model:\n  block_dim: 32\ntrain:\n  lr: 1e-4\n  l2_dense: 0\n")
    cfg = load_config(p)
    assert cfg.model.block_dim == 32 and cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.l2_dense == 0.0 and isinstance(cfg.train.l2_dense, float)
    assert cfg.model.num_blocks == 3  # untouched keys keep their defaults


def test_load_config_errors_name_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  blockdim: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "bad.yaml" in str(err.value) and "model.blockdim" in str(err.value)
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == RunConfig()


# ---------------------------------------------------------------------------
# --set KEY=VALUE


@pytest.mark.parametrize(
    "assignment, key, expected",
    [
        ("model.top_mlp=[64,32]", "model.top_mlp", [64, 32]),
        ("model.top_mlp=64, 32 ,16", "model.top_mlp", [64, 32, 16]),
        ("model.top_mlp=[128]", "model.top_mlp", [128]),
        ("model.use_mask=false", "model.use_mask", False),
        ("model.use_mask=False", "model.use_mask", False),
        ("model.emb_layernorm=off", "model.emb_layernorm", False),
        ("model.block_ffn=true", "model.block_ffn", True),
        ("train.lr=1e-4", "train.lr", 1e-4),
        ("train.lr=0.0005", "train.lr", 5e-4),
        ("train.l2_embedding=1E-6", "train.l2_embedding", 1e-6),
        ("model.reduction_ratio=2", "model.reduction_ratio", 2.0),
        ("model.block_dim=1_024", "model.block_dim", 1024),
        ("data.synthetic.rows=3000", "data.synthetic.rows", 3000),
        ("model.name=paramasknet", "model.name", "paramasknet"),
        ("data.path=none", "data.path", None),
        ("output=/tmp/x=y", "output", "/tmp/x=y"),
    ],
)
def test_set_parsing(assignment, key, expected):
    cfg = RunConfig()
    apply_override(cfg, assignment)
    value = cfg
    for p in key.split("."):
        value = getattr(value, p)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    "assignment, key",
    [
        ("model.blocks=3", "model.blocks"),
        ("modle.block_dim=3", "modle"),
        ("model.block_dim=wide", "model.block_dim"),
        ("model.block_dim=2.5", "model.block_dim"),
        ("train.lr=fast", "train.lr"),
        ("model.use_mask=perhaps", "model.use_mask"),
        ("model.top_mlp=[64,x]", "model.top_mlp[1]"),
        ("model=3", "model"),
        ("model.block_dim.x=3", "model.block_dim.x"),
    ],
)
def test_set_errors_name_the_key(assignment, key):
    with pytest.raises(ConfigError) as err:
        apply_override(RunConfig(), assignment)
    assert str(err.value).startswith(key + ":") or f"{key}:" in str(err.value), str(err.value)


def test_set_without_equals():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override(RunConfig(), "model.block_dim")


def test_set_then_validate_catches_range():
    cfg = RunConfig()
    apply_override(cfg, "model.dropout=1.0")
    with pytest.raises(ConfigError, match=r"^model\.dropout:"):
        cfg.validate()


# ---------------------------------------------------------------------------
# issue 14 review: non-finite numbers, unreadable files, one-line YAML errors


@pytest.mark.parametrize("assignment", ["train.lr=inf", "train.lr=nan", "train.lr=-inf", "model.dropout=nan",
                                        "train.l2_dense=inf", "model.reduction_ratio=Infinity"])
def test_non_finite_numbers_are_refused_by_set(assignment):
    key = assignment.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: expected a finite number"):
        apply_override(RunConfig(), assignment)


def test_non_finite_numbers_are_refused_in_yaml_and_by_validate(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.lr: expected a finite number"):
        load_config(p)
    cfg = RunConfig()
    cfg.train.lr = float("inf")  # set from Python, past the parser
    with pytest.raises(ConfigError, match=r"^train\.lr: must be a finite number, got inf"):
        cfg.validate()
    cfg = RunConfig()
    cfg.model.dropout = float("nan")
    with pytest.raises(ConfigError, match=r"^model\.dropout: must be a finite number"):
        cfg.validate()


def test_a_config_that_is_not_text_is_one_line(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value).startswith(f"{p}: not UTF-8 text") and "\n" not in str(err.value)


def test_an_unreadable_config_is_one_line(tmp_path, monkeypatch):
    import errno
    import os
    from pathlib import Path

    p = tmp_path / "c.yaml"
    p.write_text("train: {}\n")

    def denied(self):  # as root here, permissions are not enforced: fail the read itself
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value) == f"{p}: cannot read it: Permission denied"


@pytest.mark.parametrize("text, where", [
    ("model: [1, 2\n", "line 2, column 1"),
    ("train:\n  lr: 1\n   bad: x\n", "line 3, column "),
    ("a: 'x\n", "line 2, column 1"),
])
def test_yaml_errors_are_one_line_with_line_and_column(tmp_path, text, where):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{p}: {where}") and "not valid YAML" in msg, msg
