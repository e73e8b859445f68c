"""The imagenet suite with the fast post-training flags: a smoke run of --cle --bias-correction, PTQ only, on the
embedded default's mobilenet_v2 (every ReLU6 of its expand / depthwise chains replaced by ReLU, equalized, the
calibrated model bias-corrected, exported and run in onnxruntime)."""
from __future__ import annotations

import torch

from suites.common.metrics import load_metrics
from suites.imagenet import main as suite_main

from test_imagenet_suite import ARCH, SMOKE  # noqa: E402  (this folder is on sys.path, no package)


def test_smoke_cle_and_bias_correction_ptq_only(tmp_path, capsys):
    out = tmp_path / "out"
    rc = suite_main.main(SMOKE + ["--output-dir", str(out), "--cache-dir", str(out / "cache"), "--val-images", "64",
                                  "--cle", "--bias-correction", "--epochs", "0", "--metrics", str(out / "m.json")])
    assert rc == 0
    m = load_metrics(out / "m.json")
    cle, bc = m["extras"]["cle"], m["extras"]["bias_correction"]
    assert len(cle["folded"]) == 52 and len(cle["relu6_replaced"]) == 34 and cle["output_change"]["cle"] < 1e-4
    assert cle["float_after"] is not None and cle["float_before"] == m["float"]
    assert len(bc["layers"]) == 53 and bc["corrected"] == m["qat"]
    assert sum(r["shift_after"] for r in bc["layers"]) < 0.5 * sum(r["shift_before"] for r in bc["layers"])
    assert m["ort"] is not None and abs(m["ort"] - m["qat"]) <= 5.0
    assert m["integer_matmul_kernels"] == m["quantized_layers"] == 53
    ck = torch.load(out / "imagenet" / f"{ARCH}_checkpoint.pth", weights_only=True)
    assert ck["float_tools"] == {"cle": True}
    log = capsys.readouterr().out
    assert "=> CLE: 52 BatchNorms folded, 16 chains (52 layers) equalized, 34 ReLU6 -> ReLU" in log
    assert "=> float after CLE top-1" in log and "=> PTQ bias-corrected top-1" in log
