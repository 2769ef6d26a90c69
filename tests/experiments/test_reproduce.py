"""`masknet reproduce` end to end on a tiny config: every section, plot and cell; resume re-runs only missing cells."""

from __future__ import annotations

import json

import pytest

from masknet.cli import main
from masknet.experiments.analysis import MODEL_LABELS
from masknet.experiments.plan import ALL_TABLES, make_plan, parse_tables
from masknet.experiments.reproduce import base_config
from masknet.experiments.stats import compare

TINY = [
    "--preset", "quick", "--seeds", "1", "--quiet",
    "--set", "data.synthetic.rows=2000",
    "--set", "model.block_dim=8",
    "--set", "model.top_mlp=[8]",
    "--set", "model.dnn_hidden=[8]",
    "--set", "model.cin_layers=[4]",
    "--set", "model.attention_layers=1",
    "--set", "model.attention_dim=4",
    "--set", "train.epochs=1",
    "--set", "train.batch_size=512",
    "--set", "train.threads=1",
]

SECTIONS = [
    "## Set-up", "## Summary", "## Table 2: overall performance", "## Table 3: ablation", "## Table 4: embedding size",
    "## Table 5: number of MaskBlocks", "## Table 6: reduction ratio", "## RQ4: the instance-guided masks", "## Files",
]
PLOTS = [
    "table2_auc.png", "table3_ablation.png", "table4_embedding_dim.png", "table5_num_blocks.png",
    "table6_reduction_ratio.png", "rq4_mask_histograms.png", "rq4_mask_heatmaps.png",
]


def test_reproduce_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    from masknet.experiments import plots

    figures = {}
    save = plots._save

    def inspect_and_save(fig, path):
        axes = fig.axes
        twins = [ax for ax in axes if len(ax.get_shared_x_axes().get_siblings(ax)) > 1]
        titles = [fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in axes]
        figures[path.name] = {"axes": len(axes), "twins": len(twins), "title": " ".join(titles)}
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", inspect_and_save)
    out = tmp_path / "rep"
    assert main(["reproduce", *TINY, "--output", str(out)]) == 0
    report = (out / "report.md").read_text()
    check_markdown_tables(report)
    assert report.splitlines()[2].startswith("> **Smoke run.** The `quick` preset")
    assert "issue" not in report.lower()
    assert set(figures) == set(PLOTS)
    for name, fig in figures.items():
        assert fig["twins"] == 0, name  # no second y-axis anywhere
        assert "synthetic-2k · 1 seed (2021) · preset quick" in fig["title"], (name, fig["title"])
        if name.startswith("table"):
            assert fig["axes"] == 1, name
    assert figures["rq4_mask_heatmaps.png"]["axes"] == 3 * 3 * 2  # rows A, B, A − B; 3 blocks; each with a colour bar
    assert "A − B" in figures["rq4_mask_heatmaps.png"]["title"]
    for section in SECTIONS:
        assert section in report, section
    for plot in PLOTS:
        assert (out / plot).stat().st_size > 10_000, plot
        assert f"]({plot})" in report
    doc = json.loads((out / "results.json").read_text())
    cfg, _ = base_config("quick", None, None, TINY[TINY.index("--set"):][1::2])
    plan = make_plan(cfg, list(ALL_TABLES), 1)
    assert set(doc["cells"]) == set(plan.cells)
    # 8 models + 3 ablations x 2 + 4 other values x 2 x 3 sweeps (the defaults are shared cells)
    assert len(plan.cells) == 8 + 6 + 24
    assert doc["meta"]["cells_run"] == len(plan.cells)
    for cell in doc["cells"].values():
        assert 0.0 <= cell["test"]["auc"] <= 1.0
    assert len(doc["rq4"]["blocks"]) == 3 and doc["rq4"]["instances_analysed"] == 200
    assert {c["id"] for c in doc["claims"]} >= {"t2_sermasknet_beats_baselines", "t3_no_mask", "rq4_near_zero"}

    # resume: drop one cell's result and mark another as trained on other data (an older
    # generator); rerun: exactly those two cells train again
    victim = "paramasknet-emb30-s2021"
    stale = out / "cells" / "fm-base-s2021" / "result.json"
    kept = out / "cells" / "dnn-base-s2021" / "result.json"
    kept_mtime = kept.stat().st_mtime_ns
    (out / "cells" / victim / "result.json").unlink()
    old = json.loads(stale.read_text())
    assert old["data_source"]["generator"].startswith("masknet.data.synthetic v")
    old["data_source"]["generator"] = "masknet.data.synthetic v1"
    stale.write_text(json.dumps(old))
    assert main(["reproduce", *TINY, "--output", str(out)]) == 0
    doc2 = json.loads((out / "results.json").read_text())
    assert doc2["meta"]["cells_run"] == 2 and doc2["meta"]["cells_resumed"] == len(plan.cells) - 2
    assert json.loads(stale.read_text())["data_source"]["generator"] != "masknet.data.synthetic v1"
    assert (out / "cells" / victim / "result.json").is_file()
    assert kept.stat().st_mtime_ns == kept_mtime
    assert doc2["cells"]["dnn-base-s2021"] == doc["cells"]["dnn-base-s2021"]


def check_markdown_tables(text: str) -> None:
    """Render with a Markdown parser: every table block of the source is one table, and each of
    its rows has the header's number of cells."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    tables, cells, current = [], [], None
    for t in tokens:
        if t.type == "table_open":
            current = []
        elif t.type == "tr_open" and current is not None:
            cells = []
        elif t.type in ("th_open", "td_open"):
            cells.append(t.type)
        elif t.type == "tr_close" and current is not None:
            current.append(len(cells))
        elif t.type == "table_close":
            tables.append(current)
            current = None
    blocks, in_block = 0, False
    for line in text.splitlines():
        starts = line.startswith("|")
        blocks += starts and not in_block
        in_block = starts
    assert len(tables) == blocks, f"{blocks} pipe-table blocks in the source, {len(tables)} rendered as tables"
    for rows in tables:
        assert len(rows) >= 2 and len(set(rows)) == 1, rows


def test_table_helper_escapes_pipes():
    from masknet.experiments.report import md_table

    lines = md_table(["share |v| < 0.1", "b"], [["x | y", "two\nlines"]])
    check_markdown_tables("\n".join(lines))
    assert lines[0] == "| share \\|v\\| < 0.1 | b |" and lines[2] == "| x \\| y | two lines |"
    with pytest.raises(ValueError):
        md_table(["a", "b"], [["only one"]])


def test_tables_option_and_errors(capsys):
    assert parse_tables("2,rq4") == ["2", "rq4"]
    assert parse_tables(None) == list(ALL_TABLES)
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--preset", "nope"])
    assert exc.value.code == 2
    assert main(["reproduce", "--tables", "2,7", "--output", "/nonexistent/x"]) == 2
    assert "unknown table '7'" in capsys.readouterr().err


def test_verdicts():
    assert compare([0.80, 0.81, 0.805], [0.70, 0.71, 0.705])["verdict"] == "holds"
    assert compare([0.70, 0.71, 0.705], [0.80, 0.81, 0.805])["verdict"] == "does not hold"
    assert compare([0.80, 0.81, 0.79], [0.801, 0.79, 0.809])["verdict"] == "not resolved"
    assert compare([0.8], [0.7])["verdict"].startswith("not resolved")
    # the paper's "no real difference" (|Δ| < 0.0005)
    assert compare([0.8001, 0.8003, 0.8002], [0.8002, 0.8000, 0.8004], 0.0002)["verdict"].startswith("holds")
    assert compare([0.80, 0.81, 0.79], [0.801, 0.79, 0.809], 0.0002)["verdict"] == "not resolved"
    assert compare([0.81, 0.8101, 0.8102], [0.80, 0.8001, 0.8002], 0.0002)["verdict"].startswith("does not hold")


def test_reproduce_with_equal_tuning(tmp_path):
    """--tune N: one study per model with the same trials and step cap, tuned cells for every seed,
    and each claim's verdict with and without tuning in the report."""
    pytest.importorskip("optuna", reason="--tune needs Optuna (pip install 'masknet[tune]')")
    import csv

    out = tmp_path / "rep"
    tiny = TINY[:2] + TINY[4:]  # without "--seeds 1"
    assert main(["reproduce", *tiny, "--tables", "3", "--seeds", "2", "--tune", "2", "--tune-max-steps", "6", "--output", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    tuning = doc["tuning"]
    assert tuning["budget"] == {"trials": 2, "max_steps": 6, "seed": 0}
    assert set(tuning["models"]) == {"sermasknet", "paramasknet"}
    for model in tuning["models"]:
        with open(out / "tuning" / model / "trials.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 2 and all(int(r["steps"]) <= 6 for r in rows)  # the same cap for every model
    cells = tuning["cells"]
    assert len(cells) == 2 * 4 * 2  # 2 models x 4 variants x 2 seeds
    for cell in cells.values():
        settings = tuning["models"][cell["model"]]["settings"]
        assert cell["config"]["train"]["max_steps"] == 6
        assert cell["config"]["train"]["lr"] == pytest.approx(settings["train.lr"])
    ablated = cells["sermasknet-nomask-s2021"]["config"]["model"]
    assert ablated["use_mask"] is False and ablated["block_dim"] == tuning["models"]["sermasknet"]["settings"]["model.block_dim"]
    report = (out / "report.md").read_text()
    assert "## Under equal tuning (BARS protocol)" in report
    section = report.split("## Under equal tuning (BARS protocol)")[1].split("\n## ")[0]
    assert "| claim (paper) | default protocol | equal tuning |" in section
    assert section.count("the instance-guided mask helps") == 1
    for model, study in tuning["models"].items():  # a study the default won says so in the report
        summary = json.loads((out / "tuning" / model / "summary.json").read_text())
        assert study["is_default"] == summary["best_is_default"]
        row = next(line for line in section.splitlines() if line.startswith(f"| {MODEL_LABELS[model]} |"))
        assert ("the default" in row) == study["is_default"]
    assert {c["id"] for c in tuning["claims"]} == {c["id"] for c in doc["claims"]}
