"""The model table (masknet.registry) and the format table (data/formats.py) are the single source of
names: config validation, the CLI's choices and help, and `masknet predict`'s id columns read them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from masknet import registry
from masknet.cli import build_parser
from masknet.config import ModelConfig
from masknet.data import formats
from masknet.data.formats import FORMATS, builtin_spec, spec_for_format
from masknet.errors import ConfigError, UserError
from masknet.models import REGISTRY, CTRModel, model_class


def test_every_registered_model_resolves_to_a_ctr_model_with_declared_fields():
    assert list(REGISTRY) == list(registry.MODELS)
    known = set(ModelConfig.__dataclass_fields__)
    for name in registry.model_names():
        cls = model_class(name)
        assert issubclass(cls, CTRModel) and REGISTRY[name] is cls
        assert set(cls.config_fields) <= known, (name, cls.config_fields)
        tuned = {k.split(".", 1)[1] for k in cls.search_space if k.startswith("model.")}
        assert tuned <= set(cls.config_fields), (name, tuned - set(cls.config_fields))


def test_config_validation_reads_the_table_without_importing_torch():
    code = ("import sys; from masknet.config import ModelConfig; ModelConfig(name='dcnv2', multitask='mmoe').validate(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'nope'; choose one of sermasknet, paramasknet"):
        ModelConfig(name="nope").validate()
    with pytest.raises(ConfigError, match=r"model\.multitask: mmoe is built on sermasknet, paramasknet, dnn, dcnv2; got model\.name='fm'"):
        ModelConfig(name="fm", multitask="mmoe").validate()


@pytest.fixture
def restore_models():
    before = dict(registry.MODELS)
    yield
    registry.MODELS.clear()
    registry.MODELS.update(before)


def test_a_model_registered_at_run_time_is_a_config_value_and_a_cli_choice(restore_models):
    from masknet.models.lr import LogisticRegression

    class Twin(LogisticRegression):
        pass

    registry.register_model("twin", Twin, "a copy of LR")
    ModelConfig(name="twin").validate()
    assert REGISTRY["twin"] is Twin and "twin" in list(REGISTRY)
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert "twin" in next(a for a in train._actions if a.dest == "model").choices
    with pytest.raises(ValueError, match="already registered"):
        registry.register_model("twin", Twin, "again")


def test_train_help_lists_every_model_with_its_summary():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    action = next(a for a in train._actions if a.dest == "model")
    for entry in registry.MODELS.values():
        assert f"{entry.name}: {entry.summary}" in action.help


def test_paper_masknets_and_backbones_come_from_the_table():
    from masknet.experiments import plan

    assert plan.MASKNETS == registry.paper_masknets() == ("sermasknet", "paramasknet")
    assert registry.multitask_backbones() == ("sermasknet", "paramasknet", "dnn", "dcnv2")


def test_format_table_feeds_the_cli_help_and_predict_id_columns():
    assert list(FORMATS) == ["criteo", "criteo-csv", "avazu", "malware", "frappe"]
    prepare = build_parser()._subparsers._group_actions[0].choices["prepare"]
    helps = {a.dest: a.help for a in prepare._actions}
    for name, fmt in FORMATS.items():
        assert name in helps["format"] and f"{name} {fmt.min_count}" in helps["min_count"]
    assert formats.id_column("avazu") == "id" and formats.id_column("malware") == "MachineIdentifier"
    assert formats.id_column("criteo") is None and formats.id_column("schema:x.yaml") is None
    assert builtin_spec("avazu").time == "hour" and builtin_spec("criteo").time is None
    with pytest.raises(UserError, match="choose criteo, criteo-csv, avazu, malware, frappe or schema:FILE"):
        spec_for_format("nope")


def test_with_min_count_and_with_hashing_return_new_specs_and_leave_self_alone():
    """Regression: both used to change the spec in place (and the CLI dropped their return value)."""
    spec = builtin_spec("criteo")
    before = spec.to_dict()
    fewer = spec.with_min_count(3)
    hashed = fewer.with_hashing({"C3": 100})
    assert spec.to_dict() == before
    assert {f.min_count for f in fewer.fields} == {3} and {f.min_count for f in spec.fields} == {10}
    assert [f.hash_buckets for f in hashed.fields if f.name == "C3"] == [100]
    assert all(f.hash_buckets is None for f in fewer.fields)
    assert spec.with_min_count(None) is spec
    nolabel = spec.without_labels()
    assert nolabel.label is None and spec.label == "label"
    with pytest.raises(UserError, match="only categorical fields can be hashed"):
        spec.with_hashing({"I1": 5})
    with pytest.raises(UserError, match="no field 'Z9'"):
        spec.with_hashing({"Z9": 5})


def test_the_cli_applies_hashing_it_used_to_drop(tmp_path, capsys):
    """`--hash` reached the encoder only because with_hashing mutated the spec the CLI had dropped
    the return value of; with a pure with_hashing the CLI must keep the returned spec."""
    import json

    from masknet.cli import main

    src = tmp_path / "c.txt"
    row = "\t".join(["1"] + ["3"] * 13 + [f"{i:08x}" for i in range(26)])
    src.write_text("\n".join([row, row.replace("1\t", "0\t", 1)] * 20) + "\n")
    assert main(["prepare", "--format", "criteo", "--input", str(src), "--output", str(tmp_path / "d"),
                 "--hash", "C2=7", "--min-count", "1"]) == 0
    enc = json.loads((tmp_path / "d" / "encoder.json").read_text())
    fields = {f["name"]: f for f in enc["spec"]["fields"]}
    assert fields["C2"]["hash_buckets"] == 7 and fields["C1"]["hash_buckets"] is None
    assert {f["min_count"] for f in fields.values()} == {1}
