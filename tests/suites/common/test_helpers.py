"""Helpers in suites/common that every suite uses: progress lines, baselines."""
from __future__ import annotations

import json

from suites.common.regression import compare_metrics, format_table


def test_regression_compare(tmp_path):
    metrics = {"float_top1": 92.5, "qat_top1": 92.4, "integer_kernels": {"QLinearConv": 52}}
    base = tmp_path / "b.json"
    base.write_text(json.dumps([{"metric": "float_top1", "value": 92.4, "tolerance": 0.3},
                                {"metric": "integer_kernels.QLinearConv", "value": 52, "tolerance": 0}]))
    rows, ok = compare_metrics(metrics, base)
    assert ok and [r["verdict"] for r in rows] == ["PASS", "PASS"]
    base.write_text(json.dumps([{"metric": "float_top1", "value": 95.0, "tolerance": 0.3},
                                {"metric": "ort_top1", "value": 92.0, "tolerance": 0.5}]))
    rows, ok = compare_metrics(metrics, base)
    assert not ok and [r["verdict"] for r in rows] == ["FAIL", "MISSING"]
    table = format_table(rows)
    assert "metric" in table and "FAIL" in table and "95" in table


def test_meters_format():
    from suites.common.meters import AverageMeter, ProgressMeter
    lines = []
    t = AverageMeter("Time", ":6.3f")
    loss = AverageMeter("Loss", ":.4e")
    a1 = AverageMeter("Acc@1", ":6.2f")
    t.update(12.614)
    loss.update(1.1625)
    a1.update(71.48)
    p = ProgressMeter(2503, [t, loss, a1], prefix="Epoch: [0]", printer=lines.append, use_tqdm=False)
    p.step(0)
    assert lines == ["Epoch: [0][   0/2503] Time 12.614 (12.614) Loss 1.1625e+00 (1.1625e+00) Acc@1  71.48 ( 71.48)"]
    p.display_summary()
    assert lines[-1] == " * Time 12.614 Loss 1.163 Acc@1 71.480"
