"""The per-layer error profile (ts_qat_pytorch.analysis.profile): float vs fake-quant outputs of every QAT layer and
activation quantizer, worst first, as a table, a CSV and a PNG."""
from __future__ import annotations

import csv

import torch

from ts_qat_pytorch.analysis import format_profile, plot_profile, profile_layers, write_profile_csv
from ts_qat_pytorch.fake_quantize import QuantizeBase
from ts_qat_pytorch.prepare_by_platform import BackendType

from .helpers import prepare_and_calibrate


def test_profile_rows_worst_first_and_the_model_left_as_it_was(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    x = torch.randn(4, 3, 8, 8)
    q = prepare_and_calibrate(net, x, BackendType.TSQAT, batches=1)
    rows = profile_layers(q, [x])
    assert rows and all(r["cosine"] > 0.9 and r["sqnr_db"] > 15 for r in rows)
    assert [r["sqnr_db"] for r in rows] == sorted(r["sqnr_db"] for r in rows)
    # state restored: still fake-quantizing, observers off
    assert all(m.fake_quant_enabled and not m.observer_enabled for m in q.modules() if isinstance(m, QuantizeBase))
    assert rows[0]["layer"] in format_profile(rows)

    write_profile_csv(rows, str(tmp_path / "out" / "p.csv"))
    with open(tmp_path / "out" / "p.csv", newline="") as f:
        assert [r["layer"] for r in csv.DictReader(f)] == [r["layer"] for r in rows]
    plot_profile(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
