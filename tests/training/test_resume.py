"""Checkpoints and resume: a run killed with SIGKILL and resumed ends exactly like an uninterrupted one.

Kill points are deterministic (a driver process SIGKILLs itself at a chosen optimizer step,
or halfway through writing a chosen checkpoint file), drawn from a seeded RNG.
"""

from __future__ import annotations

import errno
import json
import os
import random
import struct
import shutil
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
    "--set", "train.lr_warmup_steps=0",  # a constant rate: the resume tests check the optimizer's rate
    "--set", "model.linear_term=false",  # one phase (LR first's resume: the scripted two-phase test below)
    "--set", "train.checkpoint_overhead=1",  # a checkpoint after every evaluation: the tests name their steps
]
# evaluations (train.evals_per_epoch=4, eval_min_steps=10): at steps 10, 20, 30 and 39, mid-epoch ones too
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


def _untimed(history: list[dict]) -> list[dict]:
    """A run's history without its timings (they differ between any two runs)."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")} for r in history]


def comparable(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    history = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {
        "valid": metrics["valid"],
        "test": metrics["test"],
        "best_epoch": metrics["best_epoch"],
        "history": _untimed(history),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run that keeps every checkpoint (cut_back turns a copy into a killed run)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(ARGS + ["--output", str(out), "--set", "train.keep_checkpoints=20"]) == 0
    return out


def copy_run(reference: Path, dst: Path, up_to_step: int = 10**9, keep: int = 2, bundle: bool = True) -> Path:
    """A copy of `reference` with its last `keep` checkpoints up to `up_to_step` (and its bundle files)."""
    bundle_files = () if bundle else ("model.safetensors", "metrics.json", "manifest.json")
    shutil.copytree(reference, dst, ignore=shutil.ignore_patterns("checkpoints", *bundle_files))
    kept = [p for p in ckpt.list_checkpoints(reference) if int(p.name.split("-")[1]) <= up_to_step]
    for p in kept[len(kept) - keep:] if keep else []:
        shutil.copytree(p, dst / "checkpoints" / p.name)
    return dst


def cut_back(reference: Path, dst: Path, step: int) -> Path:
    """A copy of `reference` as if it had been killed right after its checkpoint at `step`."""
    return copy_run(reference, dst, up_to_step=step, bundle=False)


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


def _random_three_fields(cards: list[int]):
    """A 320/60/60-row dataset of random ids in three fields (labels 30% positive), seed 0."""
    import numpy as np

    from masknet.data.dataset import CTRDataset, Split

    rng = np.random.default_rng(0)

    def split(n):
        return Split(np.stack([rng.integers(0, c, n) for c in cards], 1).astype(np.int32), (rng.random(n) < 0.3).astype(np.uint8))

    return CTRDataset(["a", "b", "c"], cards, {"train": split(320), "valid": split(60), "test": split(60)})


def _seeded_fm(cards: list[int]):
    """The same FM (k = 3) every call: the model a resume test trains twice."""
    from masknet.config import ModelConfig
    from masknet.models import build_model
    from masknet.training import trainer

    trainer.seed_everything(0)
    return build_model(ModelConfig(name="fm", embedding_dim=3), cards)


def _seeded_linear_masknet(cards: list[int]):
    """The same small SerMaskNet with a first-order term (LR first) every call."""
    from masknet.config import ModelConfig
    from masknet.models import build_model
    from masknet.training import trainer

    trainer.seed_everything(0)
    return build_model(ModelConfig(name="sermasknet", embedding_dim=3, num_blocks=2, block_dim=8, linear_term=True, dropout=0.0), cards)


def _resumes_match_in_both_phases(build, cards, data, cfg, reference, full, points, calls, tmp_path) -> None:
    """A two-phase fit resumed from its checkpoints at steps 20 (phase 1, after evaluation 4) and 40
    (phase 2, after evaluation 8) ends with the uninterrupted run's history and weights."""
    from masknet.training import trainer

    for name, done in (("step-000000020", 4), ("step-000000040", 8)):
        calls[0] = done
        resumed = build(cards)
        again = trainer.fit(resumed, data, cfg, run_dir=tmp_path / name, resume_from=points[name])
        assert _untimed(again.history) == _untimed(reference.history), name
        for (k, v), (k2, v2) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(v, v2), (name, k)


def _script_validation(monkeypatch, trainer, aucs: list[float]) -> list[int]:
    """Make the trainer's evaluations return `aucs` in turn; the returned counter (calls[0]) can be
    set back to replay from an evaluation."""
    calls = [0]

    def scripted(model, split, batch_size=8192, ctx=None, head=None, tasks=None):
        calls[0] += 1
        return {"auc": aucs[calls[0] - 1], "logloss": 0.5}

    monkeypatch.setattr(trainer, "evaluate", scripted)
    return calls


def test_resume_restores_the_rate_schedule_and_the_prior_path(tmp_path, monkeypatch):
    """Warm-up, reduce-on-plateau and the L2-prior path are in the saved state: resuming from a
    checkpoint taken after a plateau (rate halved, prior on its second value) ends exactly like the
    uninterrupted run. Validation AUCs are scripted so that the plateaus happen where intended."""
    from masknet.config import TrainConfig
    from masknet.training import trainer

    cards = [6, 9, 4]
    data = _random_three_fields(cards)
    aucs = [0.6, 0.7, 0.65, 0.64, 0.8, 0.75, 0.74, 0.73]  # plateaus at evaluations 3 and 6 (patience 2)
    calls = _script_validation(monkeypatch, trainer, aucs)
    cfg = TrainConfig(
        epochs=8, batch_size=64, lr=0.05, threads=1, progress=False, evals_per_epoch=1, eval_min_steps=1, min_steps=0,
        lr_warmup_steps=7, lr_plateau_factor=0.5, l2_prior=[3.0, 1.0, 0.1], factor_prior=[], patience=2, keep_checkpoints=20,
        checkpoint_overhead=1.0, min_batches_per_epoch=0,
    )

    full, full_dir = _seeded_fm(cards), tmp_path / "full"
    reference = trainer.fit(full, data, cfg, run_dir=full_dir)
    assert [r["l2_prior"] for r in reference.history] == [3.0] * 4 + [1.0] * 3 + [0.1]
    assert len({r["lr"] for r in reference.history}) >= 4  # warm-up, then halvings on plateau
    after_plateau = next(p for p in ckpt.list_checkpoints(full_dir) if p.name == "step-000000020")  # after evaluation 4
    calls[0] = 4
    resumed = _seeded_fm(cards)
    again = trainer.fit(resumed, data, cfg, run_dir=tmp_path / "resumed", resume_from=after_plateau)
    assert _untimed(again.history) == _untimed(reference.history)
    for (k, v), (k2, v2) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def test_resume_in_either_phase_of_fms_fit_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    """FM's two phases (training.factor_phase): phase 1 holds the factors at zero while the l2_prior
    path runs; phase 2 starts from the best evaluation, keeps that stage's prior on the linear
    weights and runs the factor_prior path. A resume from a checkpoint in either phase ends exactly
    like the uninterrupted run. Validation AUCs are scripted (patience 2)."""
    from masknet.config import TrainConfig
    from masknet.training import trainer

    cards = [6, 9, 4]
    data = _random_three_fields(cards)
    # phase 1: best at 2 (prior 3), plateaus at 4 and 6; phase 2: best at 7 and 10, plateaus at 9 and 12
    aucs = [0.6, 0.7, 0.65, 0.64, 0.66, 0.68, 0.75, 0.74, 0.73, 0.8, 0.7, 0.7]
    calls = _script_validation(monkeypatch, trainer, aucs)
    cfg = TrainConfig(
        epochs=8, batch_size=64, lr=0.05, threads=1, progress=False, evals_per_epoch=1, eval_min_steps=1, min_steps=0,
        lr_warmup_steps=7, l2_prior=[3.0, 1.0], factor_prior=[1.0, 0.1], patience=2, keep_checkpoints=20,
        checkpoint_overhead=1.0, min_batches_per_epoch=0,
    )

    full, full_dir = _seeded_fm(cards), tmp_path / "full"
    reference = trainer.fit(full, data, cfg, run_dir=full_dir)
    assert [r["l2_prior"] for r in reference.history] == [3.0] * 4 + [1.0] * 2 + [3.0] * 6  # then the best stage's
    assert [r.get("factor_prior") for r in reference.history] == [None] * 6 + [1.0] * 3 + [0.1] * 3
    assert reference.best_step == 50 and full.embedding.weight.abs().sum() > 0
    points = {p.name: p for p in ckpt.list_checkpoints(full_dir)}
    from safetensors.torch import load_file

    phase1 = load_file(points["step-000000025"] / "model.safetensors")
    assert not phase1["embedding.weight"].any()  # phase 1: the factors are exactly zero (FM is LR)
    # phase 1 and phase 2: resumed after evaluation 4 and after evaluation 8
    _resumes_match_in_both_phases(_seeded_fm, cards, data, cfg, reference, full, points, calls, tmp_path)


def test_kill_while_writing_a_checkpoint_then_resume_matches(reference, tmp_path):
    # file writes come 5 per checkpoint (4 files, then the manifest); 7 = halfway through the
    # second checkpoint's best.safetensors
    out = kill_and_resume(tmp_path, "write", 7)
    assert_same_run(reference, out)
    # the killed write's temporary folder was removed when the run resumed
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


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


def poison_loss(monkeypatch, at_call: int) -> list[int]:
    """Make the loss NaN at the `at_call`-th batch; returns the call counter (set it to -10**9 to stop)."""
    from masknet.training import trainer

    real = trainer.loss_fn
    calls = [0]

    def poisoned(model, x, y, cfg, *rest):
        calls[0] += 1
        total, bce = real(model, x, y, cfg, *rest)
        return (total * float("nan"), bce) if calls[0] == at_call else (total, bce)

    monkeypatch.setattr(trainer, "loss_fn", poisoned)
    return calls


def advised_command(err: str) -> list[str]:
    """The `masknet train ...` command a NaN error advises, as an argv for main()."""
    import re
    import shlex

    m = re.search(r"(masknet train --\S.*?) \(or --set train.on_nan=skip-batch", err)
    assert m, err
    argv = shlex.split(m.group(1))
    assert argv[:2] == ["masknet", "train"]
    return argv[1:]


def optimizer_lrs(checkpoint: Path) -> list[float]:
    state = json.loads((checkpoint / "state.json").read_text())
    return [g["lr"] for opt in state["optimizers"] for g in opt["param_groups"]]


def test_nan_loss_stops_with_step_and_a_resume_command_that_works(tmp_path, monkeypatch, capsys):
    calls = poison_loss(monkeypatch, 7)
    out = tmp_path / "run"
    assert main(ARGS + ["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "non-finite loss or gradient at epoch 1, step 7" in err
    assert "last good checkpoint" in err  # step 4's checkpoint
    argv = advised_command(err)
    assert argv[:3] == ["train", "--resume", str(out)] and "train.lr=0.0001" in argv

    calls[0] = -10**9  # the advised command, run as printed: continues from step 4 with lr 1e-4
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "metrics.json").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0] == {**log[0], "event": "resume", "after_epoch": 0, "global_step": 4,
                      "changed": {"train.lr": {"from": 0.001, "to": 0.0001}}}
    assert [r["step"] for r in log[1:]] == [10, 20, 30, 39]  # every 10 steps and the last (3 epochs of 13)
    assert set(optimizer_lrs(ckpt.latest_checkpoint(out))) == {0.0001}
    assert "train.lr 0.001 -> 0.0001" in (out / "config.yaml").read_text()


def test_nan_before_the_first_checkpoint_advises_a_fresh_run_that_works(tmp_path, monkeypatch, capsys):
    calls = poison_loss(monkeypatch, 2)  # checkpoints come every 4 steps: none yet
    out = tmp_path / "run"
    assert main(ARGS + ["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint was written" in err, err
    argv = advised_command(err)
    assert "--resume" not in argv and "--overwrite" in argv and "train.lr=0.0001" in argv

    calls[0] = -10**9
    assert main(argv) == 0, capsys.readouterr().err
    from masknet.config import load_config

    cfg = load_config(out / "config.yaml")
    assert cfg.train.lr == 0.0001 and cfg.model.block_dim == 12 and cfg.train.epochs == 3  # the same run, lower lr
    assert (out / "metrics.json").is_file()


def test_on_nan_skip_batch_skips_and_counts(tmp_path, monkeypatch):
    poison_loss(monkeypatch, 7)
    out2 = tmp_path / "run2"
    assert main(ARGS + ["--output", str(out2), "--set", "train.on_nan=skip-batch"]) == 0
    log = [json.loads(line) for line in (out2 / "log.jsonl").read_text().splitlines()]
    assert log[0]["skipped_batches"] == 1


# ---------------------------------------------------------------------------
# A run folder holds one run: refusal, --overwrite, config fingerprints, write order


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_new_run_into_a_run_folder_is_refused_without_overwrite(reference, tmp_path, capsys):
    out = copy_run(reference, tmp_path / "run")
    before = snapshot(out)
    assert main(ARGS + ["--output", str(out), "--set", "train.lr=1e-4"]) == 2
    err = one_line_error(capsys)
    assert "already holds a run" in err and "--overwrite" in err
    assert snapshot(out) == before


def test_overwrite_clears_the_earlier_run_and_a_resume_continues_the_new_one(reference, tmp_path):
    """The issue's case: run B with lr 1e-4 into A's folder, killed after its first epoch, resumed:
    it must end like an uninterrupted B, not like A."""
    b_args = ARGS + ["--set", "train.lr=1e-4"]
    b_ref = tmp_path / "b-ref"
    assert main(b_args + ["--output", str(b_ref)]) == 0
    out = copy_run(reference, tmp_path / "x")  # A, with its checkpoints at steps 36 and 39
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    kill_at = STEPS_PER_EPOCH + 3  # inside B's second epoch
    proc = subprocess.run([sys.executable, str(driver), "step", str(kill_at), *b_args, "--output", str(out), "--overwrite"],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    steps = sorted(int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(out))
    assert steps and max(steps) < kill_at  # only B's checkpoints: A's were deleted by --overwrite
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert_same_run(b_ref, out)
    assert comparable(out) != comparable(reference)


def test_overwrite_never_touches_a_folder_that_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my data")
    (out / "config.yaml").write_text("model: {}\n")
    for extra in ([], ["--overwrite"]):
        assert main(ARGS + ["--output", str(out), *extra]) == 2
        err = one_line_error(capsys)
        assert "notes.txt" in err and "not a run folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt"]
    assert (out / "notes.txt").read_text() == "my data"


def test_resume_refuses_a_checkpoint_of_another_config(reference, tmp_path, capsys):
    import yaml

    out = cut_back(reference, tmp_path / "run", 16)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["train"]["batch_size"] = 128  # same shapes: the old code resumed it silently
    cfg["model"]["dropout"] = 0.2
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert "belongs to another config" in err and "train.batch_size: 256 in the checkpoint, 128" in err and "model.dropout" in err
    assert not (out / "metrics.json").exists()


def test_pruning_follows_write_order_not_step_numbers(tmp_path):
    """Checkpoints of an earlier run with higher step numbers must not make the newest one look
    old: the old code deleted the checkpoint it had just written."""
    run = tmp_path / "run"
    model = torch.nn.Linear(2, 1)
    for step in (50, 58):  # an earlier run's
        ckpt.save_checkpoint(run, model, [], model.state_dict(), {"global_step": step, "history": []}, keep=5)
    newest = ckpt.save_checkpoint(run, model, [], model.state_dict(), {"global_step": 4, "history": []}, keep=2)
    assert newest.is_dir()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000000058", "step-000000004"]
    assert ckpt.latest_checkpoint(run) == newest


def test_rerunning_a_saved_config_goes_to_a_new_folder(reference, tmp_path, monkeypatch, capsys):
    saved = copy_run(reference, tmp_path / "saved", keep=1)
    before = snapshot(saved)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(saved / "config.yaml"), "--set", "train.threads=1"]) == 0
    err = capsys.readouterr().err
    assert "is a saved run's config" in err and "runs/sermasknet-" in err
    assert snapshot(saved) == before  # the saved run is untouched
    (rerun,) = (tmp_path / "runs").iterdir()
    assert comparable(rerun) == comparable(reference)
    # --output naming the saved run's folder is explicit: refused without --overwrite
    assert main(["train", "--config", str(saved / "config.yaml"), "--output", str(saved)]) == 2
    assert "already holds a run" in one_line_error(capsys)
    assert snapshot(saved) == before


# ---------------------------------------------------------------------------
# Resuming with changed settings


def test_resume_honours_resumable_settings_and_records_them(reference, tmp_path, capsys):
    out = cut_back(reference, tmp_path / "run", 16)
    assert main(["train", "--resume", str(out), "--quiet", "--set", "train.lr=2e-4", "--set", "train.patience=2"]) == 0
    assert "train.lr: 0.001 -> 0.0002" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    event = log[1]  # after the first evaluation: the checkpoint at step 16 is 3 steps into epoch 2
    assert event["event"] == "resume" and event["checkpoint"] == "step-000000016" and event["after_epoch"] == 1
    assert event["changed"] == {"train.lr": {"from": 0.001, "to": 0.0002}, "train.patience": {"from": 3, "to": 2}}
    assert [r.get("epoch") for r in log] == [1, None, 2, 3, 3]  # evaluations at steps 10 | 20, 30, 39
    assert set(optimizer_lrs(ckpt.latest_checkpoint(out))) == {0.0002}
    text = (out / "config.yaml").read_text()
    assert "lr: 0.0002" in text and "train.lr 0.001 -> 0.0002, train.patience 3 -> 2" in text
    assert comparable(out)["history"][0] == comparable(reference)["history"][0]  # epoch 1 is the same run
    assert comparable(out)["history"][2] != comparable(reference)["history"][2]  # step 30: trained with lr 2e-4

    # a later plain resume keeps the changed settings and the record (the run is finished: nothing to train)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][1] == event


def test_resume_refuses_settings_that_change_what_is_trained(reference, tmp_path, capsys):
    out = cut_back(reference, tmp_path / "run", 16)
    before = snapshot(out)
    for extra, named in (
        (["--set", "model.dropout=0.2"], "--set model.dropout"),
        (["--set", "train.batch_size=64"], "--set train.batch_size"),
        (["--model", "fm"], "--model"),
        (["--output", str(tmp_path / "elsewhere")], "--output"),
        (["--overwrite"], "--overwrite"),
    ):
        assert main(["train", "--resume", str(out), "--quiet", *extra]) == 2
        assert named in one_line_error(capsys)
    assert snapshot(out) == before


def test_resume_cannot_extend_a_finished_run(reference, tmp_path, capsys):
    out = cut_back(reference, tmp_path / "run", 39)  # the final checkpoint
    assert main(["train", "--resume", str(out), "--quiet", "--set", "train.epochs=5"]) == 2
    assert "finished training" in one_line_error(capsys)


# ---------------------------------------------------------------------------
# Corrupt checkpoints, killed writes, full disks


def flip_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    at = 8 + n + (len(raw) - 8 - n) // 2
    raw[at - at % 4 + 3] ^= 0x40  # an exponent bit of a float32 in the middle of the weights
    path.write_bytes(bytes(raw))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, capsys):
    out = cut_back(reference, tmp_path / "run", 20)  # checkpoints at steps 4, 8, 12, 13 (epoch 1), 16, 20
    flip_bit(out / "checkpoints" / "step-000000020" / "model.safetensors")
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step-000000020/model.safetensors: SHA-256 does not match" in warnings[0]
    assert "falling back" in warnings[0] and "resuming from " + str(out / "checkpoints" / "step-000000016") in printed
    assert_same_run(reference, out)


def test_truncated_state_json_falls_back_or_is_one_line(reference, tmp_path, capsys):
    out = cut_back(reference, tmp_path / "run", 16)
    state = out / "checkpoints" / "step-000000016" / "state.json"
    state.write_bytes(state.read_bytes()[:100])
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert "step-000000016/state.json" in capsys.readouterr().out
    assert_same_run(reference, out)

    only = cut_back(reference, tmp_path / "only", 4)  # its one checkpoint truncated: nothing to fall back to
    state = only / "checkpoints" / "step-000000004" / "state.json"
    state.write_bytes(state.read_bytes()[:100])
    assert main(["train", "--resume", str(only), "--quiet"]) == 2
    assert "no intact checkpoint" in one_line_error(capsys)


def test_stale_temporary_checkpoint_folders_are_removed_on_resume(reference, tmp_path):
    out = cut_back(reference, tmp_path / "run", 30)
    root = out / "checkpoints"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # a process that has exited
    stale = [root / f".tmp-step-000000034-{dead}", root / f".tmp-step-000000035-{os.getpid()}"]
    live = root / f".tmp-step-000000036-{os.getppid()}"  # its writer is still running: left alone
    other = root / ".tmp-something-else"  # not a name masknet writes: left alone
    for p in stale + [live, other]:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"x" * 1000)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert not any(p.exists() for p in stale)
    assert live.is_dir() and other.is_dir()


def test_disk_full_while_writing_the_bundle_fails_cleanly_and_resume_finishes(reference, tmp_path, monkeypatch, capsys):
    import masknet.integrity as integrity
    import masknet.training.run as run_mod
    from masknet.serving.bundle import verify_manifest

    real = integrity._write_synced

    def full(path, data):
        if path.name.startswith(".model.safetensors"):
            with open(path, "wb") as fh:
                fh.write(data[: len(data) // 3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    def full_safetensors(state, filename, *a, **k):  # how the old code wrote the weights
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(integrity, "_write_synced", full)
    monkeypatch.setattr(run_mod, "save_file", full_safetensors, raising=False)
    out = tmp_path / "run"
    assert main(ARGS + ["--output", str(out)]) == 2
    err = one_line_error(capsys)
    assert "could not write the model bundle (No space left on device)" in err and "--resume" in err
    assert not (out / "manifest.json").exists() and not (out / "model.safetensors").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no half-written temporary file
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    verify_manifest(out)
    assert_same_run(reference, out)


# ---------------------------------------------------------------------------
# Review of issue 14: one process per run folder, a resume changes the record only once its
# checkpoint has loaded, the data is part of the run's identity, corrupt manifests, killed prunes


PAUSE_DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from masknet.training import trainer
    marker, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    calls = [0]
    original_step = trainer.Optimizer.step
    def step(self):
        calls[0] += 1
        if calls[0] == n:  # a live run, mid-training: say so, then wait to be killed
            open(marker, "w").write(str(os.getpid()))
            time.sleep(600)
        original_step(self)
    trainer.Optimizer.step = step
    from masknet.cli import main
    sys.exit(main(args))
    """
)


def test_a_live_run_folder_refuses_a_second_train_or_resume_naming_its_pid(reference, tmp_path, capsys):
    """Before: two `--overwrite` runs into one folder interleaved (config.yaml of one, weights of the
    other), and a resume of a live run rewrote its config.yaml before failing."""
    out = tmp_path / "run"
    marker = tmp_path / "paused"
    driver = tmp_path / "pause.py"
    driver.write_text(PAUSE_DRIVER)
    live = subprocess.Popen([sys.executable, str(driver), str(marker), str(STEPS_PER_EPOCH + 2), *ARGS, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if marker.exists() or live.poll() is not None:
                break
            import time

            time.sleep(0.1)
        assert marker.exists(), live.stderr.read()[-2000:] if live.poll() is not None else "the live run did not start"
        pid = marker.read_text()
        before = snapshot(out)
        for argv in (ARGS + ["--output", str(out), "--overwrite", "--set", "train.lr=1e-4"],
                     ["train", "--resume", str(out), "--quiet", "--set", "train.lr=1e-4"]):
            assert main(argv) == 2
            err = one_line_error(capsys)
            assert f"{out}: in use by another masknet train (pid {pid})" in err, err
            assert snapshot(out) == before  # nothing written, nothing deleted
    finally:
        live.kill()
        live.wait()
    # the kernel released the dead run's lock: it resumes, and ends like an uninterrupted run
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert_same_run(reference, out)
    assert not (out / ".masknet-lock").exists()


def test_a_checkpoint_that_cannot_load_leaves_the_record_unchanged(reference, tmp_path, capsys):
    """Before: config.yaml (with the new lr and a "resumed from" comment) and log.jsonl were
    rewritten before the checkpoint loaded, and the load error took two lines."""
    from safetensors.torch import load as st_load, save as st_save

    out = copy_run(reference, tmp_path / "run", up_to_step=16, keep=1, bundle=False)
    ck = out / "checkpoints" / "step-000000016"
    weights = st_load((ck / "model.safetensors").read_bytes())
    name = next(k for k, v in weights.items() if v.dim() == 2)
    weights[name] = weights[name][:-1].clone()  # another shape: intact by its manifest, but not this model's
    data = st_save(weights)
    (ck / "model.safetensors").write_bytes(data)
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"sha256": __import__("hashlib").sha256(data).hexdigest(), "bytes": len(data)}
    (ck / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(out)
    assert main(["train", "--resume", str(out), "--quiet", "--set", "train.lr=1e-4"]) == 2
    err = one_line_error(capsys)
    assert f"{ck}: unreadable checkpoint" in err and "size mismatch" in err, err
    assert snapshot(out) == before


def test_resume_refuses_fewer_epochs_than_the_run_has_trained(reference, tmp_path, capsys):
    """Before: `--set train.epochs=1` after 2 epochs was accepted: config.yaml said 1 epoch, the run
    held 2."""
    out = cut_back(reference, tmp_path / "run", 30)  # 2 epochs done, 4 steps into the third
    before = snapshot(out)
    assert main(["train", "--resume", str(out), "--quiet", "--set", "train.epochs=1"]) == 2
    err = one_line_error(capsys)
    assert "train.epochs=1 is fewer than the 2 epochs the run has already trained" in err, err
    assert snapshot(out) == before
    # as many: it stops at once (not one more step into epoch 3; the cap is exact, the 2,000-step minimum is off)
    assert main(["train", "--resume", str(out), "--quiet", "--set", "train.epochs=2"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r.get("step"), r.get("epoch")) for r in log] == [(10, 1), (20, 2), (30, 3), (None, None)]
    assert log[-1]["after_epoch"] == 2 and log[-1]["changed"] == {"train.epochs": {"from": 3, "to": 2}}
    assert ckpt.latest_checkpoint(out).name == "step-000000030"  # marked final, no step trained


def test_a_resumed_epochs_is_an_exact_cap(reference, tmp_path):
    """Before: `--set train.epochs=N` on resume kept train.min_steps, so a default run (min_steps
    2,000) trained past the N epochs asked for; now it is exact, as `--epochs N` is."""
    out = cut_back(reference, tmp_path / "run", 16)  # 3 steps into epoch 2
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("min_steps: 0", "min_steps: 2000"))
    for c in ckpt.list_checkpoints(out):  # as if the run had been trained with the default minimum
        manifest = c / "manifest.json"
        m = json.loads(manifest.read_text())
        m["config"]["train"]["min_steps"] = 2000
        m.pop("config_sha256")
        manifest.write_text(json.dumps(m))
    assert main(["train", "--resume", str(out), "--quiet", "--set", "train.epochs=2"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in log] == [10, None, 20, 26]  # ends at epoch 2's last step
    assert log[1]["changed"] == {"train.epochs": {"from": 3, "to": 2}, "train.min_steps": {"from": 2000, "to": 0}}


@pytest.mark.parametrize("setting", ["train.lr=1e-4", "train.lr=inf", "train.on_nan=skip-batch"])
def test_a_finished_run_refuses_settings_it_was_not_trained_with(reference, tmp_path, capsys, setting):
    """Before: on a finished run, `--resume --set train.lr=...` trained nothing but wrote the new
    value and a resume comment into config.yaml (inf too, which then advised `train.lr=inf`)."""
    out = cut_back(reference, tmp_path / "run", 39)  # the final checkpoint
    before = snapshot(out)
    assert main(["train", "--resume", str(out), "--quiet", "--set", setting]) == 2
    err = one_line_error(capsys)
    assert ("finished training" in err) or ("expected a finite number" in err), err
    assert snapshot(out) == before


def test_a_corrupt_newest_manifest_falls_back_with_a_warning(reference, tmp_path, capsys):
    """Before: an unparsable manifest sorted as the oldest checkpoint, so the fallback was silent."""
    out = cut_back(reference, tmp_path / "run", 20)
    manifest = out / "checkpoints" / "step-000000020" / "manifest.json"
    raw = bytearray(manifest.read_bytes())
    raw[0] ^= 0x01
    manifest.write_bytes(bytes(raw))
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step-000000020/manifest.json: unreadable" in warnings[0], printed
    assert "resuming from " + str(out / "checkpoints" / "step-000000016") in printed
    assert_same_run(reference, out)


def test_a_manifest_with_wrong_types_is_a_fallback_not_a_traceback(reference, tmp_path, capsys):
    out = cut_back(reference, tmp_path / "run", 20)
    manifest = out / "checkpoints" / "step-000000020" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["resumes"] = 7
    manifest.write_text(json.dumps(m))
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "step-000000020/manifest.json: resumes: expected a list" in printed
    assert_same_run(reference, out)


PRUNE_DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from masknet.training import checkpoint
    args = sys.argv[1:]
    real = checkpoint.shutil.rmtree
    def rmtree(path, *a, **k):  # die halfway through deleting the first pruned checkpoint
        path = Path(path)
        if "step-" in path.name and (path / "best.safetensors").exists():
            (path / "best.safetensors").unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, *a, **k)
    checkpoint.shutil.rmtree = rmtree
    from masknet.cli import main
    sys.exit(main(args))
    """
)


def test_a_kill_while_pruning_leaves_no_partial_checkpoint_and_resume_cleans_up(reference, tmp_path):
    """Before: a kill -9 while pruning left a partial step-* folder that nothing ever removed."""
    out = tmp_path / "run"
    driver = tmp_path / "prune.py"
    driver.write_text(PRUNE_DRIVER)
    proc = subprocess.run([sys.executable, str(driver), *ARGS, "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = out / "checkpoints"
    partial = [p.name for p in root.iterdir() if p.name.startswith("step-") and not (p / "best.safetensors").exists()]
    assert partial == []  # the checkpoint being pruned had been renamed away first
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-step-")]
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert_same_run(reference, out)


def test_partial_step_folders_are_removed_on_resume(reference, tmp_path):
    """What an older masknet killed while pruning left: a step-* folder missing files."""
    out = cut_back(reference, tmp_path / "run", 20)
    partial = out / "checkpoints" / "step-000000008"
    shutil.copytree(reference / "checkpoints" / "step-000000008", partial)
    (partial / "best.safetensors").unlink()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert not partial.exists()
    assert_same_run(reference, out)


# ---------------------------------------------------------------------------
# The data is part of the run's identity


SMALL = ["train", "--quiet", "--epochs", "2", "--seed", "3", "--set", "model.block_dim=8", "--set", "model.num_blocks=1",
         "--set", "train.batch_size=256", "--set", "train.threads=1", "--set", "train.patience=3",
         "--set", "train.keep_checkpoints=20", "--set", "train.checkpoint_overhead=1"]


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    """A run on a prepared dataset given by a RELATIVE path, and that dataset with valid and test swapped."""
    from masknet.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("datarun")
    write_synthetic(root / "d", 3000, seed=11)
    swapped = root / "w" / "d"  # same name, other folder: what a relative path finds from `w`
    shutil.copytree(root / "d", swapped)
    meta = json.loads((swapped / "meta.json").read_text())
    for kind in ("x", "y", "p"):
        a, b = swapped / f"valid.{kind}.bin", swapped / f"test.{kind}.bin"
        a.rename(swapped / "tmp.bin")
        b.rename(a)
        (swapped / "tmp.bin").rename(b)
        meta["files"][a.name], meta["files"][b.name] = meta["files"][b.name], meta["files"][a.name]
    meta["splits"]["valid"], meta["splits"]["test"] = meta["splits"]["test"], meta["splits"]["valid"]
    (swapped / "meta.json").write_text(json.dumps(meta))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(SMALL + ["--data", "d", "--output", str(root / "ref")]) == 0
    finally:
        os.chdir(cwd)
    return root


def test_the_run_records_the_resolved_data_path_and_its_fingerprint(prepared_run):
    import yaml

    from masknet.data.dataset import identity

    ref = prepared_run / "ref"
    assert yaml.safe_load((ref / "config.yaml").read_text())["data"]["path"] == str(prepared_run / "d")
    data = json.loads((ckpt.latest_checkpoint(ref) / "manifest.json").read_text())["data"]
    meta = json.loads((prepared_run / "d" / "meta.json").read_text())
    assert data["path"] == str(prepared_run / "d") and data["given"] == "d"
    assert data["fingerprint"] == identity(prepared_run / "d", meta)["fingerprint"]


def test_a_resume_from_another_directory_trains_on_the_same_data(prepared_run, tmp_path, monkeypatch):
    """Before: `data.path: d` was resolved against the current directory, so `cd w; masknet train
    --resume RUN` trained on w/d (valid and test swapped) without a word."""
    out = cut_back(prepared_run / "ref", tmp_path / "run", 10)  # 10 steps per epoch: killed after epoch 1
    monkeypatch.chdir(prepared_run / "w")
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert_same_run(prepared_run / "ref", out)


def test_a_resume_on_other_data_is_refused_naming_what_differs(prepared_run, tmp_path, capsys):
    import yaml

    out = cut_back(prepared_run / "ref", tmp_path / "run", 10)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["data"]["path"] = str(prepared_run / "w" / "d")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    before = snapshot(out)
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert "was trained on other data" in err and f"then the prepared dataset {prepared_run / 'd'}" in err, err
    assert f"now the prepared dataset {prepared_run / 'w' / 'd'}" in err
    assert "files that differ: test.p.bin, test.x.bin, test.y.bin, valid.p.bin, valid.x.bin, valid.y.bin" in err
    assert snapshot(out) == before
    # the same content at another path resumes (a dataset may move)
    moved = tmp_path / "moved"
    shutil.copytree(prepared_run / "d", moved)
    cfg["data"]["path"] = str(moved)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert "note: the data moved" in capsys.readouterr().out
    assert_same_run(prepared_run / "ref", out)


def test_checkpoints_of_synthetic_runs_record_the_generator(reference):
    data = json.loads((ckpt.latest_checkpoint(reference) / "manifest.json").read_text())["data"]
    assert data["synthetic"]["rows"] == 4000 and data["synthetic"]["seed"] == 7
    assert data["synthetic"]["generator"].startswith("masknet.data.synthetic")


# ---------------------------------------------------------------------------
# Creating and writing the run folder: one line, naming the path


def test_run_folder_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """Before: FileNotFoundError, NotADirectoryError, OSError (disk full) tracebacks."""
    import masknet.training.runfolder as rf

    (tmp_path / "file.txt").write_text("x")
    for output, expect in ((tmp_path / "file.txt" / "x", "Not a directory"), ("/proc/nope", "/proc/nope")):
        assert main(ARGS[:3] + ["1"] + ARGS[4:] + ["--output", str(output)]) == 2
        assert expect in one_line_error(capsys)

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(rf, "write_atomic", full)
    out = tmp_path / "run"
    assert main(ARGS[:3] + ["1"] + ARGS[4:] + ["--output", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"{out / 'config.yaml'}: cannot write the run folder {out}: No space left on device" in err, err


def test_resume_with_an_unwritable_log_or_a_binary_config_is_one_line(reference, tmp_path, capsys):
    out = cut_back(reference, tmp_path / "run", 16)
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").mkdir()  # as unwritable as an immutable file, for root too
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    assert f"{out / 'log.jsonl'}: cannot write the run folder" in one_line_error(capsys)
    (out / "log.jsonl").rmdir()
    (out / "config.yaml").write_bytes(b"\xff\xfe")
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    assert f"{out / 'config.yaml'}: not UTF-8 text" in one_line_error(capsys)


def test_rerunning_a_saved_config_from_inside_its_folder_leaves_it_alone(reference, tmp_path, monkeypatch, capsys):
    """Before: `cd RUN && masknet train --config config.yaml` created RUN/runs/..., although it said
    the folder was left alone."""
    saved = copy_run(reference, tmp_path / "saved", keep=1)
    before = snapshot(saved)
    monkeypatch.chdir(saved)
    assert main(["train", "--config", "config.yaml", "--epochs", "1", "--set", "train.threads=1", "--quiet"]) == 0
    assert snapshot(saved) == before and not (saved / "runs").exists()
    (rerun,) = [p for p in tmp_path.iterdir() if p.name.startswith("sermasknet-")]  # beside the saved run
    assert (rerun / "metrics.json").is_file()
    assert f"this run goes to {rerun}" in capsys.readouterr().err
    # an explicit --output inside a run folder is refused too
    assert main(["train", "--config", "config.yaml", "--output", "sub"]) == 2
    assert f"is inside the run folder {saved}" in one_line_error(capsys)
    assert snapshot(saved) == before


def test_a_model_too_large_for_memory_is_one_line(tmp_path, capsys, monkeypatch):
    """Cardinalities within meta.json's bounds can still ask for more memory than there is (the
    review's 10^12 rows gave an allocator traceback)."""
    import masknet.training.run as run_mod

    def too_large(cfg, cardinalities, multi_valued=(), tasks=None):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 85899346280 bytes.\nError code 12 (Cannot allocate memory)")

    monkeypatch.setattr(run_mod, "build_model", too_large)
    assert main(ARGS[:3] + ["1"] + ARGS[4:] + ["--output", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert "the model does not fit in memory" in err and "embedding rows" in err and "can't allocate memory" in err


def test_overwrite_replaces_a_run_that_logged_to_tensorboard(tmp_path, capsys):
    """The tensorboard/ folder `--log tensorboard` writes is part of a run (was: "tensorboard is
    nothing masknet train writes"); a file of the user's in it is not."""
    pytest.importorskip("tensorboard")
    tiny = ARGS[:3] + ["1"] + ARGS[4:] + ["--set", "data.synthetic.rows=1000"]
    out = tmp_path / "run"
    assert main(tiny + ["--log", "tensorboard", "--output", str(out)]) == 0
    assert any((out / "tensorboard").iterdir())
    assert main(tiny + ["--output", str(out), "--overwrite"]) == 0
    assert not (out / "tensorboard").exists()
    assert main(tiny + ["--log", "tensorboard", "--output", str(out), "--overwrite"]) == 0
    (out / "tensorboard" / "notes.txt").write_text("mine")
    assert main(tiny + ["--output", str(out), "--overwrite"]) == 2
    assert "tensorboard/notes.txt is nothing masknet train writes" in one_line_error(capsys)


def test_resume_in_either_phase_of_a_masknets_lr_first_fit_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    """A MaskNet with a first-order term (model.linear_term) fits in two phases: LR's run at
    first_phase_lr with the deep part off (its prediction layer exactly zero), then the deep part
    from the best evaluation, at lr with its own warm-up (second_phase_warmup). A resume from a
    checkpoint in either phase ends exactly like the uninterrupted run. Scripted AUCs (patience 2)."""
    from masknet.config import TrainConfig
    from masknet.training import trainer

    cards = [6, 9, 4]
    data = _random_three_fields(cards)
    # phase 1: best at 2, plateaus at 4 and 6; phase 2 (one stage): best at 7, stops at 9 after its warm-up
    aucs = [0.6, 0.7, 0.65, 0.64, 0.66, 0.68, 0.75, 0.74, 0.73, 0.72, 0.71, 0.7]
    calls = _script_validation(monkeypatch, trainer, aucs)
    cfg = TrainConfig(
        epochs=8, batch_size=64, lr=0.01, first_phase_lr=0.05, threads=1, progress=False, evals_per_epoch=1, eval_min_steps=1,
        min_steps=0, lr_warmup_steps=7, l2_prior=[3.0, 1.0], factor_prior=[0.0], second_phase_warmup=True, patience=2,
        keep_checkpoints=20, checkpoint_overhead=1.0, min_batches_per_epoch=0,
    )

    full, full_dir = _seeded_linear_masknet(cards), tmp_path / "full"
    reference = trainer.fit(full, data, cfg, run_dir=full_dir)
    phase2 = [r for r in reference.history if "factor_prior" in r]
    assert len(reference.history) - len(phase2) == 6 and len(phase2) >= 3
    assert reference.history[5]["lr"] == pytest.approx(0.05)  # phase 1 at first_phase_lr
    assert phase2[0]["lr"] == pytest.approx(0.01 * 5 / 7)  # phase 2: its own warm-up (5 steps per epoch, 7-step warm-up)
    assert reference.best_step == 35 and full.prediction.weight.abs().sum() > 0 and full.deep_active
    points = {p.name: p for p in ckpt.list_checkpoints(full_dir)}
    phase1 = load_file(points["step-000000025"] / "model.safetensors")
    assert not phase1["prediction.weight"].any() and not phase1["prediction.bias"].any()  # the deep part adds nothing
    assert phase1["linear.weights.weight"].any()  # while LR trains
    # phase 1 and phase 2: resumed after evaluation 4 and after evaluation 8
    _resumes_match_in_both_phases(_seeded_linear_masknet, cards, data, cfg, reference, full, points, calls, tmp_path)


def _seeded_linear_deepfm(cards: list[int]):
    """The same small DeepFM fitted LR first every call."""
    from masknet.config import ModelConfig
    from masknet.models import build_model
    from masknet.training import trainer

    trainer.seed_everything(0)
    return build_model(ModelConfig(name="deepfm", embedding_dim=3, dnn_hidden=[8], linear_term=True), cards)


def test_resume_in_either_phase_of_a_deepfms_lr_first_fit_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    """DeepFM fitted LR first: phase 1 holds the shared embedding and the tower's output unit at
    exactly zero (the model is LR), phase 2 starts them from the best evaluation. A resume from a
    checkpoint in either phase ends exactly like the uninterrupted run. Scripted AUCs (patience 2)."""
    from masknet.config import TrainConfig
    from masknet.training import trainer

    cards = [6, 9, 4]
    data = _random_three_fields(cards)
    aucs = [0.6, 0.7, 0.65, 0.64, 0.66, 0.68, 0.75, 0.74, 0.73, 0.72, 0.71, 0.7]
    calls = _script_validation(monkeypatch, trainer, aucs)
    cfg = TrainConfig(
        epochs=8, batch_size=64, lr=0.01, first_phase_lr=0.05, threads=1, progress=False, evals_per_epoch=1, eval_min_steps=1,
        min_steps=0, lr_warmup_steps=7, l2_prior=[3.0, 1.0], factor_prior=[0.0], second_phase_warmup=True, patience=2,
        keep_checkpoints=20, checkpoint_overhead=1.0, min_batches_per_epoch=0,
    )

    full, full_dir = _seeded_linear_deepfm(cards), tmp_path / "full"
    reference = trainer.fit(full, data, cfg, run_dir=full_dir)
    phase2 = [r for r in reference.history if "factor_prior" in r]
    assert len(reference.history) - len(phase2) == 6 and len(phase2) >= 3
    assert reference.best_step == 35 and full.second_active
    assert full.tower.output.weight.abs().sum() > 0 and full.embedding.weight.abs().sum() > 0
    points = {p.name: p for p in ckpt.list_checkpoints(full_dir)}
    phase1 = load_file(points["step-000000025"] / "model.safetensors")
    assert not phase1["embedding.weight"].any() and not phase1["tower.output.weight"].any()  # LR, exactly
    assert phase1["linear.weights.weight"].any()
    _resumes_match_in_both_phases(_seeded_linear_deepfm, cards, data, cfg, reference, full, points, calls, tmp_path)
