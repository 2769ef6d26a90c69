"""Several labels: schema, prepared storage, the built-in multi-task data, multi-task models,
the masked loss, per-task metrics and early stopping, and single-label runs unchanged."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from masknet.cli import main
from masknet.config import ModelConfig, TrainConfig
from masknet.data.dataset import MISSING_LABEL, load_prepared
from masknet.data.prepare import prepare
from masknet.data.schema import load_schema_file
from masknet.data.synthetic import generate
from masknet.errors import DataError, UserError
from masknet.models import build_model, with_size_defaults
from masknet.models.multitask import BODIES
from masknet.training.metrics import auc
from masknet.training.tasks import multitask_loss, select_tasks, selection_score

CARDS = [5, 7, 4, 9]
TINY = ["--set", "model.block_dim=16", "--set", "model.num_blocks=2", "--set", "model.top_mlp=16",
        "--set", "model.dnn_hidden=16", "--set", "train.threads=1", "--quiet"]


def write(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------
# Schema and prepared storage


def test_schema_labels_entries(tmp_path):
    s = load_schema_file(write(tmp_path / "s.yaml", (
        "labels: [click, {name: buy, allow_missing: true}, {name: grade, positive: ' top '}]\ncategorical: [a]\n")))
    assert [lab.column for lab in s.labels] == ["click", "buy", "grade"]
    assert s.label == "click" and s.label_kind == "01"
    assert [(lab.kind, lab.optional) for lab in s.labels] == [("01", False), ("01", True), ("=top", False)]
    assert s.needed_columns() == ["click", "buy", "grade", "a"]
    single = load_schema_file(write(tmp_path / "one.yaml", "label: click\ncategorical: [a]\n"))
    assert "more_labels" not in single.to_dict()  # a single-label spec (and encoder.json) reads as before


@pytest.mark.parametrize("text, message", [
    ("label: y\nlabels: [y]\ncategorical: [a]\n", "either 'label'"),
    ("categorical: [a]\n", "either 'label'"),
    ("labels: [{name: y, allow_missing: true}]\ncategorical: [a]\n", "first label is the main task"),
    ("labels: [y, y]\ncategorical: [a]\n", "'y' is listed twice"),
    ("labels: [y, {name: z, weight: 2}]\ncategorical: [a]\n", "unknown key 'weight'"),
    ("labels: []\ncategorical: [a]\n", "non-empty list"),
    ("labels: [y, a]\ncategorical: [a]\n", "also listed as a feature"),
])
def test_schema_label_errors(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        load_schema_file(write(tmp_path / "s.yaml", text))


def _multi_csv(tmp_path, n=300, seed=0):
    """click, buy (missing where click is 0), grade ('A' positive, with spaces), two features."""
    rng = np.random.default_rng(seed)
    lines = ["click,buy,grade,a,b"]
    for i in range(n):
        a, b = rng.integers(0, 6), rng.integers(0, 4)
        click = int(rng.random() < 0.2 + 0.1 * a)
        buy = "" if not click else str(int(rng.random() < 0.5))
        grade = " A " if rng.random() < 0.3 else " B"
        lines.append(f"{click},{buy},{grade},a{a},b{b}")
    path = write(tmp_path / "data.csv", "\n".join(lines) + "\n")
    schema = write(tmp_path / "s.yaml", (
        "labels: [click, {name: buy, allow_missing: true}, {name: grade, positive: A}]\ncategorical: [a, b]\n"))
    return path, schema, lines[1:]


def test_prepare_stores_every_label_and_masks_missing(tmp_path):
    data, schema, rows = _multi_csv(tmp_path)
    prepare(load_schema_file(schema), tmp_path / "out", input=data, split="time")  # file order: train = first 80%
    ds = load_prepared(tmp_path / "out")
    assert ds.task_names == ["click", "buy", "grade"]
    train = ds.splits["train"]
    lab = np.asarray(train.labels)
    assert lab.shape == (len(train), 3) and np.array_equal(lab[:, 0], np.asarray(train.y))
    raw = [r.split(",") for r in rows[: len(train)]]
    want_buy = [MISSING_LABEL if r[1] == "" else int(r[1]) for r in raw]
    want_grade = [int(r[2].strip() == "A") for r in raw]
    assert lab[:, 1].tolist() == want_buy and lab[:, 2].tolist() == want_grade
    assert (lab[:, 1] == MISSING_LABEL).sum() == sum(r[0] == "0" for r in raw) > 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    counts = meta["splits"]["train"]["tasks"]["buy"]
    assert counts["labelled"] == sum(r[0] == "1" for r in raw) and counts["positives"] == sum(r[1] == "1" for r in raw)
    assert meta["labels"][1] == {"name": "buy", "optional": True}


def test_missing_required_label_is_a_bad_line(tmp_path):
    path = write(tmp_path / "d.csv", "click,buy,a\n1,,x\n0,1,y\n")
    schema = write(tmp_path / "s.yaml", "labels: [click, buy]\ncategorical: [a]\n")
    with pytest.raises(DataError, match=r"d.csv: line 2: field 'buy': the label is missing"):
        prepare(load_schema_file(schema), tmp_path / "out", input=path)


# ---------------------------------------------------------------------------
# The built-in multi-task data


def test_default_builtin_data_is_unchanged():
    """The single-task data hashes as generator v2 did before the multi-task option existed."""
    d = generate(5000, 7)
    h = hashlib.sha256()
    for s in ("train", "valid", "test"):
        sp = d.splits[s]
        for a in (sp.x, sp.y, sp.p):
            h.update(np.ascontiguousarray(a).tobytes())
    assert h.hexdigest() == "4d08d95c6838f9adbc9eb55d8663e766be3a8837bf7871a04cd7f60acca59a5e"
    assert "labels" not in d.meta and "tasks" not in d.meta["source"]


def test_builtin_multitask_data():
    single, multi = generate(20000, 7), generate(20000, 7, multitask=True)
    assert multi.task_names == ["click", "purchase"]
    for s in ("train", "valid", "test"):
        a, b = single.splits[s], multi.splits[s]
        assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.labels[:, 0]) and np.array_equal(a.p, b.probs[:, 0])
        click, purchase = b.labels[:, 0], b.labels[:, 1]
        assert not (purchase > click).any()  # a purchase only after a click
        assert np.all(b.probs[:, 1] <= b.probs[:, 0] + 1e-7)
    t = multi.splits["train"]
    assert 0.01 < t.labels[:, 1].mean() < 0.04 < 0.2 < t.labels[:, 0].mean()  # purchase is the sparse task
    assert abs(t.probs[:, 1].mean() - t.labels[:, 1].mean()) < 0.005
    assert auc(t.labels[:, 1], t.probs[:, 1]) > 0.9


def test_generate_cli_multitask(tmp_path):
    assert main(["generate", "--rows", "2000", "--multitask", "--output", str(tmp_path / "g")]) == 0
    ds = load_prepared(tmp_path / "g")
    mem = generate(2000, 7, multitask=True)
    for s in ds.splits:
        assert np.array_equal(ds.splits[s].labels, mem.splits[s].labels)
        assert np.array_equal(ds.splits[s].probs, mem.splits[s].probs)


# ---------------------------------------------------------------------------
# Models


def _cfg(name, kind, **over):
    return ModelConfig(name=name, multitask=kind, embedding_dim=3, num_blocks=2, block_dim=8, top_mlp=[6],
                       dnn_hidden=[8, 6], cross_layers=2, tower_hidden=[5], num_experts=3, **over)


@pytest.mark.parametrize("name", sorted(BODIES))
@pytest.mark.parametrize("kind", ["shared_bottom", "mmoe"])
def test_multitask_models_output_one_logit_per_task(name, kind):
    torch.manual_seed(0)
    model = build_model(_cfg(name, kind), CARDS, tasks=["click", "buy", "like"])
    x = torch.stack([torch.randint(0, c, (11,)) for c in CARDS], dim=1)
    out = model(x)
    assert out.shape == (11, 3) and torch.isfinite(out).all()
    assert len(model.experts) == (3 if kind == "mmoe" else 1)
    out.sum().backward()  # every tower and expert is trained
    assert all(p.grad is not None for n, p in model.named_parameters() if "embedding" not in n)


@pytest.mark.parametrize("name", sorted(BODIES))
def test_body_is_the_single_task_model_without_its_prediction_layer(name):
    """A body computes exactly what the single-task model feeds its prediction layer."""
    cfg = _cfg(name, "none")
    single = build_model(cfg, CARDS)
    body = BODIES[name](len(CARDS), with_size_defaults(cfg, None))  # as build_model resolves it
    state = {k: v for k, v in single.state_dict().items() if not k.startswith(("embedding.", "prediction.", "tower.output.", "output."))}
    body.load_state_dict({k.replace("tower.", ""): v for k, v in state.items()})
    head = {"sermasknet": "prediction", "paramasknet": "prediction", "dnn": "tower.output", "dcnv2": "output"}[name]
    linear = single.get_submodule(head)
    x = torch.stack([torch.randint(0, c, (9,)) for c in CARDS], dim=1)
    with torch.no_grad():
        want = single(x)
        got = linear(body(single.embedding(x).flatten(1))).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("kind", ["shared_bottom", "mmoe"])
def test_shared_gradient_first_keeps_the_other_tasks_out_of_the_shared_parts(kind):
    torch.manual_seed(0)
    cfg = ModelConfig(name="sermasknet", multitask=kind, num_experts=2, block_dim=8, num_blocks=2, shared_gradient="first")
    model = build_model(cfg, [5, 7, 9], tasks=["click", "purchase"])
    x = torch.randint(0, 5, (16, 3))
    model(x)[:, 1].sum().backward()  # the second task's output alone
    shared = list(model.embedding.parameters()) + list(model.experts.parameters())
    assert all(p.grad is None or not p.grad.any() for p in shared)
    assert any(p.grad is not None and p.grad.any() for p in model.towers[1].parameters())
    model.zero_grad()
    model(x)[:, 0].sum().backward()
    assert any(p.grad is not None and p.grad.any() for p in model.experts.parameters())
    all_cfg = ModelConfig(name="sermasknet", multitask=kind, num_experts=2, block_dim=8, num_blocks=2, shared_gradient="all")
    torch.manual_seed(0)
    other = build_model(all_cfg, [5, 7, 9], tasks=["click", "purchase"])
    model.eval(), other.eval()
    assert torch.equal(model(x), other(x))  # the same function; only training differs


def test_mmoe_gates_are_distributions():
    model = build_model(_cfg("sermasknet", "mmoe"), CARDS, tasks=["a", "b"])
    x = torch.stack([torch.randint(0, c, (7,)) for c in CARDS], dim=1)
    g = model.gate_weights(x)
    assert g.shape == (7, 2, 3) and torch.allclose(g.sum(-1), torch.ones(7, 2)) and (g > 0).all()
    with pytest.raises(ValueError, match="no gates"):
        build_model(_cfg("sermasknet", "shared_bottom"), CARDS, tasks=["a"]).gate_weights(x)


def test_config_refuses_multitask_on_other_backbones():
    from masknet.errors import ConfigError

    with pytest.raises(ConfigError, match="model.multitask"):
        ModelConfig(name="fm", multitask="mmoe").validate()
    with pytest.raises(ConfigError, match="train.task_weights"):
        TrainConfig(task_weights=[1.0, 2.0]).validate()


# ---------------------------------------------------------------------------
# Loss and metrics


def test_masked_loss_ignores_unknown_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 2, generator=g, requires_grad=True)
    y = (torch.rand(50, 2, generator=g) < 0.3).float()
    y[::3, 1] = -1  # unknown
    w = torch.tensor([1.0, 4.0])
    total, per_task = multitask_loss(logits, y, w)
    known = y[:, 1] >= 0
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert per_task[0].item() == pytest.approx(bce(logits[:, 0], y[:, 0]).item(), rel=1e-6)
    assert per_task[1].item() == pytest.approx(bce(logits[known, 1], y[known, 1]).item(), rel=1e-6)
    assert total.item() == pytest.approx(per_task[0].item() + 4 * per_task[1].item(), rel=1e-6)
    total.backward()
    assert (logits.grad[~known, 1] == 0).all() and (logits.grad[known, 1] != 0).all()


def test_selection_score():
    m = {"auc": 0.7, "tasks": {"click": {"auc": 0.7}, "buy": {"auc": 0.9}}}
    assert selection_score(m, TrainConfig()) == 0.7  # the default: the first task's AUC
    assert selection_score(m, TrainConfig(early_stopping="mean")) == pytest.approx(0.8)
    assert selection_score(m, TrainConfig(tasks=["click", "buy"], task_weights=[1, 3], early_stopping="mean")) == pytest.approx(0.85)
    assert selection_score(m, TrainConfig(early_stopping="buy")) == 0.9
    assert selection_score({"auc": 0.6, "logloss": 0.5}, TrainConfig()) == 0.6  # single task: its AUC, as before


# ---------------------------------------------------------------------------
# Training runs


def _train(tmp_path, name, *args):
    out = tmp_path / name
    assert main(["train", "--output", str(out), "--epochs", "2", *TINY, *args]) == 0
    return out


MT_DATA = ["--set", "data.synthetic.rows=6000", "--set", "data.synthetic.multitask=true"]


def test_multitask_run_reports_every_task(tmp_path):
    out = _train(tmp_path, "mt", *MT_DATA, "--set", "model.multitask=mmoe", "--set", "model.num_experts=2")
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["tasks"]) == ["click", "purchase"]
    for t, entry in m["tasks"].items():
        assert set(entry) == {"valid", "test"}
        assert {"auc", "logloss", "ece", "ratio", "oracle_auc", "ece_true", "per_field", "reliability"} <= set(entry["test"])
    assert m["test"]["auc"] == m["tasks"]["click"]["test"]["auc"]  # the top level describes the first label
    assert m["oracle_auc"] == m["tasks"]["click"]["test"]["oracle_auc"]
    assert m["tasks"]["purchase"]["test"]["positives"] < m["tasks"]["click"]["test"]["positives"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(set(r["tasks"]) == {"click", "purchase"} for r in log)
    best = max(log, key=lambda r: r["valid_score"])  # early stopping on the first task's AUC (the default)
    assert m["best_epoch"] == best["epoch"] and m["best_step"] == best["step"]
    assert all(r["valid_score"] == r["tasks"]["click"]["valid_auc"] for r in log)
    spec = json.loads((out / "model.json").read_text())
    assert spec["tasks"] == ["click", "purchase"] and spec["model_config"]["multitask"] == "mmoe"
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_early_stopping_on_a_named_task(tmp_path):
    out = _train(tmp_path, "named", *MT_DATA, "--set", "model.multitask=shared_bottom", "--epochs", "3",
                 "--set", "train.patience=3", "--set", "train.early_stopping=purchase")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    m = json.loads((out / "metrics.json").read_text())
    assert m["best_epoch"] == max(log, key=lambda r: r["tasks"]["purchase"]["valid_auc"])["epoch"]


def test_early_stopping_on_the_mean(tmp_path):
    out = _train(tmp_path, "mean", *MT_DATA, "--set", "model.multitask=shared_bottom", "--set", "train.early_stopping=mean")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    m = json.loads((out / "metrics.json").read_text())
    best = max(log, key=lambda r: r["valid_score"])
    assert m["best_step"] == best["step"]
    assert best["valid_score"] == pytest.approx((best["tasks"]["click"]["valid_auc"] + best["tasks"]["purchase"]["valid_auc"]) / 2)


def test_one_task_of_multitask_data_is_the_single_task_run(tmp_path):
    """train.tasks=click on the multi-task data trains byte for byte what the single-task data trains."""
    a = _train(tmp_path, "single", "--set", "data.synthetic.rows=6000")
    b = _train(tmp_path, "picked", *MT_DATA, "--set", "train.tasks=click")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    for key in ("valid", "test", "best_epoch", "oracle_auc", "tasks"):
        assert ma[key] == mb[key], key


def test_refusals(tmp_path, capsys):
    def fails(*args):
        assert main(["train", "--output", str(tmp_path / "x"), "--epochs", "1", *TINY, *MT_DATA, *args]) == 2
        assert not (tmp_path / "x").exists()  # refused before the run folder is made
        return capsys.readouterr().err

    assert "train a multi-task model" in fails()
    assert "no label 'like'" in fails("--set", "train.tasks=like")
    assert "train.early_stopping" in fails("--set", "model.multitask=shared_bottom", "--set", "train.early_stopping=like")


def test_select_tasks_keeps_order_and_missing_labels():
    d = generate(3000, 7, multitask=True)
    r = select_tasks(d, ["purchase", "click"])
    assert r.task_names == ["purchase", "click"]
    assert np.array_equal(r.splits["test"].labels[:, 0], d.splits["test"].labels[:, 1])
    assert np.array_equal(r.splits["test"].y, d.splits["test"].labels[:, 1])
    one = select_tasks(d, ["purchase"])
    assert one.splits["train"].labels is None and np.array_equal(one.splits["train"].p, d.splits["train"].probs[:, 1])
    with pytest.raises(UserError, match="no label 'x'"):
        select_tasks(d, ["x"])


def test_multitask_model_trains_with_missing_labels(tmp_path):
    data, schema, _ = _multi_csv(tmp_path, n=2000)
    prepare(load_schema_file(schema), tmp_path / "p", input=data)
    out = _train(tmp_path, "opt", "--data", str(tmp_path / "p"), "--set", "model.multitask=shared_bottom")
    m = json.loads((out / "metrics.json").read_text())
    test = load_prepared(tmp_path / "p").splits["test"]
    known_buy = int((np.asarray(test.labels)[:, 1] != MISSING_LABEL).sum())
    assert m["tasks"]["buy"]["test"]["rows"] == known_buy < len(test)  # only the rows with a known label
    assert m["tasks"]["click"]["test"]["rows"] == len(test)
    assert all(np.isfinite(m["tasks"][t]["test"]["auc"]) for t in ("click", "buy", "grade"))


def test_labels_file_is_checked_and_recorded(tmp_path):
    data, schema, _ = _multi_csv(tmp_path)
    prepare(load_schema_file(schema), tmp_path / "p", input=data)
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert {"train.labels.bin", "valid.labels.bin", "test.labels.bin"} <= set(meta["files"])
    path = tmp_path / "p" / "valid.labels.bin"
    raw = bytearray(path.read_bytes())
    raw[4] = 7  # row 1, task 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"valid.labels.bin: row 1, task 1: label 7 is not 0, 1 or missing"):
        load_prepared(tmp_path / "p")


def test_task_weights_parsing():
    from masknet.serving.tasks import combine, parse_weights, request_weights
    from masknet.serving.features import RequestError

    tasks = ["click", "purchase"]
    assert parse_weights(None, tasks) == {"click": 1.0, "purchase": 1.0}
    assert parse_weights("purchase=20", tasks) == {"click": 1.0, "purchase": 20.0}
    for bad, msg in [("like=1", "no task 'like'"), ("click", "expected TASK=WEIGHT"), ("click=-1", "number >= 0"),
                     ("click=nan", "number >= 0"), ("click=x", "number >= 0")]:
        with pytest.raises(UserError, match=msg):
            parse_weights(bad, tasks)
    base = parse_weights("purchase=20", tasks)
    assert request_weights({"click": 0}, base, RequestError) == {"click": 0.0, "purchase": 20.0}
    with pytest.raises(RequestError, match="weights.click: must be a number >= 0"):
        request_weights({"click": True}, base, RequestError)
    np.testing.assert_allclose(combine(np.array([[0.1, 0.01], [0.2, 0.0]]), tasks, base), [0.3, 0.2])


def test_serve_refuses_task_weights_for_a_single_task_model(tmp_path, capsys):
    out = _train(tmp_path, "one", "--set", "data.synthetic.rows=2000", "--epochs", "1")
    assert main(["serve", "--model", str(out), "--task-weights", "click=2"]) == 2
    assert "is a single-task model" in capsys.readouterr().err


@pytest.mark.parametrize("tasks,why", [(None, "the task names of a multi-task model"), ([], "a non-empty list"),
                                       (["click", "click"], "distinct"), (["click", 3], "a non-empty list")])
def test_model_json_tasks_are_checked(tmp_path, tasks, why):
    from masknet.training.run import read_model_spec

    spec = {"model": "sermasknet", "model_config": {"name": "sermasknet", "multitask": "shared_bottom"},
            "field_names": ["a", "b"], "cardinalities": [3, 4], "encoder": None}
    if tasks is not None:
        spec["tasks"] = tasks
    path = tmp_path / "model.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(UserError, match=f"model.json: tasks: expected .*{why}"):
        read_model_spec(path)
    spec["tasks"] = ["click", "purchase"]
    path.write_text(json.dumps(spec))
    assert read_model_spec(path)["tasks"] == ["click", "purchase"]
