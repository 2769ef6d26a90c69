"""Multi-process training on torch.distributed (gloo, loopback): same run as one process.

Two processes with global batch B see, step by step, the same rows as one process with
batch B (each rank takes its half of every global batch), and DDP averages gradients, so
the loss curve and the final AUC must match a single-process run up to float summation
order. Tolerances: 1e-5 relative on per-epoch losses, 0.002 on AUC (the issue's bound).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = [
    "train", "--quiet", "--epochs", "2", "--seed", "3",
    "--set", "data.synthetic.rows=6000", "--set", "model.block_dim=16", "--set", "model.num_blocks=2",
    "--set", "train.batch_size=256", "--set", "train.threads=1", "--set", "train.patience=2",
    # 4,800 train rows would get the MaskNets' small-data dropout, whose masks each rank draws from its
    # own generator: the ranks could not add up to the one-process run
    "--set", "model.dropout=0",
]


# generous: ~80 s alone, but a 2-core CI machine under load has taken over 240 s (a hang still fails)
TIMEOUT_S = 600


def run(cmd: list[str], timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    run([sys.executable, "-m", "masknet", *ARGS, "--output", str(out)])
    return out


def assert_equivalent(single: Path, multi: Path) -> None:
    h1, h2 = history(single), history(multi)
    # one record per evaluation (4 per epoch, 10 steps apart: mid-epoch ones too), at the same steps
    assert len(h1) == len(h2) >= 2 and [r["step"] for r in h1] == [r["step"] for r in h2]
    for a, b in zip(h1, h2):
        assert b["train_logloss"] == pytest.approx(a["train_logloss"], rel=1e-5)
        assert b["valid_logloss"] == pytest.approx(a["valid_logloss"], rel=1e-5)
        assert abs(b["valid_auc"] - a["valid_auc"]) < 0.002
    m1 = json.loads((single / "metrics.json").read_text())
    m2 = json.loads((multi / "metrics.json").read_text())
    assert abs(m1["test"]["auc"] - m2["test"]["auc"]) < 0.002
    assert m2["distributed"]["world_size"] == 2
    assert len(set(m2["distributed"]["rank_seeds"])) == 2  # per-rank seeds, recorded


def test_two_processes_match_one(single, tmp_path):
    out = tmp_path / "run"
    run([sys.executable, "-m", "masknet", *ARGS, "--nproc", "2", "--output", str(out)])
    assert_equivalent(single, out)
    # only rank 0 wrote the run folder: one log line per evaluation (not one per rank), one set of files
    assert len(history(out)) == len(history(single))
    assert (out / "model.safetensors").is_file()


def test_two_hosts_on_loopback_match_one(single, tmp_path):
    """A multi-machine run: two torchrun agents (node_rank 0 and 1) meeting at a loopback rendezvous."""
    out = tmp_path / "run"
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                "-m", "masknet", *ARGS, "--output", str(out),
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT_S)
        assert p.returncode == 0, err[-3000:]
    assert_equivalent(single, out)


def test_nproc_needs_output(capsys):
    from masknet.cli import main

    assert main(["train", "--nproc", "2"]) == 2
    assert "--output" in capsys.readouterr().err


def test_nproc_refuses_a_run_folder_before_launching(tmp_path, capsys):
    from masknet.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: {}\n")
    (out / "log.jsonl").write_text("")
    assert main(["train", "--nproc", "2", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "already holds a run" in err and "--overwrite" in err


def test_resumed_two_process_run_with_dropout_continues_exactly(tmp_path):
    """With dropout every rank draws its own masks; a checkpoint holds every rank's RNG state, so
    a two-process run resumed from a mid-epoch checkpoint ends with the very same weights. 4,800
    train rows: the MaskNet fits LR first, so the resume starts in phase 1 (DDP leaves the deep part
    out) and goes through phase 2 (DDP built again with it)."""
    import shutil

    args = [
        *ARGS, "--epochs", "2", "--set", "model.dropout=0.3", "--set", "train.checkpoint_every_steps=7",
        "--set", "train.keep_checkpoints=1000", "--nproc", "2",  # all of them: step 7 is kept
    ]
    full = tmp_path / "full"
    run([sys.executable, "-m", "masknet", *args, "--output", str(full)])
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    ckpts = sorted((resumed / "checkpoints").glob("step-*"))
    assert len(ckpts) >= 4
    for later in ckpts[1:]:  # keep only the step-7 checkpoint (mid epoch 1)
        shutil.rmtree(later)
    for name in ("model.safetensors", "metrics.json", "manifest.json"):
        (resumed / name).unlink()
    state = json.loads((ckpts[0] / "state.json").read_text())
    assert state["global_step"] == 7 and state["epoch"] == 1
    from safetensors.torch import load_file

    rng = load_file(str(ckpts[0] / "optim.safetensors"))
    assert {"rng.torch.rank0", "rng.torch.rank1"} <= set(rng)
    assert not (rng["rng.torch.rank0"] == rng["rng.torch.rank1"]).all()  # per-rank seeds
    run([sys.executable, "-m", "masknet", "train", "--quiet", "--resume", str(resumed), "--nproc", "2"])
    assert (resumed / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    untimed = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")} for r in h]  # noqa: E731
    assert untimed(history(resumed)) == untimed(history(full))
    assert {r.get("phase") for r in history(full)} == {1, 2}


def test_device_resolution_and_backend_choice(monkeypatch):
    """auto = CUDA when present, else CPU; cuda without a GPU is a clear error; ranks on CUDA
    use NCCL (which has no sparse all-reduce, so their tables train densely)."""
    import torch

    from masknet.errors import UserError
    from masknet.training.distributed import DistContext, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match="train.device=cuda"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == "cuda:1" and resolve_device("cpu", 1) == "cpu"
    with pytest.raises(UserError, match="LOCAL_RANK=2"):
        resolve_device("cuda", local_rank=2)
    assert DistContext(0, 2, "cuda:0", "nccl").sparse_allreduce is False
    assert DistContext(0, 2).sparse_allreduce and DistContext(device="cuda:0").sparse_allreduce


def test_cuda_requested_without_gpu_exits_with_one_line(capsys):
    import torch

    from masknet.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "--quiet", "--set", "train.device=cuda", "--set", "data.synthetic.rows=1000"]) == 2
    err = capsys.readouterr().err
    assert "train.device=cuda" in err and "Traceback" not in err
