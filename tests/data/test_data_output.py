"""`masknet prepare` never loses the dataset already in its output, however it fails (issue 14, items 1 and 12).

A run builds in a temporary sibling folder and swaps it in only when complete; these tests break
runs in every way the issue names (missing input, bad line, full disk, unwritable output, truncated
gzip, SIGKILL at random points and at each step of the swap) and compare the output's bytes.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from masknet.cli import main
from masknet.data import output as outmod
from masknet.data.dataset import PreparedWriter, load_prepared
from masknet.data.prepare import prepare
from masknet.data.rawgen import write_criteo
from masknet.data.formats import builtin_spec
from masknet.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("raw")
    return {"a": write_criteo(d / "a.txt", 400, seed=1), "b": write_criteo(d / "b.txt", 500, seed=2)}


def snapshot(folder: Path) -> dict[str, object]:
    """Every file of a prepared folder, meta.json without its timings (they differ run to run)."""
    out: dict[str, object] = {}
    for p in sorted(folder.iterdir()):
        if p.name == "meta.json":
            meta = json.loads(p.read_text())
            meta["stats"].pop("seconds", None)
            out[p.name] = meta
        else:
            out[p.name] = p.read_bytes()
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((outmod.TMP_PREFIX, outmod.OLD_PREFIX)))


def run_prepare(capsys, *args: str) -> tuple[int, str]:
    rc = main(["prepare", "--format", "criteo", "--min-count", "1", *args])
    err = capsys.readouterr().err
    return rc, err


def assert_one_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("masknet prepare: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, err)


@pytest.fixture()
def dataset_a(tmp_path, raw, capsys) -> tuple[Path, dict]:
    out = tmp_path / "data"
    assert run_prepare(capsys, "--input", str(raw["a"]), "--output", str(out))[0] == 0
    return out, snapshot(out)


# ---------------------------------------------------------------------------
# Item 1: a failed run keeps the old dataset; replacing one needs --overwrite


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("failure", ["missing_input", "bad_line"])
def test_failed_prepare_keeps_the_existing_dataset(tmp_path, capsys, dataset_a, raw, failure, overwrite):
    out, before = dataset_a
    src = tmp_path / "typo.txt"
    if failure == "bad_line":
        lines = raw["b"].read_text().splitlines()
        lines[30] = "2" + lines[30][1:]  # label 2
        src.write_text("\n".join(lines) + "\n")
    rc, err = run_prepare(capsys, "--input", str(src), "--output", str(out), *(["--overwrite"] if overwrite else []))
    assert rc == 2
    assert_one_line(err)
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_prepared_dataset_is_replaced_only_with_overwrite(tmp_path, capsys, dataset_a, raw):
    out, before = dataset_a
    rc, err = run_prepare(capsys, "--input", str(raw["b"]), "--output", str(out))
    assert rc == 2
    assert_one_line(err, str(out), "--overwrite")
    assert snapshot(out) == before

    ref = tmp_path / "ref"
    assert run_prepare(capsys, "--input", str(raw["b"]), "--output", str(ref))[0] == 0
    assert run_prepare(capsys, "--input", str(raw["b"]), "--output", str(out), "--overwrite")[0] == 0
    assert snapshot(out) == snapshot(ref) != before
    assert leftovers(tmp_path) == []


def test_overwrite_in_the_python_api(tmp_path, dataset_a, raw):
    out, before = dataset_a
    spec = builtin_spec("criteo").with_min_count(1)
    with pytest.raises(UserError, match="--overwrite"):
        prepare(spec, out, input=raw["b"])
    assert snapshot(out) == before
    stats = prepare(spec, out, input=raw["b"], overwrite=True)
    assert sum(stats["rows"].values()) == 500
    assert sum(len(s) for s in load_prepared(out).splits.values()) == 500


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_holding_anything_else_is_never_replaced(tmp_path, capsys, raw, overwrite):
    flag = ["--overwrite"] if overwrite else []
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    rc, err = run_prepare(capsys, "--input", str(raw["a"]), "--output", str(mine), *flag)
    assert rc == 2
    assert_one_line(err, str(mine), "notes.txt")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    # a prepared dataset with a file of the user's in it: also refused, even with --overwrite
    data = tmp_path / "data"
    assert run_prepare(capsys, "--input", str(raw["a"]), "--output", str(data))[0] == 0
    (data / "my-results.csv").write_text("1,2\n")
    before = snapshot(data)
    rc, err = run_prepare(capsys, "--input", str(raw["b"]), "--output", str(data), *flag)
    assert rc == 2
    assert_one_line(err, "my-results.csv")
    assert snapshot(data) == before

    # a meta.json that is not ours
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text('{"format": "something else"}')
    rc, err = run_prepare(capsys, "--input", str(raw["a"]), "--output", str(other), *flag)
    assert rc == 2
    assert_one_line(err, "meta.json")


def test_an_empty_folder_or_a_new_path_is_written(tmp_path, capsys, raw):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_prepare(capsys, "--input", str(raw["a"]), "--output", str(empty))[0] == 0
    assert (empty / "meta.json").is_file()
    deep = tmp_path / "x" / "y" / "z"
    assert run_prepare(capsys, "--input", str(raw["a"]), "--output", str(deep))[0] == 0
    assert snapshot(deep) == snapshot(empty)
    assert oct(deep.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # the usual permissions, not mkdtemp's 0700


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_output_through_a_symlink_replaces_the_target(tmp_path, capsys, dataset_a, raw):
    out, _ = dataset_a
    link = tmp_path / "link"
    link.symlink_to(out)
    assert run_prepare(capsys, "--input", str(raw["b"]), "--output", str(link), "--overwrite")[0] == 0
    assert link.is_symlink() and sum(len(s) for s in load_prepared(link).splits.values()) == 500


# ---------------------------------------------------------------------------
# Stale build folders, and recovery from a kill during the swap


def test_stale_build_folders_are_removed_live_and_foreign_ones_kept(tmp_path, capsys, raw):
    stale = tmp_path / f"{outmod.TMP_PREFIX}data-123-abcd"
    stale.mkdir()
    (stale / outmod.BUILD_MARK).write_text("123-abcd")
    (stale / "train.x.bin").write_bytes(b"\0" * 100_000)  # what a killed run leaves filling the disk
    empty = tmp_path / f"{outmod.TMP_PREFIX}data-124-abcd"  # killed between mkdir and its mark
    empty.mkdir()
    live = tmp_path / f"{outmod.TMP_PREFIX}data-125-abcd"
    live.mkdir()
    (live / outmod.BUILD_MARK).write_text("125-abcd")
    foreign = tmp_path / f"{outmod.TMP_PREFIX}not-ours"  # our prefix, but no mark and not empty
    foreign.mkdir()
    (foreign / "x").write_text("x")
    fd = os.open(live / outmod.BUILD_MARK, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running prepare holds it
    try:
        assert run_prepare(capsys, "--input", str(raw["a"]), "--output", str(tmp_path / "data"))[0] == 0
    finally:
        os.close(fd)
    assert not stale.exists() and not empty.exists()
    assert live.exists() and foreign.exists()


def _half_swapped(tmp_path: Path, capsys, raw, step: int) -> tuple[Path, dict, dict]:
    """The state a run killed after swap step `step` (1 or 2) leaves: A is the old dataset, B the new."""
    out = tmp_path / "data"
    assert run_prepare(capsys, "--input", str(raw["a"]), "--output", str(out))[0] == 0
    new = tmp_path / "new"
    assert run_prepare(capsys, "--input", str(raw["b"]), "--output", str(new))[0] == 0
    a, b = snapshot(out), snapshot(new)
    build_id = "999-deadbeef"
    tmp = tmp_path / f"{outmod.TMP_PREFIX}data-{build_id}"
    new.rename(tmp)
    (tmp / outmod.BUILD_MARK).write_text(build_id)
    out.rename(tmp_path / f"{outmod.OLD_PREFIX}data-{build_id}")  # step 1
    if step == 2:
        tmp.rename(out)
    return out, a, b


def test_a_kill_between_the_two_renames_restores_the_old_dataset(tmp_path, capsys, raw):
    out, a, _ = _half_swapped(tmp_path, capsys, raw, step=1)
    assert not out.exists()
    rc, err = run_prepare(capsys, "--input", str(raw["b"]), "--output", str(out))
    assert rc == 2 and "--overwrite" in err  # restored, then refused as an existing dataset
    assert f"masknet prepare: restored data from {outmod.OLD_PREFIX}data-999-deadbeef" in err
    assert snapshot(out) == a
    assert leftovers(tmp_path) == []


def test_a_kill_after_the_second_rename_keeps_the_new_dataset(tmp_path, capsys, raw):
    out, _, b = _half_swapped(tmp_path, capsys, raw, step=2)
    outmod.recover(out)
    b.pop(outmod.BUILD_MARK, None)
    assert snapshot(out) == b
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------
# Item 12: full disk, unwritable output, truncated gzip


@pytest.mark.parametrize("where", ["spill", "writer", "meta"])
def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, capsys, dataset_a, raw, monkeypatch, where):
    out, before = dataset_a

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "spill":
        from masknet.data.spill import Spill

        monkeypatch.setattr(Spill, "flush", full)
    elif where == "writer":
        monkeypatch.setattr(PreparedWriter, "append", full)
    else:
        from masknet.data import integrity

        monkeypatch.setattr(integrity, "record", full)
    rc, err = run_prepare(capsys, "--input", str(raw["b"]), "--output", str(out), "--overwrite")
    assert rc == 2
    assert_one_line(err, str(out), "No space left on device")
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_a_real_write_error_from_the_kernel(tmp_path, raw):
    """RLIMIT_FSIZE makes the kernel fail the writes (EFBIG) once a file passes 64 kB: the real
    write paths (Python's, numpy's and Arrow's), not a patched one."""
    out = tmp_path / "data"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    r = subprocess.run(
        [sys.executable, "-m", "masknet", "prepare", "--format", "criteo", "--input", str(raw["b"]), "--output", str(out)],
        capture_output=True, text=True, preexec_fn=limit, cwd=ROOT, timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert_one_line(r.stderr, str(out), "File too large")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_unwritable_output_is_one_line(tmp_path, capsys, raw):
    rc, err = run_prepare(capsys, "--input", str(raw["a"]), "--output", "/proc/nope")
    assert rc == 2
    assert_one_line(err, "/proc/nope")
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, err = run_prepare(capsys, "--input", str(raw["a"]), "--output", str(afile / "sub"))
    assert rc == 2
    assert_one_line(err, str(afile))


def test_truncated_gzip_smaller_than_a_block(tmp_path, capsys, dataset_a, raw):
    out, before = dataset_a
    whole = gzip.compress(raw["b"].read_bytes())
    src = tmp_path / "cut.txt.gz"
    src.write_bytes(whole[:3000])  # far less than the 4 MB read block
    rc, err = run_prepare(capsys, "--input", str(src), "--output", str(out), "--overwrite")
    assert rc == 2
    assert_one_line(err, str(src), "unreadable")
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------
# "Done when": SIGKILL at random points, and at each step of the swap


def _child(out: Path, src: Path, code: str = "") -> list[str]:
    main_call = f"from masknet.cli import main; sys.exit(main(['prepare', '--format', 'criteo', '--min-count', '1', '--input', {str(src)!r}, '--output', {str(out)!r}, '--overwrite']))"
    return [sys.executable, "-c", f"import sys\n{code}\n{main_call}"]


def _assert_old_or_new(out: Path, a: dict, b: dict) -> str:
    """After the next run's recovery, the output is exactly A or exactly B, and nothing is left over."""
    outmod.recover(out)
    assert leftovers(out.parent) == []
    got = snapshot(out)
    assert got in (a, b), sorted(got)
    return "old" if got == a else "new"


@pytest.fixture(scope="module")
def crash_setup(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    """A (the existing dataset, saved as a pristine copy) and B (what a finished run writes) from
    two generated files; B's input is big enough that a run lasts a while."""
    d = tmp_path_factory.mktemp("crash")
    src_a, src_b = write_criteo(d / "a.txt", 400, seed=1), write_criteo(d / "b.txt", 40_000, seed=2)
    spec = builtin_spec("criteo").with_min_count(1)
    prepare(spec, d / "a", input=src_a)
    prepare(spec, d / "b", input=src_b)
    return d / "a", src_b, snapshot(d / "a"), snapshot(d / "b")


def _fresh_a(work: Path, pristine: Path) -> Path:
    import shutil

    out = work / "data"
    shutil.copytree(pristine, out)
    return out


def _start_and_wait_for_build(work: Path, src: Path) -> tuple[Path, subprocess.Popen]:
    out = work / "data"
    proc = subprocess.Popen(_child(out, src), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(work.glob(f"{outmod.TMP_PREFIX}*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    return out, proc


def test_sigkill_at_random_points_never_loses_both(tmp_path, crash_setup):
    pristine, src_b, a, b = crash_setup
    _fresh_a(tmp_path / "timing", pristine)
    t = time.monotonic()
    out, proc = _start_and_wait_for_build(tmp_path / "timing", src_b)  # one whole run: how long a build lasts
    t_build = time.monotonic()
    proc.wait()
    build_s = time.monotonic() - t_build
    assert _assert_old_or_new(out, a, b) == "new" and t_build > t
    rng = random.Random(14)
    outcomes = []
    for i in range(6):
        out = _fresh_a(tmp_path / str(i), pristine)
        out, proc = _start_and_wait_for_build(tmp_path / str(i), src_b)
        time.sleep(rng.uniform(0, 1.1 * build_s))  # somewhere in the build, or just after it
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # even before recovery, an output that exists is one of the two, never a mixture
            assert snapshot(out) in (a, b) or (out / outmod.BUILD_MARK).exists()
        outcomes.append(_assert_old_or_new(out, a, b))
    assert "old" in outcomes  # the kills did land inside the build


@pytest.mark.parametrize(
    "when, hook, nth, expect",
    [
        ("before", "os.rename", 1, "old"),  # swap step 1: nothing moved yet
        ("before", "os.rename", 2, "old"),  # the old dataset renamed away, the new one not yet in
        ("after", "os.rename", 2, "new"),  # the new one in, the old copy not yet deleted
        ("after", "shutil.rmtree", 1, "new"),  # the old copy deleted, the new one's mark not yet
    ],
)
def test_sigkill_at_each_step_of_the_swap(tmp_path, crash_setup, when, hook, nth, expect):
    pristine, src_b, a, b = crash_setup
    out = _fresh_a(tmp_path, pristine)
    code = f"""
import os, shutil, signal
import masknet.data.output as m
real = {hook}
calls = [0]
def hooked(*args, **kwargs):
    if '{hook}' == 'shutil.rmtree' and '{outmod.OLD_PREFIX}' not in str(args[0]):
        return real(*args, **kwargs)
    calls[0] += 1
    if {when == 'before'} and calls[0] == {nth}:
        os.kill(os.getpid(), signal.SIGKILL)
    result = real(*args, **kwargs)
    if {when == 'after'} and calls[0] == {nth}:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
{hook} = hooked
"""
    r = subprocess.run(_child(out, src_b, code), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert _assert_old_or_new(out, a, b) == expect


# ---------------------------------------------------------------------------
# Review of issue 14, item 1: --overwrite deletes only the files a prepare wrote (exact names)


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("name, kind", [
    ("train.notes.bin", "file"),  # looks like an array file: the old pattern took it
    ("train.x.orig.bin", "file"),  # a backup
    ("valid.p.bin", "file"),  # an array name, but this dataset has no probabilities
    (".prepare-tmp", "folder"),  # the old in-place spill folder's name, holding the user's work
    (".masknet-build", "folder"),  # the swap mark's name, as a folder
])
def test_overwrite_refuses_user_files_that_only_look_like_dataset_files(tmp_path, capsys, dataset_a, raw, name, kind, overwrite):
    out, _ = dataset_a
    if kind == "file":
        (out / name).write_text("mine")
    else:
        (out / name).mkdir()
        (out / name / "mywork.txt").write_text("mine")
    before = snapshot_tree(out)
    rc, err = run_prepare(capsys, "--input", str(raw["b"]), "--output", str(out), *(["--overwrite"] if overwrite else []))
    assert rc == 2
    assert_one_line(err, str(out), repr(name), "not a prepared dataset")
    assert snapshot_tree(out) == before


def test_an_array_name_that_is_a_link_or_folder_is_not_ours(tmp_path, capsys, dataset_a, raw):
    out, _ = dataset_a
    mine = tmp_path / "mine.bin"
    mine.write_text("mine")
    (out / "encoder.json").unlink()
    (out / "encoder.json").symlink_to(mine)
    rc, err = run_prepare(capsys, "--input", str(raw["b"]), "--output", str(out), "--overwrite")
    assert rc == 2
    assert_one_line(err, "'encoder.json'")
    assert mine.read_text() == "mine" and (out / "encoder.json").is_symlink()


def test_a_build_folder_whose_mark_is_not_its_own_is_kept(tmp_path, capsys, raw):
    other = tmp_path / f"{outmod.TMP_PREFIX}data-123-abcd"  # our name, but the mark names another build
    other.mkdir()
    (other / outmod.BUILD_MARK).write_text("999-ffff")
    (other / "mywork.txt").write_text("mine")
    named = tmp_path / f"{outmod.TMP_PREFIX}mywork"  # our prefix, not our name pattern, with a mark file
    named.mkdir()
    (named / outmod.BUILD_MARK).write_text("x")
    assert run_prepare(capsys, "--input", str(raw["a"]), "--output", str(tmp_path / "data"))[0] == 0
    assert (other / "mywork.txt").read_text() == "mine" and named.is_dir()


def snapshot_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}
