"""Checkpoints and resume: a run killed with SIGKILL and resumed ends exactly like an uninterrupted one.

Kill points are deterministic (a driver process SIGKILLs itself at a chosen optimizer step,
or halfway through writing a chosen checkpoint file), drawn from a seeded RNG.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from masknet.cli import main
from masknet.training import checkpoint as ckpt

ARGS = [
    "train", "--quiet", "--epochs", "3", "--seed", "5",
    "--set", "data.synthetic.rows=4000", "--set", "model.block_dim=12", "--set", "model.num_blocks=2",
    "--set", "model.dropout=0.1",  # exercises the torch RNG state in checkpoints
    "--set", "train.batch_size=256", "--set", "train.threads=1", "--set", "train.patience=3",
    "--set", "train.checkpoint_every_steps=4", "--set", "train.shuffle_block_rows=1024",
    "--set", "train.min_batches_per_epoch=0",  # batch 256 as set, not halved for a small split
]
STEPS_PER_EPOCH = 13  # ceil(3200 / 256)

DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from masknet.training import checkpoint, trainer
    mode, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    calls = [0]
    if mode == "step":  # die just before the n-th optimizer step
        original_step = trainer.Optimizer.step
        def step(self):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            original_step(self)
        trainer.Optimizer.step = step
    else:  # die halfway through writing the n-th checkpoint file
        original_write = checkpoint._write_file
        def write(path, data):
            calls[0] += 1
            if calls[0] == n:
                with open(path, "wb") as fh:
                    fh.write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            original_write(path, data)
        checkpoint._write_file = write
    from masknet.cli import main
    sys.exit(main(args))
    """
)


def comparable(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    history = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    drop = ("seconds", "samples_per_second")  # timings
    return {
        "valid": metrics["valid"],
        "test": metrics["test"],
        "best_epoch": metrics["best_epoch"],
        "history": [{k: v for k, v in r.items() if k not in drop} for r in history],
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(ARGS + ["--output", str(out)]) == 0
    return out


def kill_and_resume(tmp_path: Path, mode: str, n: int) -> Path:
    out = tmp_path / f"{mode}-{n}"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(driver), mode, str(n), *ARGS, "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == -9, f"driver was not killed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    assert not (out / "metrics.json").exists()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    return out


def assert_same_run(a: Path, b: Path) -> None:
    assert comparable(a) == comparable(b)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_kill_at_random_steps_then_resume_matches_uninterrupted(reference, tmp_path):
    rng = random.Random(1234)
    total = 3 * STEPS_PER_EPOCH
    # three different points: early in epoch 1, inside epoch 2, and late in epoch 3
    points = [rng.randint(6, STEPS_PER_EPOCH), rng.randint(STEPS_PER_EPOCH + 2, 2 * STEPS_PER_EPOCH), rng.randint(2 * STEPS_PER_EPOCH + 2, total)]
    for n in points:
        assert_same_run(reference, kill_and_resume(tmp_path, "step", n))


def test_kill_while_writing_a_checkpoint_then_resume_matches(reference, tmp_path):
    # file writes come 4 per checkpoint; 6 = halfway through the second checkpoint's best.safetensors
    out = kill_and_resume(tmp_path, "write", 6)
    assert_same_run(reference, out)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(ARGS[:3] + ["1"] + ARGS[4:] + ["--output", str(out)]) == 0  # 1 epoch, checkpoints written
    before = ckpt.latest_checkpoint(out)
    assert before is not None
    snapshot = {p.name: p.read_bytes() for p in before.iterdir()}

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpt, "_write_file", full)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*previous checkpoint .* is intact"):
        ckpt.save_checkpoint(out, model, [], model.state_dict(), {"global_step": 10**6}, keep=2)
    assert ckpt.latest_checkpoint(out) == before
    assert {p.name: p.read_bytes() for p in before.iterdir()} == snapshot
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_keep_last_k_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert main(ARGS + ["--output", str(out), "--set", "train.keep_checkpoints=3"]) == 0
    assert len(ckpt.list_checkpoints(out)) == 3


def test_nan_loss_stops_with_step_and_resume_hint(tmp_path, monkeypatch, capsys):
    from masknet.training import trainer

    real = trainer.loss_fn
    calls = [0]

    def poisoned(model, x, y, cfg, *rest):
        calls[0] += 1
        total, bce = real(model, x, y, cfg, *rest)
        return (total * float("nan"), bce) if calls[0] == 7 else (total, bce)

    monkeypatch.setattr(trainer, "loss_fn", poisoned)
    out = tmp_path / "run"
    assert main(ARGS + ["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at epoch 1, step 7" in err
    assert "--resume" in err and "train.lr=" in err
    assert "last good checkpoint" in err  # step 4's checkpoint

    calls[0] = 0
    out2 = tmp_path / "run2"
    assert main(ARGS + ["--output", str(out2), "--set", "train.on_nan=skip-batch"]) == 0
    log = [json.loads(line) for line in (out2 / "log.jsonl").read_text().splitlines()]
    assert log[0]["skipped_batches"] == 1
