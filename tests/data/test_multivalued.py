"""Multi-valued fields in the data layer and the models: schema entries, tokenizing, storage, pooling."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from masknet.config import ModelConfig, TrainConfig
from masknet.data import spill as spill_mod
from masknet.data.batch import Batch, MultiValuedField
from masknet.data.dataset import load_prepared
from masknet.data.prepare import prepare
from masknet.data.rawrows import encode_file
from masknet.data.schema import load_schema_file
from masknet.errors import DataError, UserError
from masknet.models import REGISTRY, build_model
from masknet.models.layers import FieldEmbedding
from masknet.training.trainer import Optimizer

SCHEMA = """\
label: y
categorical: [user]
multi_valued:
  - {name: genres, separator: "|", max_len: 3}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def csv_rows(rows: list[tuple[str, str, int]]) -> str:
    return "user,genres,y\n" + "".join(f"{u},{g},{y}\n" for u, g, y in rows)


def prepared(tmp_path: Path, schema: str, rows: str, **kw):
    s = write(tmp_path / "schema.yaml", schema)
    data = write(tmp_path / "data.csv", rows)
    stats = prepare(load_schema_file(s), tmp_path / "out", train=data, valid=data, test=data, **kw)
    return load_prepared(tmp_path / "out"), stats


# ---------------------------------------------------------------------------
# Schema


def test_schema_entry_defaults_and_round_trip(tmp_path):
    spec = load_schema_file(write(tmp_path / "s.yaml", SCHEMA + "  - {name: hist, column: clicks, max_len: 5, keep: last, pooling: max, hash_buckets: 64}\n"))
    genres, hist = spec.multi_valued
    assert (genres.column, genres.separator, genres.pooling, genres.keep, genres.min_count) == ("genres", "|", "mean", "first", 1)
    assert (hist.column, hist.keep, hist.pooling, hist.hash_buckets) == ("clicks", "last", "max", 64)
    assert spec.needed_columns() == ["y", "user", "genres", "clicks"]
    from masknet.data.schema import DatasetSpec

    assert DatasetSpec.from_dict(spec.to_dict()).multi_valued == spec.multi_valued
    # a spec without multi-valued fields is saved exactly as before they existed
    assert "multi_valued" not in load_schema_file(write(tmp_path / "t.yaml", "label: y\ncategorical: [user]\n")).to_dict()


@pytest.mark.parametrize(
    "entry, line, message",
    [
        ("  - {name: genres, max_len: 3, pooling: avg}", 4, "pooling: expected mean or sum or max, got 'avg'"),
        ("  - {name: genres, max_len: 3, sepparator: ','}", 4, "unknown key 'sepparator'"),
        ("  - {name: genres}", 4, "max_len: required"),
        ("  - {name: genres, max_len: 0}", 4, "max_len: expected an integer >= 1, got 0"),
        ("  - {name: genres, max_len: 3, separator: ''}", 4, "separator: expected a non-empty string"),
        ("  - {name: genres, max_len: 3, separator: ','}", 4, "contains the file's delimiter ','"),
        ("  - {name: genres, max_len: 3, keep: middle}", 4, "keep: expected first or last"),
        ("  - {name: genres, max_len: 3, weight_separator: '|'}", 4, "must differ"),
        ("  - {name: genres, max_len: 3, weight_separator: ':', weight_column: w}", 4, "not both"),
        ("  - name: genres\n    max_len: 3\n    pooling: median", 6, "pooling: expected"),
    ],
)
def test_schema_errors_name_file_line_and_field(tmp_path, entry, line, message):
    path = write(tmp_path / "s.yaml", "label: y\ncategorical: [user]\nmulti_valued:\n" + entry + "\n")
    with pytest.raises(DataError) as exc:
        load_schema_file(path)
    text = str(exc.value)
    assert text.startswith(f"{path}: line {line}: multi_valued[0] (field 'genres'): "), text
    assert message in text and "\n" not in text


def test_schema_cross_checks(tmp_path):
    with pytest.raises(DataError, match="field 'user' is listed twice"):
        load_schema_file(write(tmp_path / "a.yaml", "label: y\ncategorical: [user]\nmulti_valued: [{name: user, max_len: 2}]\n"))
    with pytest.raises(DataError, match="label column 'y' is also listed"):
        load_schema_file(write(tmp_path / "b.yaml", "label: y\ncategorical: [user]\nmulti_valued: [{name: y, max_len: 2}]\n"))
    with pytest.raises(DataError, match="line 3: multi_valued: expected a list"):
        load_schema_file(write(tmp_path / "c.yaml", "label: y\ncategorical: [user]\nmulti_valued: genres\n"))


# ---------------------------------------------------------------------------
# Prepare and store


def test_prepare_pads_truncates_and_counts(tmp_path):
    rows = csv_rows([("a", "Action|Comedy", 1), ("b", "", 0), ("a", "Drama|Action|Comedy|Horror", 1), ("c", "Comedy|", 0)])
    ds, stats = prepared(tmp_path, SCHEMA, rows)
    (mv,) = ds.multi_valued
    assert mv == MultiValuedField("genres", 2 + 3, 3, "mean", False)
    enc = json.loads((tmp_path / "out" / "encoder.json").read_text())
    vocab = enc["multi_valued"][0]["vocab"]
    # most frequent first, ties by value; counted over the kept values (Horror is always cut)
    assert vocab == ["Comedy", "Action", "Drama"]
    code = {v: i + 2 for i, v in enumerate(vocab)}
    seq = np.asarray(ds.splits["train"].seq)
    assert seq.tolist() == [
        [code["Action"], code["Comedy"], 0],
        [0, 0, 0],  # missing: the empty list
        [code["Drama"], code["Action"], code["Comedy"]],  # keep: first (Horror is cut)
        [code["Comedy"], 0, 0],  # a trailing separator adds no value
    ]
    lengths = stats["multi_valued"][0]["lengths"]["train"]
    assert lengths["truncated_rows"] == 1 and lengths["empty_rate"] == 0.25
    assert lengths["length_percentiles"]["max"] == 4 and lengths["mean_length"] == pytest.approx(7 / 4)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["version"] == 2 and meta["multi_valued"][0]["max_len"] == 3


def test_prepare_overwrite_replaces_a_multi_valued_dataset(tmp_path):
    """--overwrite replaces only what the old meta.json says prepare wrote: its seq (and seqw)
    files are among them, so a multi-valued dataset can be prepared again in place."""
    weighted = SCHEMA.replace("max_len: 3}", "max_len: 3, weight_separator: ':'}")
    rows = csv_rows([("a", "Action:0.5|Comedy:2", 1), ("b", "Drama:1", 0)])
    ds, _ = prepared(tmp_path, weighted, rows)
    assert (tmp_path / "out" / "train.seqw.bin").is_file()
    ds, _ = prepared(tmp_path, SCHEMA, csv_rows([("a", "Action|Comedy", 1), ("b", "Drama", 0)]), overwrite=True)
    assert ds.multi_valued[0].weighted is False and not (tmp_path / "out" / "train.seqw.bin").exists()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):  # a file prepare did not write is still never replaced
        prepared(tmp_path, SCHEMA, csv_rows([("a", "Action", 1)]), overwrite=True)


def test_data_identity_covers_the_multi_valued_files(tmp_path):
    """A run's data fingerprint (training/runfolder.py) changes when only a list column does."""
    from masknet.data.dataset import identity

    ids = []
    for name, genres in (("a", "Action|Comedy"), ("b", "Comedy|Action")):
        (tmp_path / name).mkdir()
        ds, _ = prepared(tmp_path / name, SCHEMA, csv_rows([("u", genres, 1), ("v", "Drama", 0)]))
        ids.append(identity(tmp_path / name / "out", ds.meta))
    assert "train.seq.bin" in ids[0]["files"]
    assert ids[0]["fingerprint"] != ids[1]["fingerprint"]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(multi_valued={"name": "genres"}), "multi_valued: expected a list"),
    (lambda m: m["multi_valued"][0].update(max_len=0), r"multi_valued\[0\]\.max_len: expected an integer in 1\.\."),
    (lambda m: m["multi_valued"][0].update(cardinality=2**40), r"multi_valued\[0\]\.cardinality: expected an integer"),
    (lambda m: m["multi_valued"][0].update(pooling="avg"), r"multi_valued\[0\]\.pooling: expected mean or sum or max"),
    (lambda m: m["multi_valued"][0].pop("name"), r"multi_valued\[0\]\.name: expected a non-empty string, missing"),
])
def test_a_garbled_multi_valued_entry_in_meta_or_model_json_is_one_line(tmp_path, edit, message):
    from masknet.training.run import read_model_spec

    prepared(tmp_path, SCHEMA, csv_rows([("a", "Action|Comedy", 1), ("b", "Drama", 0)]))
    meta_path = tmp_path / "out" / "meta.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=f"meta.json: malformed: {message}"):
        load_prepared(tmp_path / "out")
    spec = {"model": "sermasknet", "model_config": {}, "field_names": ["user"], "cardinalities": [4],
            "encoder": None, "multi_valued": meta["multi_valued"]}
    (tmp_path / "model.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match=f"model.json: {message}"):
        read_model_spec(tmp_path / "model.json")


def test_keep_last_min_count_and_oov(tmp_path):
    schema = SCHEMA.replace("max_len: 3}", "max_len: 2, keep: last, min_count: 2}")
    s = write(tmp_path / "schema.yaml", schema)
    train = write(tmp_path / "train.csv", csv_rows([("a", "x|y|z", 1), ("b", "y|z", 0), ("c", "w", 1)]))
    test = write(tmp_path / "test.csv", csv_rows([("a", "q|y", 1), ("b", "w|z", 0)]))
    prepare(load_schema_file(s), tmp_path / "out", train=train, valid=test, test=test)
    ds = load_prepared(tmp_path / "out")
    y, z = 2, 3  # count 2 each; x and w (count 1) are out of vocabulary
    assert np.asarray(ds.splits["train"].seq).tolist() == [[y, z], [y, z], [1, 0]]
    assert np.asarray(ds.splits["test"].seq).tolist() == [[1, y], [1, z]]
    oov = json.loads((tmp_path / "out" / "meta.json").read_text())["stats"]["multi_valued"][0]["lengths"]["test"]["oov_rate"]
    assert oov == 0.5


def test_hashing_a_multi_valued_field(tmp_path):
    from masknet.data.encoder import fnv1a64

    ds, _ = prepared(tmp_path, SCHEMA.replace("max_len: 3}", "max_len: 3, hash_buckets: 7}"), csv_rows([("a", "p|q", 1), ("b", "q", 0)]))
    want = (2 + fnv1a64(pa.array(["p", "q"])) % np.uint64(7)).astype(int).tolist()
    assert np.asarray(ds.splits["train"].seq)[0, :2].tolist() == want
    assert ds.multi_valued[0].cardinality == 9


def test_weights_inline_and_from_a_column(tmp_path):
    (tmp_path / "a").mkdir()
    inline = SCHEMA.replace("max_len: 3}", "max_len: 3, weight_separator: ':'}")
    ds, _ = prepared(tmp_path / "a", inline, csv_rows([("a", "x:0.5|y:2", 1), ("b", "y:1e-1", 0)]))
    assert ds.multi_valued[0].weighted
    np.testing.assert_allclose(np.asarray(ds.splits["train"].seq_weights), [[0.5, 2, 0], [0.1, 0, 0]], rtol=1e-6)
    assert np.asarray(ds.splits["train"].seq).tolist() == [[3, 2, 0], [2, 0, 0]]  # y (2 uses) before x

    (tmp_path / "b").mkdir()
    column = SCHEMA.replace("max_len: 3}", "max_len: 3, weight_column: gw}")
    ds, _ = prepared(tmp_path / "b", column, "user,genres,gw,y\na,x|y,0.5|2,1\nb,y,3,0\n")
    np.testing.assert_allclose(np.asarray(ds.splits["train"].seq_weights), [[0.5, 2, 0], [3, 0, 0]])


@pytest.mark.parametrize(
    "schema_edit, header, bad, message",
    [
        ("weight_separator: ':'", "user,genres,y", "a,x:0.5|y,1", "line 2: field 'genres': expected values written value:weight"),
        ("weight_separator: ':'", "user,genres,y", "a,x:abc,1", "line 2: field 'genres': expected values written value:weight"),
        ("weight_column: gw", "user,genres,gw,y", "a,x|y,0.5,1", "line 2: field 'gw': needs one weight per value of 'genres'"),
        ("weight_column: gw", "user,genres,gw,y", "a,x|y,0.5|zz,1", "line 2: field 'gw': not a number"),
    ],
)
def test_bad_weights_are_bad_lines(tmp_path, schema_edit, header, bad, message):
    schema = SCHEMA.replace("max_len: 3}", f"max_len: 3, {schema_edit}}}")
    good = "b,x:1,0" if "weight_separator" in schema_edit else "b,x,1,0"
    with pytest.raises(DataError, match=message):
        prepared(tmp_path, schema, f"{header}\n{bad}\n{good}\n")
    (tmp_path / "skip").mkdir()
    _, stats = prepared(tmp_path / "skip", schema, f"{header}\n{bad}\n{good}\n", bad_lines="skip")
    assert stats["bad_lines"]["total"] == 3 and stats["rows"]["train"] == 1  # the same file is train, valid and test


def test_parquet_list_column_equals_csv_separator_column(tmp_path):
    rows = [("a", ["x", "y"], 1), ("b", None, 0), ("c", [], 1), ("a", ["y", "z", "x", "w"], 0), ("d", [7, 8], 1)]
    pq.write_table(pa.table({
        "user": [r[0] for r in rows], "genres": pa.array([None if r[1] is None else [str(v) for v in r[1]] for r in rows]),
        "y": [r[2] for r in rows],
    }), tmp_path / "d.parquet")
    text = csv_rows([(u, "|".join(str(v) for v in g or []), y) for u, g, y in rows])
    s = write(tmp_path / "schema.yaml", SCHEMA)
    prepare(load_schema_file(s), tmp_path / "pq", train=tmp_path / "d.parquet", valid=tmp_path / "d.parquet", test=tmp_path / "d.parquet")
    csv = write(tmp_path / "d.csv", text)
    prepare(load_schema_file(s), tmp_path / "csv", train=csv, valid=csv, test=csv)
    a, b = load_prepared(tmp_path / "pq"), load_prepared(tmp_path / "csv")
    np.testing.assert_array_equal(np.asarray(a.splits["test"].seq), np.asarray(b.splits["test"].seq))
    assert np.asarray(a.splits["test"].seq)[4].tolist()[:2] != [0, 0]  # integer list values are categories too


def test_non_list_column_where_a_list_is_expected(tmp_path):
    pq.write_table(pa.table({"user": ["a", "b"], "genres": [3, 4], "y": [0, 1]}), tmp_path / "d.parquet")
    s = write(tmp_path / "schema.yaml", SCHEMA)
    p = tmp_path / "d.parquet"
    with pytest.raises(DataError, match=r"d.parquet: column 'genres': a multi-valued field needs a list column or a text column"):
        prepare(load_schema_file(s), tmp_path / "o", train=p, valid=p, test=p)
    pq.write_table(pa.table({"user": pa.array([["a"], ["b"]]), "genres": ["x", "y"], "y": [0, 1]}), p)
    with pytest.raises(DataError, match="column 'user' is a list column; list field 'user' under multi_valued"):
        prepare(load_schema_file(s), tmp_path / "o", train=p, valid=p, test=p)


def test_windows_and_chunks_do_not_change_the_result(tmp_path, monkeypatch):
    """Bounded memory: many small blocks and spill windows give the same arrays as one of each."""
    rng = np.random.default_rng(0)
    vocab = [f"t{i}" for i in range(300)]
    rows = [(f"u{rng.integers(0, 40)}", "|".join(rng.choice(vocab, rng.integers(0, 12))), int(rng.integers(0, 2))) for _ in range(3000)]
    s = write(tmp_path / "schema.yaml", SCHEMA.replace("max_len: 3}", "max_len: 8, weight_separator: '#'}").replace("user]", "user]\nmin_count: 2"))
    text = csv_rows([(u, "|".join(f"{t}#{len(t)}" for t in g.split("|") if t), y) for u, g, y in rows])
    data = write(tmp_path / "d.csv", text)
    prepare(load_schema_file(s), tmp_path / "one", input=data)
    monkeypatch.setattr(spill_mod, "WINDOW_ROWS", 257)
    prepare(load_schema_file(s), tmp_path / "many", input=data, block_bytes=4096)
    a, b = load_prepared(tmp_path / "one"), load_prepared(tmp_path / "many")
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(np.asarray(a.splits[split].seq), np.asarray(b.splits[split].seq))
        np.testing.assert_array_equal(np.asarray(a.splits[split].seq_weights), np.asarray(b.splits[split].seq_weights))
        np.testing.assert_array_equal(np.asarray(a.splits[split].x), np.asarray(b.splits[split].x))
    assert (tmp_path / "one" / "encoder.json").read_bytes() == (tmp_path / "many" / "encoder.json").read_bytes()
    # encode_file (the saved encoder on raw rows) gives the prepared arrays
    parts = list(encode_file(tmp_path / "one" / "encoder.json", data))
    seq = np.concatenate([p[0].seq for p in parts])
    assert seq.shape == (3000, 8) and len(np.asarray(a.splits["train"].seq)) + len(np.asarray(a.splits["valid"].seq)) + len(np.asarray(a.splits["test"].seq)) == 3000


# Hashes of the arrays and encoders written by `prepare` and the synthetic generator before
# multi-valued fields existed (commit fb2f53a; syn/meta.json as of main 3f8dbd4, which added the
# integrity keys): a dataset without multi-valued fields must stay byte-identical.
GOLDEN = {
    "gen/test": "05a8e5c656a84970", "gen/train": "3b10cf13f127674d", "gen/valid": "635c01945b61f7b2",
    "pa/encoder.json": "8edf086c758030a0", "pa/test.x.bin": "a8c10a29bd3abb2f", "pa/test.y.bin": "a283d09c09a0263e",
    "pa/train.x.bin": "5bbbc3a5f9a83ceb", "pa/train.y.bin": "6a285a3ee6867a3c", "pa/valid.x.bin": "2ad7c29d0d75ebc9",
    "pa/valid.y.bin": "290c1b8c011a74ce", "pc/encoder.json": "57dc93aa043748f2", "pc/test.x.bin": "5f99d87d905f714b",
    "pc/test.y.bin": "4e83314f5b993b66", "pc/train.x.bin": "c5a702b847c3d1cd", "pc/train.y.bin": "a5698c37277d553e",
    "pc/valid.x.bin": "503166d6846c5703", "pc/valid.y.bin": "8111be0b5e01fa89", "syn/meta.json": "2b49d3f57bc047dc",
    "syn/test.p.bin": "e9372a0dc1450e66", "syn/test.x.bin": "5d613d1df5b0207a", "syn/test.y.bin": "89df8ac82361aa85",
    "syn/train.p.bin": "c278279ea185b1aa", "syn/train.x.bin": "eaf1e6877f2426de", "syn/train.y.bin": "a936c1b598d38af3",
    "syn/valid.p.bin": "656b7a11b834522e", "syn/valid.x.bin": "4594117def9cf548", "syn/valid.y.bin": "211286af67af39bc",
}


def test_single_valued_outputs_are_byte_identical(tmp_path):
    from masknet.data.rawgen import write_avazu, write_criteo
    from masknet.data.formats import builtin_spec
    from masknet.data.synthetic import generate, write_synthetic

    def h(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()[:16]

    got = {}
    write_criteo(tmp_path / "c.txt", 5000, seed=3)
    # min count 10 given: the golden files predate the small-file rule (test_small_file_min_count.py)
    prepare(builtin_spec("criteo").with_min_count(10), tmp_path / "pc", input=tmp_path / "c.txt")
    write_avazu(tmp_path / "a.csv", 4000, seed=2)
    prepare(builtin_spec("avazu"), tmp_path / "pa", input=tmp_path / "a.csv", split="time")
    write_synthetic(tmp_path / "syn", 3000, 5)
    for d in ("pc", "pa", "syn"):
        got.update({f"{d}/{f.name}": h(f) for f in (tmp_path / d).iterdir() if d == "syn" or f.name != "meta.json"})
    for s, sp in generate(3000, 5).splits.items():
        got[f"gen/{s}"] = hashlib.sha256(np.asarray(sp.x).tobytes() + np.asarray(sp.y).tobytes() + np.asarray(sp.p).tobytes()).hexdigest()[:16]
    assert got == GOLDEN


# ---------------------------------------------------------------------------
# Models: pooled lookups


FIELDS = (MultiValuedField("g", 6, 4, "mean"), MultiValuedField("h", 5, 3, "sum"), MultiValuedField("k", 4, 2, "max", weighted=True))


def test_pooling_math_and_empty_lists():
    torch.manual_seed(0)
    emb = FieldEmbedding([3, 2], 4, init_std=1.0, multi_valued=FIELDS)
    W = emb.weight.detach()
    base = [3 + 2, 3 + 2 + 6, 3 + 2 + 6 + 5]  # first table row of g, h, k
    x = torch.tensor([[1, 0], [2, 1]])
    seq = torch.tensor([[2, 3, 0, 0, 1, 4, 0, 2, 3], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    w = torch.tensor([[0.0] * 7 + [0.5, 2.0], [0.0] * 9])
    out = emb(Batch(x, seq, w))
    assert out.shape == (2, 5, 4)
    torch.testing.assert_close(out[0, 0], W[0 + 1])  # single-valued fields unchanged: row offset + index
    torch.testing.assert_close(out[0, 2], (W[base[0] + 2] + W[base[0] + 3]) / 2)  # masked mean
    torch.testing.assert_close(out[0, 3], W[base[1] + 1] + W[base[1] + 4])  # sum
    torch.testing.assert_close(out[0, 4], torch.maximum(0.5 * W[base[2] + 2], 2.0 * W[base[2] + 3]))  # weighted max
    for j, b in enumerate(base):  # an empty list is the field's missing row (index 0), never zeros
        torch.testing.assert_close(out[1, 2 + j], W[b])
    with pytest.raises(ValueError, match="multi-valued fields"):
        emb(x)


def test_sparse_updates_touch_only_looked_up_rows_and_never_the_padding_row():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="dnn", embedding_dim=4, dnn_hidden=[8]), [3], FIELDS[:1])
    opt = Optimizer(model, TrainConfig(lr=0.1))
    before = model.embedding.weight.detach().clone()
    batch = Batch(torch.tensor([[1], [2]]), torch.tensor([[2, 3, 0, 0], [0, 0, 0, 0]]))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(batch), torch.tensor([1.0, 0.0])).backward()
        assert model.embedding.weight.grad.is_sparse
        opt.step()
    changed = (model.embedding.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    g = 3  # the multi-valued table starts after the single field's 3 rows
    assert changed == [1, 2, g + 0, g + 2, g + 3]  # x rows, the empty list's missing row, values 2 and 3
    assert (model.embedding.weight.detach()[-1] == 0).all()  # the shared padding row


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_model_reads_the_multi_valued_fields(name):
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, embedding_dim=4, block_dim=8, top_mlp=[8], dnn_hidden=[8], cin_layers=[4], attention_layers=1, attention_dim=4)
    model = build_model(cfg, [3, 4], FIELDS).eval()
    assert model.num_fields == 5
    x = torch.tensor([[1, 2], [1, 2]])
    seq = torch.tensor([[2, 3, 0, 0, 1, 0, 0, 1, 0], [5, 0, 0, 0, 4, 3, 2, 3, 2]])
    w = torch.ones(2, 9)
    with torch.no_grad():
        for p in model.parameters():  # break the tiny-init symmetry so every path carries signal
            p.add_(torch.randn_like(p) * 0.3)
        out = model(Batch(x, seq, w))
    assert out.shape == (2,) and torch.isfinite(out).all()
    assert abs(float(out[0] - out[1])) > 1e-6  # same single-valued ids, other lists: another score
    # without multi-valued fields, a Batch and the bare LongTensor are the same input
    plain = build_model(cfg, [3, 4])
    torch.testing.assert_close(plain(x), plain(Batch(x)))
