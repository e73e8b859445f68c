"""ptq_reconstruction (AdaRound / BRECQ / QDrop): the learned rounding ends hard and on the grid, lowers the output
error against the float model, exports as integer weights that onnxruntime runs, and QAT can continue from it."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ts_qat_pytorch.advanced_ptq import ReconstructionConfig, ptq_reconstruction
from ts_qat_pytorch.advanced_ptq import reconstruction as rec_module
from ts_qat_pytorch.advanced_ptq.adaround import AdaRoundFakeQuantize
from ts_qat_pytorch.advanced_ptq.segments import split_segments, unit_key
from ts_qat_pytorch.fake_quantize import QuantizeBase
from ts_qat_pytorch.nn.qat import QATMixin
from ts_qat_pytorch.prepare_by_platform import prepare_by_platform
from ts_qat_pytorch.utils.calibrate import calibrate
from ts_qat_pytorch.utils.state import enable_quantization

from .helpers import export_and_run
from .models import TinyBert

W4A8 = {"extra_qconfig_dict": {"w_qscheme": {"bit": 4}, "a_qscheme": {"bit": 8}}}


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(Residual(8), Residual(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layer1(self.stem(x)), 1), 1))


def _calibrated():
    torch.manual_seed(0)
    m = TinyResNet()
    m.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for _ in range(3):
            m(torch.randn(8, 3, 8, 8))
    m.eval()
    q = prepare_by_platform(m, "Experimental", W4A8)
    batches = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    calibrate(q, batches)
    return q, batches


def _layers(q):
    return {n: m for n, m in q.named_modules() if isinstance(m, QATMixin)}


@pytest.fixture(scope="module")
def reconstructed():
    """One block-wise AdaRound run, with the hardened rounding variables recorded as write_back sees them."""
    q, batches = _calibrated()
    nearest = copy.deepcopy(q)
    hardened = {}
    original = rec_module.write_back

    def recording_write_back(layer, ada, base):
        changed = original(layer, ada, base)
        hardened[ada.qualname] = ada.h().clone()
        return changed

    rec_module.write_back = recording_write_back
    lr, rec_module.ROUNDING_LR = rec_module.ROUNDING_LR, 2e-2  # 60 steps here, not the usual 20 000
    try:
        torch.manual_seed(0)
        report = ptq_reconstruction(q, batches, {"pattern": "block", "max_count": 60, "scale_lr": 0.0,
                                                 "warm_up": 0.2, "weight": 0.001, "b_range": [20, 2]})
    finally:
        rec_module.write_back, rec_module.ROUNDING_LR = original, lr
    return q, nearest, batches, report, hardened


def test_rounding_variables_end_at_0_or_1_and_the_weights_on_the_grid(reconstructed):
    q, nearest, _, report, hardened = reconstructed
    assert report.model is q
    assert [u.name for u in report.units] == ["stem.0", "layer1.0", "layer1.1", "fc"]
    assert hardened, "no layer was reconstructed"
    for name, h in hardened.items():
        assert set(h.unique().tolist()) <= {0.0, 1.0}, name
    # the AdaRound quantizers are gone again: the model is an ordinary prepared model
    assert not any(isinstance(m, AdaRoundFakeQuantize) for m in q.modules())
    changed = 0
    fitted = {n for u in report.units if not u.reverted for n in u.layers}  # reverted: float weights kept
    for name, layer in _layers(q).items():
        if name not in fitted:
            continue
        w = layer.quantized_weight_source()[0]
        step = layer.weight_fake_quant.qparams()[0].max()
        with torch.no_grad():  # round-to-nearest of the weight is the weight: the export keeps the learned rounding
            assert (layer.weight_fake_quant(w) - w).abs().max() <= 1e-4 * step, f"{name}: weight is off its grid"
        before = nearest.get_submodule(name)
        with torch.no_grad():
            changed += int((layer.weight_fake_quant(w) != before.weight_fake_quant(
                before.quantized_weight_source()[0])).sum())
    assert changed > 0, "AdaRound kept every round-to-nearest decision"


def test_block_reconstruction_lowers_the_output_error_of_the_residual_blocks(reconstructed):
    _, _, _, report, _ = reconstructed
    for unit in report.units:
        assert unit.loss_after <= unit.loss_before, unit
        assert unit.seconds >= 0
    blocks = [u for u in report.units if u.name.startswith("layer1")]
    assert all(len(u.layers) == 2 for u in blocks)
    assert sum(u.loss_after for u in blocks) < 0.9 * sum(u.loss_before for u in blocks)
    assert any(v > 0 for u in blocks for v in u.rounding_changed.values())
    assert "loss before" in report.table(), report.table()


def test_reconstructed_model_exports_integer_weights_that_onnxruntime_agrees_with(reconstructed, tmp_path):
    q, _, batches, _, _ = reconstructed
    r, outs, ref = export_and_run(q, batches[0], tmp_path / "adaround.onnx")
    assert r.integer_matmul_kernels == r.quantized_layers
    steps = np.abs(outs[0] - ref[0]) / r.output_scale[0]
    assert steps.max() <= 1.0, steps.max()


def test_qat_continues_from_the_reconstructed_model(reconstructed):
    q = copy.deepcopy(reconstructed[0])
    batches = reconstructed[2]
    q.train()
    enable_quantization(q)
    opt = torch.optim.SGD(q.parameters(), lr=0.05, momentum=0.9)
    labels = torch.tensor([0, 1, 2, 3])
    losses = []
    w0 = q.fc.weight.detach().clone()
    for step in range(4):
        loss = F.cross_entropy(q(batches[step % len(batches)]), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] != losses[0]
    assert not torch.equal(w0, q.fc.weight.detach())


def test_layer_pattern_with_qdrop_and_learned_activation_scales():
    q, batches = _calibrated()
    scales = {n: m.scale.detach().clone() for n, m in q.named_modules()
              if isinstance(m, QuantizeBase) and not m.is_weight}
    report = ptq_reconstruction(q, batches, ReconstructionConfig(pattern="layer", max_count=10, prob=0.5,
                                                                 scale_lr=1e-2))
    assert [u.name for u in report.units] == [n for n in _layers(q)]
    assert all(u.loss_after <= u.loss_before for u in report.units)
    moved = [n for n, s in scales.items() if not torch.equal(s, q.get_submodule(n).scale.detach())]
    assert moved or all(u.reverted for u in report.units)
    assert all(p.requires_grad for p in q.parameters())  # the caller's flags are restored


def test_unknown_config_key_is_an_error_listing_the_valid_ones():
    q, batches = _calibrated()
    with pytest.raises(ValueError, match=r"max_cout.*valid keys.*'max_count'.*did you mean \['max_count'\]"):
        ptq_reconstruction(q, batches, {"max_cout": 10})
    with pytest.raises(ValueError, match="pattern"):
        ReconstructionConfig.from_any({"pattern": "blocks"})
    with pytest.raises(ValueError, match="prob"):
        ReconstructionConfig(prob=0.0)
    assert ReconstructionConfig.from_any({"b_range": [10, 2]}).b_range == (10.0, 2.0)


def test_uncalibrated_model_is_an_error_that_says_calibrate():
    q = prepare_by_platform(TinyResNet().eval(), "Experimental", W4A8)
    with pytest.raises(RuntimeError, match="calibrate"):
        ptq_reconstruction(q, [torch.randn(2, 3, 8, 8)], {"max_count": 1})


def test_blocks_follow_the_module_tree_residual_blocks_and_transformer_layers():
    assert unit_key("layer1.0.conv1", "block") == "layer1.0"
    assert unit_key("features.3.conv.0.0", "block") == "features.3"
    assert unit_key("bert.encoder.layer.5.attention.self.query", "block") == "bert.encoder.layer.5"
    assert unit_key("fc", "block") == "fc"
    assert unit_key("features.3.conv.0.0", "block", block_depth=1) == "features"
    assert unit_key("layer1.0.conv1", "layer") == "layer1.0.conv1"
    ids = torch.randint(0, 100, (2, 16))
    q = prepare_by_platform(TinyBert().eval(), "Experimental", W4A8)
    calibrate(q, [ids])
    segments = split_segments(q, "block")
    assert [s.name for s in segments] == ["layers.0", "layers.1", "cls"]
    assert len(segments[1].layers) == 6 and len(segments[1].outputs) == 1
    report = ptq_reconstruction(q, [ids], {"max_count": 3, "prob": 0.5})
    assert len(report.units) == 3
