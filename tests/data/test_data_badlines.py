"""Bad input: every kind stops the run (exit 2, file + line + field named) or is skipped and counted."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from masknet.cli import main
from masknet.data.dataset import load_prepared
from masknet.data.rawgen import write_criteo
from masknet.errors import DataError

ROWS = 300


@pytest.fixture(scope="module")
def criteo_lines(tmp_path_factory) -> list[str]:
    path = write_criteo(tmp_path_factory.mktemp("raw") / "train.txt", ROWS, seed=3)
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _prepare(capsys, *args) -> tuple[int, str, str]:
    code = main(["prepare", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _with_bad(lines: list[str], line_no: int, new: str) -> list[str]:
    """Replace 1-based line `line_no`."""
    out = list(lines)
    out[line_no - 1] = new
    return out


def _set_field(line: str, i: int, value: str) -> str:
    parts = line.split("\t")
    parts[i] = value
    return "\t".join(parts)


BAD_CASES = {
    # name: (line builder, expected message parts)
    "wrong_columns": (lambda l: "\t".join(l.split("\t")[:-1]), ["line 57", "wrong number of columns: expected 40, found 39"]),
    "too_many_columns": (lambda l: l + "\textra", ["line 57", "expected 40, found 41"]),
    "bad_number": (lambda l: _set_field(l, 5, "12x"), ["line 57", "field 'I5'", "not a number: '12x'"]),
    "nan_number": (lambda l: _set_field(l, 2, "nan"), ["line 57", "field 'I2'", "not a number: 'nan'"]),
    "bad_label": (lambda l: _set_field(l, 0, "2"), ["line 57", "field 'label'", "must be 0 or 1: '2'"]),
    "missing_label": (lambda l: _set_field(l, 0, ""), ["line 57", "field 'label'", "label is missing"]),
    "empty_line": (lambda l: "", ["line 57", "empty line"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_line_stops_with_file_line_field(tmp_path, capsys, criteo_lines, case):
    build, expected = BAD_CASES[case]
    src = _write(tmp_path / "in.txt", _with_bad(criteo_lines, 57, build(criteo_lines[56])))
    code, out, err = _prepare(capsys, "--format", "criteo", "--input", str(src), "--output", str(tmp_path / "out"))
    assert code == 2
    assert err.startswith("masknet prepare: error: ")
    assert len(err.strip().splitlines()) == 1
    assert str(src) in err
    for part in expected:
        assert part in err, (part, err)
    assert "--bad-lines skip" in err
    assert not (tmp_path / "out" / "meta.json").exists()  # nothing half-written looks complete
    assert not list((tmp_path / "out").glob("*.bin"))


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_line_skipped_counted_reported(tmp_path, capsys, criteo_lines, case):
    build, expected = BAD_CASES[case]
    lines = _with_bad(criteo_lines, 57, build(criteo_lines[56]))
    lines = _with_bad(lines, 200, build(criteo_lines[199]))
    src = _write(tmp_path / "in.txt", lines)
    out_dir = tmp_path / "out"
    code, out, err = _prepare(
        capsys, "--format", "criteo", "--input", str(src), "--output", str(out_dir), "--bad-lines", "skip"
    )
    assert code == 0, err
    assert "skipped 2 bad lines" in out
    assert "line 57" in out or ":57:" in out
    ds = load_prepared(out_dir)
    assert sum(len(s) for s in ds.splits.values()) == ROWS - 2
    bad = ds.meta["stats"]["bad_lines"]
    assert bad["total"] == 2 and bad["mode"] == "skip"
    assert [e["line"] for e in bad["examples"]] == [57, 200]
    assert bad["by_file"] == {str(src): 2}


def test_skip_keeps_the_other_rows_exactly(tmp_path, capsys, criteo_lines):
    """Skipping a wrong-column line (single-threaded re-read) must not shift the split of other rows."""
    clean = _write(tmp_path / "clean.txt", criteo_lines)
    bad = _write(tmp_path / "bad.txt", criteo_lines[:100] + ["1\t2\t3"] + criteo_lines[100:])
    assert _prepare(capsys, "--format", "criteo", "--input", str(clean), "--output", str(tmp_path / "a"), "--min-count", "1")[0] == 0
    code, out, err = _prepare(
        capsys, "--format", "criteo", "--input", str(bad), "--output", str(tmp_path / "b"), "--bad-lines", "skip", "--min-count", "1"
    )
    assert code == 0, err
    a, b = load_prepared(tmp_path / "a"), load_prepared(tmp_path / "b")
    assert b.meta["stats"]["bad_lines"]["examples"][0]["line"] == 101
    assert b.meta["stats"]["single_threaded_parse"] is True
    # rows after the bad line keep their data-row index shifted by one, so splits may differ;
    # but the total is the same and every clean row is present exactly once.
    assert sum(len(s) for s in a.splits.values()) == sum(len(s) for s in b.splits.values())


def test_bad_line_in_explicit_valid_file_names_that_file(tmp_path, capsys, criteo_lines):
    tr = _write(tmp_path / "tr.txt", criteo_lines[:200])
    va = _write(tmp_path / "va.txt", _with_bad(criteo_lines[200:250], 7, _set_field(criteo_lines[206], 13, "-")))
    te = _write(tmp_path / "te.txt", criteo_lines[250:])
    code, _, err = _prepare(
        capsys, "--format", "criteo", "--train", str(tr), "--valid", str(va), "--test", str(te), "--output", str(tmp_path / "o")
    )
    assert code == 2
    assert f"{va}: line 7: field 'I13': not a number: '-'" in err


def test_empty_file(tmp_path, capsys):
    src = tmp_path / "empty.txt"
    src.write_bytes(b"")
    code, _, err = _prepare(capsys, "--format", "criteo", "--input", str(src), "--output", str(tmp_path / "o"))
    assert code == 2 and f"{src}: empty file" in err


def test_empty_gzip_file(tmp_path, capsys):
    src = tmp_path / "empty.txt.gz"
    with gzip.open(src, "wb"):
        pass
    code, _, err = _prepare(capsys, "--format", "criteo", "--input", str(src), "--output", str(tmp_path / "o"))
    assert code == 2 and "empty file" in err


def test_header_only_file_has_no_rows(tmp_path, capsys):
    src = tmp_path / "h.csv"
    src.write_text("label," + ",".join(f"I{i}" for i in range(1, 14)) + "," + ",".join(f"C{i}" for i in range(1, 27)) + "\n")
    code, _, err = _prepare(capsys, "--format", "criteo-csv", "--input", str(src), "--output", str(tmp_path / "o"))
    assert code == 2 and "no data rows" in err


def test_missing_file(tmp_path, capsys):
    code, _, err = _prepare(capsys, "--format", "criteo", "--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "o"))
    assert code == 2 and "file not found" in err


def test_missing_header_column(tmp_path, capsys):
    src = tmp_path / "av.csv"
    src.write_text("id,hour,C1\n1,14102100,5\n")
    code, _, err = _prepare(capsys, "--format", "avazu", "--input", str(src), "--output", str(tmp_path / "o"))
    assert code == 2
    assert f"{src}: line 1: the header lacks column 'click'" in err


def test_unknown_column_in_schema(tmp_path, capsys):
    src = tmp_path / "log.csv"
    src.write_text("y,a,b\n0,x,1\n1,y,2\n")
    schema = tmp_path / "schema.yaml"
    schema.write_text("label: y\ncategorical: [a, zz]\nnumeric: [b]\n")
    code, _, err = _prepare(capsys, "--format", f"schema:{schema}", "--input", str(src), "--output", str(tmp_path / "o"))
    assert code == 2
    assert "'zz'" in err and str(schema) in err and str(src) in err


def test_unknown_schema_key(tmp_path, capsys):
    schema = tmp_path / "schema.yaml"
    schema.write_text("label: y\ncategorical: [a]\nlables: [x]\n")
    code, _, err = _prepare(capsys, "--format", f"schema:{schema}", "--input", str(schema), "--output", str(tmp_path / "o"))
    assert code == 2 and "unknown schema key 'lables'" in err


def test_avazu_bad_hour_and_frappe_bad_feature(tmp_path, capsys):
    av = tmp_path / "av.csv"
    cols = "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21"
    row = "1,0,{h},1005,0,a,b,c,d,e,f,g,h,i,1,2,15706,320,50,1722,0,35,-1,79"
    av.write_text(cols + "\n" + "\n".join(row.format(h=h) for h in ["14102100", "14102101", "14023099", "14102102"]) + "\n")
    code, _, err = _prepare(capsys, "--format", "avazu", "--input", str(av), "--output", str(tmp_path / "o"))
    assert code == 2 and f"{av}: line 4: field 'hour': not a YYMMDDHH hour: '14023099'" in err

    fr = tmp_path / "f.libfm"
    good = "1 204:1 4798:1 5041:1 5046:1 5053:1 5055:1 5058:1 5060:1 5073:1 5183:1"
    fr.write_text("\n".join([good, good.replace("5058:1", "5058:0.5"), good]) + "\n")
    code, _, err = _prepare(capsys, "--format", "frappe", "--input", str(fr), "--output", str(tmp_path / "o2"))
    assert code == 2 and f"{fr}: line 2: field 'cost': expected a libFM feature index:1: '5058:0.5'" in err
    fr.write_text("\n".join([good, good.replace("1 204", "2 204", 1)]) + "\n")
    code, _, err = _prepare(capsys, "--format", "frappe", "--input", str(fr), "--output", str(tmp_path / "o3"))
    assert code == 2 and "line 2: field 'label': the label must be -1 or 1: '2'" in err


def test_csv_quoted_bad_number_and_parquet_row_numbers(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    schema = tmp_path / "s.yaml"
    schema.write_text("label: y\ncategorical: [a]\nnumeric: [b]\n")
    pq.write_table(pa.table({"y": [0, 1, 1, 0], "a": ["x", "y", None, "x"], "b": ["1", "2", "three", "4"]}), tmp_path / "d.parquet")
    code, _, err = _prepare(capsys, "--format", f"schema:{schema}", "--input", str(tmp_path / "d.parquet"), "--output", str(tmp_path / "o"))
    assert code == 2 and "d.parquet: row 3: field 'b': not a number: 'three'" in err


def test_conflicting_options(tmp_path, capsys):
    code, _, err = _prepare(capsys, "--format", "criteo", "--input", "a", "--train", "b", "--output", str(tmp_path / "o"))
    assert code == 2 and "not both" in err
    code, _, err = _prepare(capsys, "--format", "nope", "--input", "a", "--output", str(tmp_path / "o"))
    assert code == 2 and "unknown format" in err
    code, _, err = _prepare(capsys, "--format", "criteo", "--input", "a", "--output", str(tmp_path / "o"), "--min-count", "0")
    assert code == 2 and "--min-count" in err


def test_refuses_to_overwrite_a_foreign_folder(tmp_path, capsys, criteo_lines):
    src = _write(tmp_path / "in.txt", criteo_lines)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = _prepare(capsys, "--format", "criteo", "--input", str(src), "--output", str(out))
    assert code == 2 and "not a prepared dataset" in err
    assert (out / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------
# Text that is not UTF-8: reported with line and field, skippable, never a traceback


def _bytes_file(path: Path, lines: list[str], bad: dict[int, bytes]) -> Path:
    """Write `lines`, replacing 1-based line numbers in `bad` by raw bytes."""
    out = [bad.get(i + 1, ln.encode()) for i, ln in enumerate(lines)]
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


def _undecodable_value(line: str, field: int) -> bytes:
    parts = line.encode().split(b"\t")
    parts[field] = b"ab\xff\xfecd"
    return b"\t".join(parts)


def test_value_not_utf8_names_line_and_field(tmp_path, capsys, criteo_lines):
    path = _bytes_file(tmp_path / "t.txt", criteo_lines, {57: _undecodable_value(criteo_lines[56], 20)})
    code, _, err = _prepare(capsys, "--format", "criteo", "--input", str(path), "--output", str(tmp_path / "o"))
    assert code == 2
    assert "line 57" in err and "field 'C7'" in err and "not UTF-8" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_wrong_width_line_not_utf8_names_the_line_without_traceback(tmp_path, capsys, criteo_lines):
    # pyarrow cannot hand such a line to its invalid-row handler; the reader re-reads it
    path = _bytes_file(tmp_path / "t.txt", criteo_lines, {57: b"1\t\xff\xfe\t3"})
    code, _, err = _prepare(capsys, "--format", "criteo", "--input", str(path), "--output", str(tmp_path / "o"))
    assert code == 2
    assert "line 57" in err and "wrong number of columns: expected 40, found 3" in err
    assert "Traceback" not in err and "Exception ignored" not in err


def test_not_utf8_lines_skipped_exactly_across_blocks(tmp_path, capsys, criteo_lines):
    """Skip mode, a small block size so the re-read starts after chunks were already used: every
    good row is kept exactly once, the three bad lines are counted with their numbers."""
    from masknet.data.prepare import prepare
    from masknet.data.formats import builtin_spec

    bad = {40: _undecodable_value(criteo_lines[39], 30), 200: b"0\t\xc3\x28", 250: _undecodable_value(criteo_lines[249], 1)}
    path = _bytes_file(tmp_path / "t.txt", criteo_lines, bad)
    clean = _write(tmp_path / "clean.txt", [ln for i, ln in enumerate(criteo_lines) if i + 1 not in bad])
    spec = builtin_spec("criteo")
    small = _write(tmp_path / "small.txt", criteo_lines[:50])
    stats = prepare(spec, tmp_path / "o", train=path, valid=small, test=small, bad_lines="skip", block_bytes=4096)
    prepare(spec, tmp_path / "r", train=clean, valid=small, test=small, block_bytes=4096)
    assert stats["rows"]["train"] == ROWS - 3
    examples = stats["bad_lines"]["examples"]
    assert [(e["line"], e["kind"]) for e in examples] == [(40, "bad_text"), (200, "wrong_columns"), (250, "bad_text")]
    assert [e["field"] for e in examples] == ["C17", None, "I1"]
    got, want = load_prepared(tmp_path / "o").splits["train"], load_prepared(tmp_path / "r").splits["train"]
    np.testing.assert_array_equal(np.asarray(got.x), np.asarray(want.x))
    np.testing.assert_array_equal(np.asarray(got.y), np.asarray(want.y))


def test_read_ahead_passes_errors_and_stops_when_abandoned():
    """The CSV read-ahead thread: results in order, the reader's error raised in the consumer,
    and a consumer that stops early does not leave the thread running."""
    import threading

    from masknet.data.readers import _read_ahead

    def source(items):
        it = iter(items)

        def read_next():
            item = next(it)
            if isinstance(item, Exception):
                raise item
            return item

        return read_next

    assert list(_read_ahead(source([1, 2, 3]))) == [1, 2, 3]
    gen = _read_ahead(source([1, ValueError("block 2 is broken"), 3]))
    assert next(gen) == 1
    with pytest.raises(ValueError, match="block 2"):
        next(gen)
    before = threading.active_count()
    gen = _read_ahead(source(list(range(1000))), depth=2)
    assert next(gen) == 0
    gen.close()  # abandoned with the queue full
    assert threading.active_count() <= before
    assert not any(t.name == "masknet-csv-read-ahead" for t in threading.enumerate())


# ---------------------------------------------------------------------------
# Long lines (issue 14, item 13): Arrow parses lines up to its block size; a longer one makes the
# reader start again with a block that fits it, up to readers.MAX_BLOCK_BYTES, beyond which the
# line is refused by number.


def test_a_10_mb_field_is_read(tmp_path, capsys, criteo_lines):
    """Before: "straddling object straddles two block boundaries (try to increase block size?)",
    no line number, at the default 4 MB block."""
    long_value = "ab" * (5 << 20)  # 10 MiB
    lines = _with_bad(criteo_lines, 57, _set_field(criteo_lines[56], 20, long_value))
    src = _write(tmp_path / "in.txt", lines)
    out = tmp_path / "out"
    code, _, err = _prepare(capsys, "--format", "criteo", "--train", str(src), "--valid", str(src), "--test", str(src),
                            "--output", str(out), "--min-count", "1")
    assert code == 0, err
    ds = load_prepared(out)
    assert len(ds.splits["train"]) == ROWS
    enc = json.loads((out / "encoder.json").read_text())
    c7 = next(f for f in enc["fields"] if f["name"] == "C7")
    assert long_value in c7["vocab"]


def test_lines_grow_the_block_and_one_over_the_cap_is_refused_by_number(tmp_path, criteo_lines, monkeypatch):
    from masknet.data import readers
    from masknet.data.prepare import prepare
    from masknet.data.formats import builtin_spec

    monkeypatch.setattr(readers, "MAX_BLOCK_BYTES", 256 << 10)
    spec = builtin_spec("criteo").with_min_count(1)
    lines = list(criteo_lines)
    lines[99] = _set_field(lines[99], 30, "x" * (20 << 10))  # 5x the 4 kB block: grows it
    lines[199] = _set_field(lines[199], 31, "y" * (100 << 10))  # grows it again, to 128 kB
    src = _write(tmp_path / "in.txt", lines)
    stats = prepare(spec, tmp_path / "o", input=src, block_bytes=4096)
    assert sum(stats["rows"].values()) == ROWS  # every row once, though the file was read three times
    ref = _write(tmp_path / "short.txt", [ln if i not in (99, 199) else criteo_lines[i] for i, ln in enumerate(lines)])
    prepare(spec, tmp_path / "r", input=ref, block_bytes=4096)
    got, want = load_prepared(tmp_path / "o"), load_prepared(tmp_path / "r")
    for s in ("train", "valid", "test"):  # same rows in the same order (only fields 30/31 of two rows differ)
        np.testing.assert_array_equal(np.asarray(got.splits[s].y), np.asarray(want.splits[s].y))
        np.testing.assert_array_equal(np.asarray(got.splits[s].x)[:, :29], np.asarray(want.splits[s].x)[:, :29])

    lines[249] = _set_field(lines[249], 32, "z" * (300 << 10))  # over the (patched) cap
    src = _write(tmp_path / "in2.txt", lines)
    with pytest.raises(DataError, match=r"in2\.txt: line 250: 307,[0-9]{3} bytes long; the longest line masknet reads is 262,144"):
        prepare(spec, tmp_path / "o2", input=src, block_bytes=4096)
    assert not (tmp_path / "o2").exists()


def test_find_long_line_counts_lines_across_reads(tmp_path):
    from masknet.data.readers import find_long_line

    path = tmp_path / "f.txt"
    path.write_bytes(b"a\n" * 10 + b"b" * 50 + b"\n" + b"c\n")
    assert find_long_line(path, 50) == (11, 51)
    assert find_long_line(path, 51) is None
    path.write_bytes(b"a\n" + b"b" * 50)  # last line without a newline
    assert find_long_line(path, 10) == (2, 50)
    gz = tmp_path / "f.txt.gz"
    gz.write_bytes(gzip.compress(b"x\n" * 3 + b"y" * 40 + b"\n"))
    assert find_long_line(gz, 20) == (4, 41)


# ---------------------------------------------------------------------------
# The header line (review of issue 14, item 13): linear-time, capped like data lines, one-line errors


def _avazu_file(path: Path, header: str) -> Path:
    path.write_text(header + "\n" + "\n".join(f"{i},{i % 2},14102100,1005,0" for i in range(50)) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["avazu", "criteo-csv"])
def test_a_header_name_over_the_csv_field_limit_is_one_line(tmp_path, capsys, fmt):
    """Before: `_csv.Error: field larger than field limit (131072)` traceback."""
    src = _avazu_file(tmp_path / "in.csv", "id,click," + "n" * 200_000 + ",x")
    code, _, err = _prepare(capsys, "--format", fmt, "--input", str(src), "--output", str(tmp_path / "o"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{src}: line 1: the header cannot be read: field larger than field limit" in err


def test_a_header_over_the_line_cap_is_refused_after_reading_just_past_it(tmp_path, monkeypatch):
    """Before: `first_line` grew its buffer with `buf += part` (a 100 MB header took 94 s and
    762 MB) and read the whole line whatever its length; the line cap did not apply to it."""
    from masknet.data import readers
    from masknet.data.prepare import prepare
    from masknet.data.formats import builtin_spec

    monkeypatch.setattr(readers, "MAX_BLOCK_BYTES", 256 << 10)
    src = tmp_path / "in.csv"
    src.write_bytes(b"id,click," + b"n" * (3 << 20))  # 3 MB, no newline
    read = [0]
    real_open = readers.open_stream

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            data = self.fh.read(n)
            read[0] += len(data)
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(readers, "open_stream", lambda path: Counting(real_open(path)))
    with pytest.raises(DataError, match=r"in\.csv: line 1: the header is over 262,144 bytes long; the longest line masknet reads is 262,144"):
        prepare(builtin_spec("avazu"), tmp_path / "o", input=src)
    assert read[0] <= (256 << 10) + (1 << 20)  # read up to the cap, plus one read block; not the 3 MB
    # a header just under the cap is read
    header = "id,click,hour,C1," + "n" * ((256 << 10) - 100)
    assert readers.first_line(_avazu_file(tmp_path / "ok.csv", header)) == header.encode()
