"""Model settings whose default depends on the train split's size (docs/model.md, "Dropout on small
data"): the MaskNets' `model.dropout` is 0.3 below 20,000 train rows and 0 from there on; every
other model, a multi-task model, a set value and the paper preset keep theirs."""

from __future__ import annotations

import pytest
import yaml

from masknet.cli import main
from masknet.config import ModelConfig, RunConfig, apply_preset
from masknet.experiments.plan import PRESETS
from masknet.models import build_model, with_size_defaults
from masknet.models.masknet import LINEAR_TERM_ROWS, SMALL_DATA_DROPOUT, SMALL_DATA_ROWS


@pytest.mark.parametrize("name", ["sermasknet", "paramasknet"])
def test_masknet_dropout_follows_the_train_rows(name):
    cfg = ModelConfig(name=name)
    assert cfg.dropout is None  # left to the model
    assert with_size_defaults(cfg, 7_200).dropout == SMALL_DATA_DROPOUT == 0.3
    assert with_size_defaults(cfg, SMALL_DATA_ROWS - 1).dropout == 0.3
    assert with_size_defaults(cfg, SMALL_DATA_ROWS).dropout == 0.0  # 20,000 rows and more: none, as before
    assert with_size_defaults(cfg, 96_000).dropout == 0.0  # the built-in data's train split
    assert with_size_defaults(cfg, None).dropout == 0.0  # size not known: the large-data value
    assert cfg.dropout is None  # the config passed in is not changed


@pytest.mark.parametrize("name", ["sermasknet", "paramasknet"])
def test_lr_first_follows_the_train_rows(name):
    """LR first (model.linear_term) below 100,000 train rows only, and with it LR's training settings for
    phase 1; a set value, a multi-task model and the paper preset keep theirs."""
    from masknet.models import model_class
    from masknet.models.lr import PRIOR_PATH
    from masknet.training.trainer import with_model_defaults
    from masknet.config import TrainConfig

    cfg = ModelConfig(name=name)
    assert cfg.linear_term is None
    assert with_size_defaults(cfg, 7_200).linear_term is True
    assert with_size_defaults(cfg, SMALL_DATA_ROWS).linear_term is True  # the dropout stops at 20,000 rows, not this
    assert with_size_defaults(cfg, 96_000).linear_term is True  # the built-in data's train split
    assert with_size_defaults(cfg, LINEAR_TERM_ROWS).linear_term is False
    assert with_size_defaults(cfg, None).linear_term is False
    assert with_size_defaults(ModelConfig(name=name, linear_term=False), 7_200).linear_term is False
    assert with_size_defaults(ModelConfig(name=name, multitask="mmoe"), 7_200).linear_term is False
    assert apply_preset(RunConfig(), "paper").model.linear_term is False
    small = with_model_defaults(TrainConfig(), model_class(name), with_size_defaults(cfg, 7_200))
    assert small.l2_prior == PRIOR_PATH and small.factor_prior == [0.0] and small.first_phase_lr == 1e-2
    assert small.lr == 1e-3 and small.second_phase_warmup is True
    large = with_model_defaults(TrainConfig(), model_class(name), with_size_defaults(cfg, 1_000_000))
    assert large.l2_prior == [] and large.factor_prior == [] and large.first_phase_lr is None


def test_deepfm_fits_lr_first_only_when_asked():
    """DeepFM's LR first is opt-in: no size turns it on; `model.linear_term=true` brings LR's phase-1
    settings, as for the MaskNets."""
    from masknet.config import TrainConfig
    from masknet.models import model_class
    from masknet.models.lr import PRIOR_PATH
    from masknet.training.trainer import with_model_defaults

    for rows in (7_200, 96_000, None):
        cfg = with_size_defaults(ModelConfig(name="deepfm"), rows)
        assert not cfg.linear_term
        assert with_model_defaults(TrainConfig(), model_class("deepfm"), cfg).factor_prior == []
    asked = with_model_defaults(TrainConfig(), model_class("deepfm"), ModelConfig(name="deepfm", linear_term=True))
    assert asked.l2_prior == PRIOR_PATH and asked.factor_prior == [0.0] and asked.first_phase_lr == 1e-2
    assert asked.lr == 1e-3 and asked.second_phase_warmup is True


def test_a_set_dropout_and_other_models_are_left_alone():
    assert with_size_defaults(ModelConfig(name="sermasknet", dropout=0.0), 7_200).dropout == 0.0
    assert with_size_defaults(ModelConfig(name="paramasknet", dropout=0.1), 7_200).dropout == 0.1
    for name in ("dnn", "deepfm", "dcn", "dcnv2", "xdeepfm", "autoint", "lr", "fm"):
        assert with_size_defaults(ModelConfig(name=name), 7_200).dropout == 0.0, name
    mmoe = ModelConfig(name="sermasknet", multitask="mmoe")
    assert with_size_defaults(mmoe, 7_200).dropout == 0.0  # the rule was measured on single-task runs


def test_a_model_built_outside_a_run_has_no_dropout():
    model = build_model(ModelConfig(name="sermasknet", embedding_dim=3, num_blocks=2, block_dim=6), [5, 7])
    assert all(block.dropout is None for block in model.blocks)


def test_paper_presets_keep_the_paper_protocol_without_dropout():
    assert apply_preset(RunConfig(), "paper").model.dropout == 0.0
    for preset in ("paper", "quick"):  # masknet reproduce --preset paper / quick
        assert PRESETS[preset]["overrides"]["model.dropout"] == 0.0


def _trained_dropout(tmp_path, name, *extra):
    out = tmp_path / name
    args = ["train", "--quiet", "--output", str(out), "--set", "data.synthetic.rows=1000", "--set", "model.block_dim=8",
            "--set", "model.top_mlp=[8]", "--epochs", "1", "--set", "train.threads=1", "--set", "train.checkpoints=false", *extra]
    assert main(args) == 0
    return yaml.safe_load((out / "config.yaml").read_text())["model"]["dropout"]


def test_a_small_run_records_the_dropout_it_trained_with(tmp_path):
    """800 train rows: config.yaml says 0.3 (what `masknet train --config` then reruns exactly);
    --preset paper and a --set value keep theirs."""
    assert _trained_dropout(tmp_path, "default") == 0.3
    assert _trained_dropout(tmp_path, "paper", "--preset", "paper") == 0.0
    assert _trained_dropout(tmp_path, "set", "--set", "model.dropout=0.05") == 0.05


def test_a_tune_trial_trains_what_masknet_train_trains():
    """`masknet tune`'s trial fills the size default as `masknet train` does, so best.yaml (which
    leaves model.dropout unset) retrains to the trial's validation AUC on small data too."""
    import copy
    import tempfile

    from masknet.data.synthetic import generate
    from masknet.training.run import train_run
    from masknet.tuning.study import run_trial

    data = generate(1_000, 7)
    cfg = RunConfig()
    for key, value in {"model.block_dim": 8, "model.num_blocks": 1, "train.max_steps": 20, "train.threads": 1,
                       "train.progress": False, "train.checkpoints": False}.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    trial = run_trial(copy.deepcopy(cfg), data)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.output = tmp
        run = train_run(cfg, data=data, log=lambda *_: None)
    assert cfg.model.dropout == 0.3  # the run filled it for its 800 train rows
    assert trial.best_valid["auc"] == run.metrics["valid"]["auc"]
