"""Smoke test of `masknet bench --quick` (no timing assertions) and the FLOP counts it relies on."""

from __future__ import annotations

import json
import math

from masknet.bench.flops import counted_flops_per_sample, linear_flops_per_sample
from masknet.cli import main
from masknet.config import ModelConfig
from masknet.models import build_model

KEYS = ("train_samples_per_s", "train_roofline_fraction", "predict_samples_per_s", "latency_1000_p50_ms",
        "latency_1000_p99_ms", "peak_rss_mb", "data_wait_fraction")


def test_masknet_flops_match_closed_form():
    cards = [7] * 39
    for name in ("sermasknet", "paramasknet"):
        model = build_model(ModelConfig(name=name), cards)
        f = counted_flops_per_sample(model, cards, batch=8)
        assert f.forward == linear_flops_per_sample(model)  # every Linear runs once per row, nothing else multiplies
        assert 2.9 * f.forward < f.train <= 3 * f.forward
    ser = build_model(ModelConfig(name="sermasknet"), cards)
    assert abs(linear_flops_per_sample(ser) / 1e6 - 4.7) < 0.05  # the paper config: ~4.7 MFLOP per row forward


def test_bench_quick(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--quick", "--models", "fm,sermasknet", "--precisions", "fp32", "--threads", "1", "--output", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    # the figures of a --quick run are labelled as a smoke test: above and below the table, last line, JSON
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("SMOKE TEST") and printed[-1].startswith("SMOKE TEST")
    assert sum(line.startswith("SMOKE TEST") for line in printed) == 3
    assert report["smoke_test"].startswith("SMOKE TEST")
    for model in ("fm", "sermasknet"):
        r = report["models"][model]["fp32"]
        assert "error" not in r, r
        for key in KEYS:
            assert key in r
        for key in ("train_samples_per_s", "predict_samples_per_s", "latency_1000_p50_ms", "latency_1000_p99_ms", "peak_rss_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (model, key, r[key])
        assert 0 <= r["data_wait_fraction"] < 1
        assert r["int8_predict_samples_per_s"] > 0
    ser = report["models"]["sermasknet"]["fp32"]
    assert ser["train_roofline_fraction"] > 0 and ser["gemm_gflops"] > 0
    assert report["models"]["fm"]["fp32"]["train_roofline_fraction"] is None  # FM has no matmuls
    assert report["vocab_scaling"]["ratio_large_over_small"] > 0
    # --threads 1 reached every job (each records the intra-op threads it measured with)
    assert {report["models"][m]["fp32"]["threads"] for m in ("fm", "sermasknet")} == {1}
