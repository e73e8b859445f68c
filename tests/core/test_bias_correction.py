"""advanced_ptq.bias_correction: the measured mean output shift of each quantized layer goes to ~0 on the
calibration data, the correction lands in the bias the export writes (BN beta for folded layers, a new bias where
there was none), and reconstruction after it still fits to the float model."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ts_qat_pytorch.advanced_ptq import bias_correction, ptq_reconstruction
from ts_qat_pytorch.prepare_by_platform import prepare_by_platform
from ts_qat_pytorch.utils.calibrate import calibrate
from ts_qat_pytorch.utils.state import disable_all

from .helpers import export_and_run

# 4-bit per-tensor weights: a mean shift large enough to see; GELU is not fused, so each layer's module output is
# its pre-activation (what the test measures independently of the code under test)
W4_PER_TENSOR = {"extra_qconfig_dict": {"w_qscheme": {"bit": 4, "per_channel": False}}}


def net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.GELU(),
                      nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False), nn.GELU(),
                      nn.Conv2d(12, 8, 1), nn.GELU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.2, 0.2)
        m[1].running_var.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
    return m.eval()


def _batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]


def _calibrated(model=None, cfg=W4_PER_TENSOR):
    q = prepare_by_platform(model or net(), "Experimental", cfg)
    calibrate(q, _batches())
    return q


LAYERS = ["0", "3", "5", "8"]


def _shifts(q, fp, batches) -> dict[str, torch.Tensor]:
    """Per layer: the per-channel mean of (quantized output) - (float output) over the batches."""
    def means(model):
        acc = {}
        hooks = [model.get_submodule(n).register_forward_hook(
            lambda mod, a, out, n=n: acc.setdefault(n, []).append(
                out.detach().reshape(-1, out.shape[-1]).mean(0) if out.dim() == 2 else out.detach().mean((0, 2, 3))))
            for n in LAYERS]
        with torch.no_grad():
            for b in batches:
                model(b)
        for h in hooks:
            h.remove()
        return {n: torch.stack(v).mean(0) for n, v in acc.items()}
    mq, mf = means(q), means(fp)
    return {n: mq[n] - mf[n] for n in LAYERS}


def test_bias_correction_removes_the_mean_output_shift_on_the_calibration_data():
    q = _calibrated()
    fp = copy.deepcopy(q)
    disable_all(fp)
    batches = _batches()
    before = _shifts(q, fp, batches)
    q2, report = bias_correction(q, batches)
    assert q2 is q and [r.layer for r in report.layers] == LAYERS and not report.skipped
    after = _shifts(q, fp, batches)
    for n in LAYERS:
        b, a = float(before[n].abs().mean()), float(after[n].abs().mean())
        # what is left is the rounding of the deployed bias to its int32 grid (input scale x weight scale), before
        # and after the correction: at most one step
        layer = q.get_submodule(n)
        step = float(layer.input_fake_quant.qparams()[0] * layer.weight_fake_quant.qparams()[0])
        assert a < 0.2 * b or float(after[n].abs().max()) <= step + 1e-6, (n, b, a, step)
    assert sum(float(after[n].abs().mean()) for n in LAYERS) < 0.2 * sum(float(before[n].abs().mean())
                                                                        for n in LAYERS)
    # the report measures the same thing
    assert sum(r.shift_after for r in report.layers) < 0.2 * sum(r.shift_before for r in report.layers)
    assert all(abs(r.shift_after - float(after[r.layer].abs().mean())) < 1e-5 for r in report.layers)
    assert {r.layer: r.target for r in report.layers} == {"0": "bn.bias", "3": "new bias", "5": "bias", "8": "bias"}
    assert q.get_submodule("3").bias is not None
    assert "shift before" in report.table() and report.to_dict()["layers"][0]["layer"] == "0"


def test_the_corrected_model_exports_and_keeps_the_float_reference(tmp_path):
    q = _calibrated()
    ref = copy.deepcopy(q)
    disable_all(ref)
    x = _batches(1)[0]
    q, report = bias_correction(q, _batches())
    with torch.no_grad():  # the report's float model is the float model as it was, not the corrected one
        assert torch.equal(report.float_model(x), ref(x))
    r, outs, torch_out = export_and_run(q, x[:2], tmp_path / "bc.onnx")
    assert r.quantized_layers == 4
    assert abs(outs[0] - torch_out[0]).max() <= 1e-4 * max(1.0, abs(torch_out[0]).max())
    # reconstruction after the correction fits to that float reference
    rec = ptq_reconstruction(q, _batches(2), {"pattern": "layer", "max_count": 2, "scale_lr": 0.0},
                             float_model=report.float_model)
    assert len(rec.units) == 4


def test_bias_correction_needs_a_calibrated_prepared_model():
    with pytest.raises(ValueError, match="prepare_by_platform"):
        bias_correction(net(), _batches())
    with pytest.raises(RuntimeError, match="bias_correction needs a calibrated model"):
        bias_correction(prepare_by_platform(net(), "Experimental", W4_PER_TENSOR), _batches())
