"""Hostile and broken input (property-based): every reader either prepares the data correctly or
stops with a one-line error (exit 2) naming the file; never a traceback, hang or silent mis-parse.

Inputs: valid Criteo / Avazu / libFM lines mutated with random bytes, truncation, enormous
fields, invalid UTF-8, NUL bytes, extreme numbers (1e308, -0, NaN, inf as text), extra or
missing separators. Invariants checked on success: every input line is accounted for (kept, or
skipped and counted with --bad-lines skip), and every index is inside its field's cardinality.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masknet.cli import main
from masknet.data.dataset import load_prepared

HOSTILE = [
    b"1e308", b"-1e308", b"-0", b"NaN", b"nan", b"inf", b"-inf", b"Infinity", b"\x00", b"\xff\xfe",
    b"\xc3\x28", b"A" * 100_000, b"9" * 400, b"0x1F", b" ", b'"', b"'", b"\\", b"1,5", b"\t", b"\r", b"",
]
settings.register_profile("hostile", max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SETTINGS = settings.get_profile("hostile")


def criteo_line(rng: np.random.Generator, i: int = 0) -> list[bytes]:
    label = [str(rng.integers(0, 2)).encode()]
    ints = [b"" if rng.random() < 0.2 else str(int(rng.integers(-3, 5000))).encode() for _ in range(13)]
    cats = [b"" if rng.random() < 0.1 else f"{int(rng.integers(0, 16**8)):08x}".encode() for _ in range(26)]
    return label + ints + cats


def avazu_line(rng: np.random.Generator, i: int) -> list[bytes]:
    hour = f"1410{21 + i % 9:02d}{i % 24:02d}".encode()
    rest = [f"{int(rng.integers(0, 50)):x}".encode() for _ in range(21)]
    return [str(i).encode(), str(rng.integers(0, 2)).encode(), hour] + rest


def frappe_line(rng: np.random.Generator, i: int) -> list[bytes]:
    label = b"1" if rng.random() < 0.33 else b"-1"
    return [label] + [f"{f * 100 + int(rng.integers(0, 20))}:1".encode() for f in range(10)]


def mutate(fields: list[bytes], sep: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["token", "token", "truncate", "bytes", "extra_sep", "drop_field", "keep"]))
    if kind == "token":
        i = draw(st.integers(0, len(fields) - 1))
        fields = fields[:i] + [draw(st.sampled_from(HOSTILE))] + fields[i + 1 :]
    elif kind == "drop_field":
        i = draw(st.integers(0, len(fields) - 1))
        fields = fields[:i] + fields[i + 1 :]
    line = sep.join(fields)
    if kind == "truncate":
        line = line[: draw(st.integers(0, max(0, len(line) - 1)))]
    elif kind == "bytes":
        line = draw(st.binary(min_size=0, max_size=60))
    elif kind == "extra_sep":
        line = line + sep
    return line.replace(b"\n", b" ")


def run_prepare(fmt: str, content: bytes, bad_lines: str, header: bytes = b"") -> tuple[int, str, Path, int]:
    work = Path(tempfile.mkdtemp())
    try:
        src = work / "input.txt"
        src.write_bytes(header + content)
        out = work / "prepared"
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["prepare", "--format", fmt, "--input", str(src), "--output", str(out), "--bad-lines", bad_lines])
        lines = content.count(b"\n")
        return rc, err.getvalue(), out, lines
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def check_outcome(rc: int, err: str, out: Path, lines: int, bad_lines: str) -> None:
    try:
        assert rc in (0, 2), f"exit code {rc}: {err}"
        assert "Traceback" not in err
        if rc == 2:
            text = err.strip()
            assert text and "\n" not in text, f"not one line: {err!r}"
            assert "error" in text
            assert not (out / "meta.json").exists(), "a failed prepare left a dataset that looks complete"
            return
        meta = json.loads((out / "meta.json").read_text())
        kept = sum(s["rows"] for s in meta["splits"].values())
        skipped = meta["stats"].get("bad_lines", {}).get("total", 0) if isinstance(meta["stats"].get("bad_lines"), dict) else 0
        if bad_lines == "error":
            assert kept == lines, f"{lines} lines in, {kept} rows out, and no error"
        else:
            assert kept + skipped == lines, f"{lines} lines: {kept} kept + {skipped} skipped"
        ds = load_prepared(out)
        for split in ds.splits.values():
            if len(split):
                x = np.asarray(split.x)
                assert (x >= 0).all() and (x < np.asarray(ds.cardinalities)).all()
                assert set(np.unique(np.asarray(split.y))) <= {0, 1}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


@st.composite
def files(draw, make_line, sep: bytes):
    """1-30 valid lines of a format, up to 3 of them mutated into hostile ones."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(1, 30))
    bad = set(draw(st.lists(st.integers(0, n - 1), max_size=3)))
    rows = [mutate(make_line(rng, i), sep, draw) if i in bad else sep.join(make_line(rng, i)) for i in range(n)]
    return b"\n".join(rows) + b"\n"


AVAZU_HEADER = (
    b"id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
    b"device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21\n"
)


@SETTINGS
@given(content=files(criteo_line, b"\t"), bad_lines=st.sampled_from(["error", "skip"]))
def test_criteo_reader_never_crashes_or_misparses(content, bad_lines):
    check_outcome(*run_prepare("criteo", content, bad_lines), bad_lines)


@SETTINGS
@given(content=files(avazu_line, b","), bad_lines=st.sampled_from(["error", "skip"]))
def test_avazu_reader_never_crashes_or_misparses(content, bad_lines):
    check_outcome(*run_prepare("avazu", content, bad_lines, header=AVAZU_HEADER), bad_lines)


@SETTINGS
@given(content=files(frappe_line, b" "), bad_lines=st.sampled_from(["error", "skip"]))
def test_libfm_reader_never_crashes_or_misparses(content, bad_lines):
    check_outcome(*run_prepare("frappe", content, bad_lines), bad_lines)


@SETTINGS
@given(content=st.binary(min_size=0, max_size=400), fmt=st.sampled_from(["criteo", "criteo-csv", "avazu", "malware", "frappe"]))
def test_random_bytes_in_any_format(content, fmt):
    rc, err, out, _ = run_prepare(fmt, content, "error")
    try:
        assert rc in (0, 2) and "Traceback" not in err
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def test_extreme_numbers_have_documented_handling(tmp_path):
    """1e308 and -0 are plain decimals (bucketed); NaN and inf are bad lines, never missing values."""
    rng = np.random.default_rng(0)
    base = criteo_line(rng)
    good = []
    for token in (b"1e308", b"-0"):
        line = list(base)
        line[1] = token
        good.append(b"\t".join(line))
    rc, err, out, lines = run_prepare("criteo", b"\n".join(good) + b"\n", "error")
    check_outcome(rc, err, out, lines, "error")
    assert rc == 0, err
    for token in (b"nan", b"inf", b"NaN", b"-inf"):
        line = list(base)
        line[1] = token
        rc, err, out, _ = run_prepare("criteo", b"\t".join(line) + b"\n", "error")
        shutil.rmtree(out.parent, ignore_errors=True)
        assert rc == 2 and "line 1" in err and "I1" in err, (token, err)
