"""A prepared dataset whose arrays are not what prepare wrote is refused when opened (issue 14, item 6).

Before: an index of 2^30 or -5 written into train.x.bin reached the embedding lookup as an
IndexError traceback. Now `load_prepared` checks each field's range against its cardinality (and
against the range recorded in meta.json), and `verify=True` (what `masknet train` does) checks
every file's SHA-256.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from masknet.cli import main
from masknet.data.dataset import X_DTYPE, load_prepared
from masknet.data.prepare import prepare
from masknet.data.rawgen import write_criteo
from masknet.data.formats import builtin_spec
from masknet.data.synthetic import write_synthetic
from masknet.errors import DataError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("integrity")
    src = write_criteo(d / "raw.txt", 2000, seed=4)
    prepare(builtin_spec("criteo").with_min_count(2), d / "data", input=src)
    return d / "data"


@pytest.fixture()
def data(tmp_path, pristine) -> Path:
    out = tmp_path / "data"
    shutil.copytree(pristine, out)
    return out


def meta_of(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def poke(folder: Path, split: str, row: int, field: int, value: int) -> None:
    """Write one index into <split>.x.bin in place, as a disk error or a stray tool would."""
    f = len(meta_of(folder)["fields"])
    rows = meta_of(folder)["splits"][split]["rows"]
    x = np.memmap(folder / f"{split}.x.bin", dtype=X_DTYPE, mode="r+", shape=(rows, f))
    x[row, field] = value
    x.flush()
    del x


def test_prepare_records_ranges_and_checksums(data):
    meta = meta_of(data)
    ds = load_prepared(data)
    for s, split in ds.splits.items():
        x = np.asarray(split.x)
        assert meta["splits"][s]["x_min"] == x.min(axis=0).tolist()
        assert meta["splits"][s]["x_max"] == x.max(axis=0).tolist()
        assert all(m < c for m, c in zip(meta["splits"][s]["x_max"], ds.cardinalities))
    for name in ("train.x.bin", "train.y.bin", "valid.x.bin", "test.y.bin"):
        assert meta["files"][name]["bytes"] == (data / name).stat().st_size
        assert len(meta["files"][name]["sha256"]) == 64


@pytest.mark.parametrize("value", [2**30, -5])
def test_an_index_out_of_range_is_refused_naming_file_and_field(data, value):
    names = meta_of(data)["fields"]
    poke(data, "train", 17, 20, value)
    with pytest.raises(DataError) as exc:
        load_prepared(data)
    msg = str(exc.value)
    assert "train.x.bin" in msg and repr(names[20]["name"]) in msg and f"index {value} at row 17" in msg


@pytest.mark.parametrize("value", [2**30, -5])
def test_train_on_an_out_of_range_index_is_one_line_not_an_indexerror(tmp_path, capsys, data, value):
    poke(data, "valid", 3, 0, value)
    rc = main(["train", "--data", str(data), "--quiet", "--epochs", "1", "--output", str(tmp_path / "run"),
               "--set", "train.threads=1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "valid.x.bin" in lines[0] and "'I1'" in lines[0], err
    assert "Traceback" not in err and "IndexError" not in err


def test_a_label_other_than_0_or_1_is_refused(data):
    rows = meta_of(data)["splits"]["test"]["rows"]
    y = np.memmap(data / "test.y.bin", dtype=np.uint8, mode="r+", shape=(rows,))
    y[5] = 7
    y.flush()
    del y
    with pytest.raises(DataError, match=r"test\.y\.bin: row 5: label 7 is not 0 or 1"):
        load_prepared(data)


def test_an_in_range_change_of_the_recorded_range_is_refused(data):
    meta = meta_of(data)
    info, fields = meta["splits"]["test"], meta["fields"]
    j = next(j for j, fd in enumerate(fields) if info["x_max"][j] + 1 < fd["cardinality"])  # room above the range
    poke(data, "test", 0, j, info["x_max"][j] + 1)
    name = fields[j]["name"]
    with pytest.raises(DataError, match=rf"test\.x\.bin: field '{name}': its indices span .* but prepare wrote"):
        load_prepared(data)


def test_in_range_corruption_is_caught_by_the_checksum(data):
    """An index changed to another valid one, inside the recorded range: only the SHA-256 sees it."""
    meta = meta_of(data)
    ds = load_prepared(data)
    x = np.asarray(ds.splits["train"].x)
    j = 13
    row = int(np.flatnonzero(x[:, j] != meta["splits"]["train"]["x_min"][j])[0])
    new = meta["splits"]["train"]["x_min"][j]
    del ds, x
    poke(data, "train", row, j, new)
    load_prepared(data)  # the ranges still match
    with pytest.raises(DataError, match=r"train\.x\.bin: its SHA-256 differs from the one recorded in meta\.json"):
        load_prepared(data, verify=True)


def test_masknet_train_verifies_the_checksums(tmp_path, capsys, data):
    meta = meta_of(data)
    rows = meta["splits"]["test"]["rows"]
    y = np.memmap(data / "test.y.bin", dtype=np.uint8, mode="r+", shape=(rows,))
    y[0] = 1 - y[0]  # still a valid label: a silent change of the test AUC without the checksum
    y.flush()
    del y
    rc = main(["train", "--data", str(data), "--quiet", "--epochs", "1", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "test.y.bin" in err and "SHA-256" in err, err
    assert not (tmp_path / "run").exists()


def test_a_folder_from_before_these_checks_still_loads_and_is_still_range_checked(data):
    meta = meta_of(data)
    for info in meta["splits"].values():
        info.pop("x_min", None)
        info.pop("x_max", None)
    meta.pop("files")
    (data / "meta.json").write_text(json.dumps(meta))
    ds = load_prepared(data, verify=True)  # no checksums to verify: loads
    assert len(ds.splits["train"]) == meta["splits"]["train"]["rows"]
    poke(data, "test", 2, 5, 2**30)
    with pytest.raises(DataError, match=r"test\.x\.bin: field 'I6': index 1073741824 at row 2"):
        load_prepared(data)


def test_an_inconsistent_or_malformed_meta_is_a_dataerror(data):
    meta = meta_of(data)
    meta["splits"]["train"]["x_max"][3] = meta["fields"][3]["cardinality"]
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"meta\.json: splits\.train: field 'I4': recorded range"):
        load_prepared(data)
    del meta["fields"]
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"meta\.json: malformed"):
        load_prepared(data)
    (data / "meta.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"not a masknet prepared dataset"):
        load_prepared(data)


def test_generated_data_is_checked_too(tmp_path):
    write_synthetic(tmp_path / "syn", 1000, 3)
    meta = meta_of(tmp_path / "syn")
    assert "train.p.bin" in meta["files"] and "x_max" in meta["splits"]["train"]
    card = meta["fields"][2]["cardinality"]
    poke(tmp_path / "syn", "train", 0, 2, card)
    with pytest.raises(DataError, match=r"train\.x\.bin: field 'I3'"):
        load_prepared(tmp_path / "syn")


# ---------------------------------------------------------------------------
# Review of issue 14, item 6: meta.json itself is checked, structurally


@pytest.mark.parametrize("edit, key", [
    (lambda m: m["fields"][2].update(cardinality=10**12), "fields[2].cardinality"),
    (lambda m: m["fields"][2].update(cardinality=0), "fields[2].cardinality"),
    (lambda m: m["fields"][2].update(cardinality="34"), "fields[2].cardinality"),
    (lambda m: m["fields"][2].update(cardinality=True), "fields[2].cardinality"),
    (lambda m: m["fields"].__setitem__(1, ["I2", 3]), "fields[1]"),
    (lambda m: m["splits"]["valid"].update(rows=-1), "splits.valid.rows"),
    (lambda m: m["splits"]["train"].update(x_min="x"), "splits.train.x_min"),
    (lambda m: m["files"].update({"train.x.bin": ["x"]}), "files.train.x.bin"),
    (lambda m: m["files"]["test.y.bin"].update(bytes="x"), "files.test.y.bin.bytes"),
    (lambda m: m["files"].update({"../notes.txt": {"bytes": 1, "sha256": "0"}}), "files.../notes.txt"),
    (lambda m: m.update(has_prob="yes"), "has_prob"),
])
def test_a_malformed_meta_json_is_one_line_naming_the_key(data, edit, key):
    meta = meta_of(data)
    edit(meta)
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as err:
        load_prepared(data)
    msg = str(err.value)
    assert msg.startswith(f"{data / 'meta.json'}: malformed: {key}: expected") and "\n" not in msg, msg


def test_train_on_a_huge_cardinality_is_one_line_not_an_allocator_traceback(tmp_path, capsys, data):
    meta = meta_of(data)
    meta["fields"][2]["cardinality"] = 10**12
    (data / "meta.json").write_text(json.dumps(meta))
    rc = main(["train", "--data", str(data), "--output", str(tmp_path / "run"), "--quiet", "--epochs", "1",
               "--set", "model.block_dim=8", "--set", "model.num_blocks=1", "--set", "train.threads=1"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "fields[2].cardinality" in err, err
    assert not (tmp_path / "run").exists()


def test_a_meta_json_that_is_not_text_is_one_line(data):
    (data / "meta.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(DataError, match=r"meta\.json: not valid JSON"):
        load_prepared(data)
