"""What `masknet reproduce` runs: presets, the tables' variants, and the cells.

A cell is one training run: (model, variant, seed) with the config overrides the variant
stands for. Its id `<model>-<variant>-s<seed>` is stable, so an interrupted run resumes by
skipping the cells whose result file exists. A variant whose overrides leave the base
config unchanged is called "base", so a cell shared by several tables (e.g. SerMaskNet in
Table 2, "full" in Table 3, embedding 10 in Table 4) is trained once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import PAPER_MODEL_SETTINGS, PAPER_PROTOCOL, RunConfig, apply_override
from ..errors import UserError
from ..registry import paper_masknets

ALL_TABLES = ("2", "3", "4", "5", "6", "rq4")
TABLE2_MODELS = ("fm", "dnn", "deepfm", "dcn", "xdeepfm", "autoint", "sermasknet", "paramasknet")
MASKNETS = paper_masknets()  # the paper's two MaskNets (masknet.registry)

# Table 3: the paper's ablations. "w/o LayerNorm" = both LayerNorms off (docs/model.md).
ABLATIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_mask": {"model.use_mask": False},
    "no_layernorm": {"model.emb_layernorm": False, "model.block_layernorm": False},
    "no_ffn": {"model.block_ffn": False},
}
ABLATION_LABELS = {
    "full": "full",
    "no_mask": "w/o mask",
    "no_layernorm": "w/o LayerNorm",
    "no_ffn": "w/o block FFN",
}

# Tables 4-6: one hyperparameter swept over the paper's values.
SWEEPS: dict[str, dict[str, Any]] = {
    "4": {"key": "model.embedding_dim", "values": [10, 20, 30, 50, 80], "short": "emb", "label": "embedding size k"},
    "5": {"key": "model.num_blocks", "values": [1, 3, 5, 7, 9], "short": "blocks", "label": "number of MaskBlocks"},
    "6": {"key": "model.reduction_ratio", "values": [1, 2, 3, 4, 5], "short": "r", "label": "reduction ratio r = t / z"},
}

RQ4_MAX_INSTANCES = 100_000

# Presets: overrides on RunConfig() (the paper's settings are the defaults).
PRESETS: dict[str, dict[str, Any]] = {
    # Small models and data: every table and RQ4 in minutes on 2 cores (README, CI). A smoke run:
    # too little data and training to resolve the paper's claims.
    "quick": {
        "seeds": 2,  # a smoke run with a spread; --seeds 3 as the paper preset
        # With the built-in synthetic data: 10 of its 39 fields (both gate fields and the fields of
        # 5 of the 6 planted pairs of data seed 7; tests/data/test_synthetic.py checks this), so the
        # embedding mask at k = 80 (2·(f·k)² weights per mask) stays small.
        "synthetic_fields": ["I1", "I2", "I3", "C1", "C9", "C14", "C17", "C20", "C23", "C25"],
        "overrides": {
            **PAPER_PROTOCOL,  # its recorded results (docs/reproduce.md) were run with the paper's protocol
            **PAPER_MODEL_SETTINGS,
            "data.synthetic.rows": 10_000,
            "model.embedding_dim": 10,
            "model.block_dim": 64,
            "model.top_mlp": [64, 64],
            "model.dnn_hidden": [64, 64],
            "model.cin_layers": [32, 32],
            "model.attention_layers": 2,
            "model.attention_dim": 16,
            "train.epochs": 2,
            "train.batch_size": 512,
            "train.lr": 2e-3,  # few steps per cell (8k train rows / 512): a larger step than the default 1e-3
            "train.patience": 1,
            "train.threads": 1,  # tiny layers: a second intra-op thread costs more than it saves
        },
    },
    # The paper's settings (section 4.1): embedding 10, 3x400 DNNs, 3 blocks, r = 2, Adam, batch 1024,
    # and its protocol: validation once per epoch, patience 1, constant learning rate 1e-3 for every model.
    "paper": {"seeds": 3, "synthetic_fields": None, "overrides": {**PAPER_PROTOCOL, **PAPER_MODEL_SETTINGS}},
}


@dataclass
class Cell:
    model: str
    variant: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)  # on top of the base config (seed excluded)
    tables: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.model}-{self.variant}-s{self.seed}"


@dataclass
class Plan:
    base: RunConfig  # preset + --config + --data + --set, applied to every cell
    tables: list[str]
    seeds: list[int]
    cells: dict[str, Cell]  # by id, in run order
    # (table, model, variant) -> variant key used in cell ids: the table's layout
    layout: dict[str, dict[str, dict[Any, str]]]
    fields: Optional[list[str]] = None  # keep only these fields of the data (None = all)
    # `--tune`: per model, the settings its study chose ({config key: value}), applied before a
    # variant's own overrides (an ablation or a sweep changes one key of the tuned config)
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)

    def cell_config(self, cell: Cell) -> RunConfig:
        cfg = copy.deepcopy(self.base)
        cfg.model.name = cell.model
        for key, value in {**self.tuned.get(cell.model, {}), **cell.overrides}.items():
            apply_override(cfg, f"{key}={format_value(value)}")
        cfg.train.seed = cell.seed
        return cfg

    def cell_ids(self, model: str, variant: str) -> list[str]:
        return [f"{model}-{variant}-s{s}" for s in self.seeds]


def format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_tables(text: str | None) -> list[str]:
    if not text:
        return list(ALL_TABLES)
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("all", ""):
            return list(ALL_TABLES)
        if part not in ALL_TABLES:
            raise UserError(f"--tables: unknown table {part!r}; choose from {','.join(ALL_TABLES)}")
        if part not in out:
            out.append(part)
    return [t for t in ALL_TABLES if t in out]


def _variant_name(base: RunConfig, model: str, overrides: dict[str, Any], name: str, tuned: dict[str, Any]) -> str:
    """`name`, or "base" when the overrides do not change the base config for this model
    (the base with the model's tuned settings, under `--tune`)."""
    a = copy.deepcopy(base)
    a.model.name = model
    for key, value in tuned.items():
        apply_override(a, f"{key}={format_value(value)}")
    b = copy.deepcopy(a)
    for key, value in overrides.items():
        apply_override(b, f"{key}={format_value(value)}")
    return "base" if a.to_dict() == b.to_dict() else name


def _fmt_num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def make_plan(
    base: RunConfig, tables: list[str], seeds: int, fields: Optional[list[str]] = None, tuned: Optional[dict[str, dict[str, Any]]] = None
) -> Plan:
    if seeds < 1:
        raise UserError(f"--seeds: must be >= 1, got {seeds}")
    seed_list = [base.train.seed + i for i in range(seeds)]
    specs: list[tuple[str, str, str, dict[str, Any]]] = []  # (table, model, variant, overrides)
    layout: dict[str, dict[str, dict[Any, str]]] = {}

    def add(table: str, model: str, key: Any, name: str, overrides: dict[str, Any]) -> None:
        variant = _variant_name(base, model, overrides, name, (tuned or {}).get(model, {}))
        layout.setdefault(table, {}).setdefault(model, {})[key] = variant
        specs.append((table, model, variant, overrides))

    if "2" in tables:
        for m in TABLE2_MODELS:
            add("2", m, "base", "base", {})
    if "3" in tables:
        for m in MASKNETS:
            for ab, ov in ABLATIONS.items():
                add("3", m, ab, ab.replace("_", ""), ov)
    for t in ("4", "5", "6"):
        if t in tables:
            sw = SWEEPS[t]
            for m in MASKNETS:
                for v in sw["values"]:
                    add(t, m, v, f"{sw['short']}{_fmt_num(v)}", {sw["key"]: v})
    if "rq4" in tables:
        # one trained 3-block SerMaskNet (the first seed)
        add("rq4", "sermasknet", 3, "blocks3", {"model.num_blocks": 3})

    cells: dict[str, Cell] = {}
    for table, model, variant, overrides in specs:
        use_seeds = seed_list[:1] if table == "rq4" else seed_list
        for s in use_seeds:
            cid = f"{model}-{variant}-s{s}"
            if cid not in cells:
                cells[cid] = Cell(model, variant, s, dict(overrides) if variant != "base" else {})
            if table not in cells[cid].tables:
                cells[cid].tables.append(table)
    # seed-major order: an interrupted run has every model at the first seeds before any at the later ones
    order = sorted(cells.values(), key=lambda c: seed_list.index(c.seed))
    cells = {c.id: c for c in order}
    return Plan(base=base, tables=tables, seeds=seed_list, cells=cells, layout=layout, fields=fields, tuned=dict(tuned or {}))


def plan_models(plan: Plan) -> list[str]:
    """The models a plan trains, in Table 2's order (each gets its own study under `--tune`)."""
    present = {c.model for c in plan.cells.values()}
    return [m for m in TABLE2_MODELS if m in present]
