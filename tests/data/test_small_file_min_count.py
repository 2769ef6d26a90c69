"""The small-file min count (issue 16): a Criteo file with fewer than SMALL_FILE_TRAIN_ROWS train rows
is prepared with min count 30 instead of the format's 10, unless --min-count says otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import masknet.data.schema as schema
from masknet.cli import main
from masknet.data.dataset import load_prepared
from masknet.data.encoder import Encoder
from masknet.data.prepare import prepare
from masknet.data.formats import builtin_spec

ROWS = 400  # all train (explicit files): C1 = "a" 200 times, "b" 20 times (kept at 10, not at 30), then 180 singletons


def criteo_rows(path: Path) -> Path:
    lines = []
    for i in range(ROWS):
        c1 = "a" if i < 200 else "b" if i < 220 else f"u{i}"
        ints = [str(i % 7)] + [""] * 12
        cats = [c1] + ["x"] * 25
        lines.append("\t".join([str(i % 2)] + ints + cats))
    path.write_text("\n".join(lines) + "\n")
    return path


def c1_vocab(out: Path) -> list:
    enc = Encoder.load(out / "encoder.json")
    return next(f for f in enc.fields if f.spec.name == "C1").vocab.to_pylist()


def prepare_small(tmp_path: Path, spec, name: str) -> Path:
    f = criteo_rows(tmp_path / "rows.txt")
    out = tmp_path / name
    prepare(spec, out, train=f, valid=f, test=f)
    return out


def test_small_criteo_file_gets_min_count_30(tmp_path):
    out = prepare_small(tmp_path, builtin_spec("criteo"), "small")
    assert c1_vocab(out) == ["a"]  # "b" (20 times) is out of vocabulary at 30
    meta = load_prepared(out).meta
    assert all(f["min_count"] == 30 for f in meta["stats"]["fields"])


def test_explicit_min_count_wins_on_a_small_file(tmp_path):
    out = prepare_small(tmp_path, builtin_spec("criteo").with_min_count(10), "explicit")
    assert c1_vocab(out) == ["a", "b"]
    assert all(f["min_count"] == 10 for f in load_prepared(out).meta["stats"]["fields"])


def test_large_file_keeps_the_format_default(tmp_path, monkeypatch):
    monkeypatch.setattr(schema, "SMALL_FILE_TRAIN_ROWS", ROWS)  # this file now counts as large
    out = prepare_small(tmp_path, builtin_spec("criteo"), "large")
    assert c1_vocab(out) == ["a", "b"]
    assert all(f["min_count"] == 10 for f in load_prepared(out).meta["stats"]["fields"])


def test_rule_is_for_criteo_formats_only():
    assert builtin_spec("criteo-csv").small_file_min_count == 30
    for name in ("frappe", "avazu", "malware"):
        assert builtin_spec(name).small_file_min_count is None
    spec = builtin_spec("frappe")
    assert spec.for_train_rows(10) is None
    assert {f.min_count for f in spec.fields} == {1}


def test_cli_says_which_min_count_it_used(tmp_path, capsys):
    f = criteo_rows(tmp_path / "rows.txt")
    code = main(["prepare", "--format", "criteo", "--train", str(f), "--valid", str(f), "--test", str(f),
                 "--output", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "min count 30 for every field: a small file (400 train rows, under 100,000)" in err
    code = main(["prepare", "--format", "criteo", "--min-count", "10", "--train", str(f), "--valid", str(f),
                 "--test", str(f), "--output", str(tmp_path / "cli10")])
    assert code == 0
    assert "min count 30" not in capsys.readouterr().err
    assert np.asarray(load_prepared(tmp_path / "cli10").splits["train"].x)[:, 13].max() == 3  # a, b after missing/OOV
