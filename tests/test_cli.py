"""The `masknet` command: user errors exit 2 with one line (no traceback); help lists every option."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest

from masknet.cli import build_parser, main

TRAIN_OPTIONS = ["--model", "--data", "--epochs", "--seed", "--config", "--set", "--output", "--base-run", "--quiet"]


def run_main(capsys, argv):
    """main() in-process: (exit code, stdout, stderr). argparse errors exit via SystemExit."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(err: str, *needles: str):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("masknet train: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, err)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--set", "model.blocks=3"], ["model.blocks", "unknown"]),
        (["--set", "modle.block_dim=3"], ["modle"]),
        (["--set", "model.block_dim=wide"], ["model.block_dim", "'wide'"]),
        (["--set", "train.lr=fast"], ["train.lr"]),
        (["--set", "model.use_mask=maybe"], ["model.use_mask"]),
        (["--set", "model.name=masknet9000"], ["model.name", "masknet9000"]),
        (["--set", "model.dropout=1.0"], ["model.dropout"]),
        (["--set", "model.block_dim"], ["KEY=VALUE"]),
    ],
)
def test_bad_settings_exit_2_with_one_line(capsys, tmp_path, args, needles):
    out_dir = tmp_path / "run"
    rc, out, err = run_main(capsys, ["train", "--quiet", "--output", str(out_dir), *args])
    assert rc == 2
    assert_one_line_error(err, *needles)
    assert not out_dir.exists()  # failed before writing anything


def test_missing_config_file(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    rc, _, err = run_main(capsys, ["train", "--config", str(missing)])
    assert rc == 2
    assert_one_line_error(err, "nope.yaml")


def test_bad_config_file_names_file_and_key(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  block_dim: wide\n")
    rc, _, err = run_main(capsys, ["train", "--config", str(cfg)])
    assert rc == 2
    assert_one_line_error(err, "c.yaml", "model.block_dim")


def test_missing_data_folder(capsys, tmp_path):
    missing = tmp_path / "no_such_data"
    out_dir = tmp_path / "run"
    rc, _, err = run_main(capsys, ["train", "--data", str(missing), "--quiet", "--output", str(out_dir)])
    assert rc == 2
    assert_one_line_error(err, "no_such_data")
    assert not out_dir.exists()


def test_missing_base_run(capsys, tmp_path):
    rc, _, err = run_main(capsys, ["train", "--base-run", str(tmp_path / "nobase"), "--quiet", "--output", str(tmp_path / "r")])
    assert rc == 2
    assert_one_line_error(err, "nobase")


def test_unknown_model_option(capsys):
    rc, _, err = run_main(capsys, ["train", "--model", "masknet9000"])
    assert rc == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("masknet train: error:") and "masknet9000" in last and "sermasknet" in last


def test_bad_option_value_type(capsys):
    rc, _, err = run_main(capsys, ["train", "--epochs", "two"])
    assert rc == 2
    assert "Traceback" not in err and "--epochs" in err.strip().splitlines()[-1]


def test_no_command_prints_help_and_exits_2(capsys):
    rc, out, _ = run_main(capsys, [])
    assert rc == 2 and "train" in out


def _train_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_train_help_mentions_every_option(capsys):
    rc, out, _ = run_main(capsys, ["train", "--help"])
    assert rc == 0
    options = {s for a in _train_parser()._actions for s in a.option_strings if s.startswith("--")}
    assert set(TRAIN_OPTIONS) <= options
    for opt in sorted(options):
        assert opt in out, opt
    for name in ("sermasknet", "paramasknet"):
        assert name in out


def test_resume_help_lists_exactly_the_resumable_keys():
    from masknet.training.runfolder import RESUMABLE

    (action,) = [a for a in _train_parser()._actions if "--resume" in a.option_strings]
    listed = {w.strip(",()") for w in action.help.split() if w.startswith("train.")}
    assert listed == set(RESUMABLE)


def _masknet_cmd() -> list[str]:
    exe = shutil.which("masknet")
    return [exe] if exe else [sys.executable, "-m", "masknet"]


def test_subprocess_help_lists_commands():
    proc = subprocess.run(_masknet_cmd() + ["--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for cmd in ("train", "generate"):
        assert cmd in proc.stdout


def test_subprocess_user_error_is_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        _masknet_cmd() + ["train", "--quiet", "--output", str(tmp_path / "r"), "--set", "model.block_dim=wide"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "model.block_dim")
    assert proc.stdout == ""


def test_settings_resolve_defaults_config_options_then_set(capsys, tmp_path, monkeypatch):
    """defaults < --config FILE < options < each --set (in order)."""
    import masknet.training.run as run_mod

    captured = []
    monkeypatch.setattr(run_mod, "train_run", lambda cfg, **_: captured.append(cfg))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  block_dim: 32\n  num_blocks: 4\ntrain:\n  epochs: 5\n  seed: 1\n")
    rc, _, err = run_main(
        capsys,
        [
            "train", "--config", str(cfg_file), "--epochs", "3", "--seed", "9", "--model", "paramasknet",
            "--data", "DATA", "--output", "OUT", "--base-run", "BASE", "--quiet",
            "--set", "train.epochs=2", "--set", "model.block_dim=8", "--set", "model.block_dim=16",
        ],
    )  # fmt: skip
    assert rc == 0, err
    (cfg,) = captured
    assert cfg.train.epochs == 2  # --set beats --epochs
    assert cfg.model.block_dim == 16  # the last --set wins
    assert cfg.model.num_blocks == 4  # from the file
    assert cfg.train.seed == 9 and cfg.model.name == "paramasknet"
    assert (cfg.data.path, cfg.output, cfg.base_run, cfg.train.progress) == ("DATA", "OUT", "BASE", False)
    assert cfg.model.embedding_dim == 10  # default
