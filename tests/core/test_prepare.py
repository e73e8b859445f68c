import logging

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from ts_qat_pytorch.custom_quantizer import ModelQuantizer, register_model_quantizer
from ts_qat_pytorch.fake_quantize import FixedFakeQuantize, QuantizeBase
from ts_qat_pytorch.nn import qat
from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
from ts_qat_pytorch.quantization import TraceFailure
from ts_qat_pytorch.utils.state import (disable_all, enable_calibration, enable_calibration_quantization,
                                        enable_calibration_woquantization, enable_quantization, freeze_bn_stats)

from .helpers import export_and_run, onnx_quantize_inputs, prepare_and_calibrate


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


def _quantizers(m):
    return {n: q for n, q in m.named_modules() if isinstance(q, QuantizeBase)}


def test_fusion_folds_bn_and_relu_and_keeps_float_model_untouched():
    model = Block().train()
    q = prepare_by_platform(model, BackendType.TSQAT)
    assert isinstance(q, fx.GraphModule)
    assert type(q.conv1) is qat.ConvBnReLU2d and type(q.conv2) is qat.ConvBn2d and type(q.fc) is qat.Linear
    assert isinstance(model.conv1, nn.Conv2d) and type(model.conv1) is nn.Conv2d  # input not modified
    assert q.conv1.weight is not model.conv1.weight
    # BN statistics update in training, and stop once frozen
    enable_calibration(q)
    q(torch.randn(4, 3, 8, 8))
    enable_quantization(q)
    before = q.conv1.bn.running_mean.clone()
    q(torch.randn(4, 3, 8, 8) + 1)
    assert not torch.equal(before, q.conv1.bn.running_mean)
    freeze_bn_stats(q)
    before = q.conv1.bn.running_mean.clone()
    q(torch.randn(4, 3, 8, 8) + 1)
    assert torch.equal(before, q.conv1.bn.running_mean)


def test_fused_training_forward_matches_float_when_quantization_is_off():
    model = Block().train()
    q = prepare_by_platform(model)
    disable_all(q)
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(q(x), model(x), atol=1e-5)
    q.eval(), model.eval()
    assert torch.allclose(q(x), model(x), atol=1e-5)


def test_trains_with_an_ordinary_optimizer_and_scales_learn():
    q = prepare_and_calibrate(Block(), torch.randn(8, 3, 8, 8))
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    scales = {n: m.scale.detach().clone() for n, m in _quantizers(q).items()}
    for _ in range(3):
        loss = F.cross_entropy(q(torch.randn(8, 3, 8, 8)), torch.randint(0, 5, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = [n for n, m in _quantizers(q).items() if not torch.equal(scales[n], m.scale.detach())]
    assert len(moved) >= len(scales) // 2


def test_state_switches():
    q = prepare_by_platform(Block())
    qs = _quantizers(q).values()
    enable_calibration(q)
    assert all(m.observer_enabled and not m.fake_quant_enabled for m in qs)
    enable_quantization(q)
    assert all(not m.observer_enabled and m.fake_quant_enabled for m in qs)
    enable_calibration_woquantization(q, quantizer_type="act_fake_quant")
    assert all(m.observer_enabled == (not m.is_weight) and not m.fake_quant_enabled for m in qs)
    enable_calibration_woquantization(q, quantizer_type="weight_fake_quant")
    assert all(m.observer_enabled == m.is_weight and not m.fake_quant_enabled for m in qs)
    enable_calibration_quantization(q)
    assert all(m.observer_enabled and m.fake_quant_enabled for m in qs)
    disable_all(q)
    assert all(not m.observer_enabled and not m.fake_quant_enabled for m in qs)
    with pytest.raises(ValueError, match="quantizer_type"):
        enable_calibration_woquantization(q, quantizer_type="weights")
    with pytest.raises(ValueError, match="prepare_by_platform"):
        enable_calibration(Block())


def test_excluded_layer_stays_float_in_training_and_export(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    q = prepare_and_calibrate(Block().eval(), x, config={"extra_quantizer_dict": {"exclude_module_name": ["fc"]}})
    assert type(q.fc) is nn.Linear
    r, outs, ref = export_and_run(q, x, tmp_path / "m.onnx")
    assert r.quantized_layers == 2 and r.integer_matmul_kernels == 2  # the two convs, not fc
    import onnx
    g = onnx.load(r.onnx_path).graph
    gemm = [n for n in g.node if n.op_type in ("Gemm", "MatMul")]
    producers = {o: n.op_type for n in g.node for o in n.output}
    assert gemm and producers.get(gemm[0].input[1]) != "DequantizeLinear"


def test_config_errors_list_valid_choices():
    with pytest.raises(ValueError, match="registered backends"):
        prepare_by_platform(Block(), "NoSuchBackend")
    with pytest.raises(ValueError, match="valid keys"):
        prepare_by_platform(Block(), BackendType.TSQAT, {"extra_qconfig": {}})
    with pytest.raises(ValueError, match="valid keys"):
        prepare_by_platform(Block(), BackendType.TSQAT, {"extra_quantizer_dict": {"exclude": ["fc"]}})
    with pytest.raises(ValueError, match="did you mean"):
        prepare_by_platform(Block(), BackendType.TSQAT, {"extra_quantizer_dict": {"exclude_module_name": ["fcc"]}})
    with pytest.raises(ValueError, match="not supported by this backend"):
        prepare_by_platform(Block(), BackendType.TSQAT, {"extra_qconfig_dict": {"w_qscheme": {"bit": 4}}})
    with pytest.raises(ValueError, match="unknown fake quantizer"):
        prepare_by_platform(Block(), BackendType.TSQAT, {"extra_qconfig_dict": {"w_fakequantize": "LSQFake"}})


def test_extra_qconfig_dict_sets_quantizers_and_bits():
    cfg = {"extra_qconfig_dict": {"w_fakequantize": "FixedFakeQuantize", "a_fakequantize": "PACTFakeQuantize",
                                  "w_qscheme": {"bit": 4}, "a_qscheme": {"bit": 6, "symmetry": False},
                                  "a_observer": "PercentileObserver"}}
    q = prepare_by_platform(Block(), BackendType.Experimental, cfg)
    assert isinstance(q.conv1.weight_fake_quant, FixedFakeQuantize)
    assert q.conv1.weight_fake_quant.quant_max == 7
    acts = [m for m in _quantizers(q).values() if not m.is_weight]
    assert acts and all(type(m).__name__ == "PACTFakeQuantize" and m.quant_max == 63 for m in acts)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


class Zeros(nn.Module):
    def forward(self, x):
        return x + torch.zeros(len(x), 3, 1, 1)


class Asserts(nn.Module):
    def forward(self, x):
        assert x.shape[0] > 0
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(self.stem(x))


@pytest.mark.parametrize("model,fix", [(Outer(), "leaf_module"), (Zeros(), "zeros_like"), (Asserts(), "assert")])
def test_untraceable_models_fail_with_module_line_and_fix(model, fix):
    with pytest.raises(TraceFailure) as e:
        prepare_by_platform(model)
    msg = str(e.value)
    assert fix in msg
    assert "test_prepare.py" in msg  # the user's source line
    if isinstance(model, Outer):
        assert "inside module 'inner' (Branchy)" in msg


def test_leaf_module_makes_untraceable_part_float():
    q = prepare_by_platform(Outer(), BackendType.TSQAT, {"leaf_module": [Branchy]})
    assert isinstance(q.inner, Branchy)
    q2 = prepare_by_platform(Outer(), BackendType.TSQAT, {"leaf_module": ["inner"]})
    assert isinstance(q2.inner, Branchy)


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.tag = "keep me"

    def helper(self):
        return self.tag

    def forward(self, x, double: bool = False):
        y = self.conv(x)
        if double:
            y = y * 2
        return y


def test_concrete_args_and_preserve_attr():
    q = prepare_by_platform(Flagged(), BackendType.TSQAT,
                            {"concrete_args": {"double": False}, "preserve_attr": {"": ["tag", "helper"]}})
    assert q.tag == "keep me" and q.helper() == "keep me"


def test_a_new_backend_is_one_registration():
    @register_model_quantizer("TestNPU", {"w_qscheme": {"bit": 8, "symmetry": True, "per_channel": False},
                                          "a_qscheme": {"bit": 8, "symmetry": True},
                                          "w_fakequantize": "FixedFakeQuantize", "a_fakequantize": "FixedFakeQuantize",
                                          "w_observer": "MinMaxObserver", "a_observer": "MinMaxObserver"})
    class TestNPUQuantizer(ModelQuantizer):
        pass

    q = prepare_by_platform(Block(), "TestNPU")
    assert not q.conv1.weight_fake_quant.scheme.per_channel
    assert q.qat_backend == "TestNPU"


def test_rnn_stays_float_with_a_warning(caplog):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 4)

        def forward(self, x):
            return self.lstm(x)[0]

    with caplog.at_level(logging.WARNING, logger="ts_qat_pytorch"):
        q = prepare_by_platform(M())
    assert type(q.lstm) is nn.LSTM
    assert any("'lstm' stays float" in r.getMessage() for r in caplog.records)


def test_activation_quantizers_sit_where_onnxruntime_needs_them(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    q = prepare_and_calibrate(Block().eval(), x)
    r, outs, ref = export_and_run(q, x, tmp_path / "b.onnx")
    assert r.integer_kernels.get("QLinearConv") == 2
    assert r.integer_kernels.get("QLinearAdd") == 1
    assert r.integer_kernels.get("QGemm") == 1
    assert r.integer_kernels.get("QLinearGlobalAveragePool", 0) + r.integer_kernels.get("QLinearReduceMean", 0) \
        + r.integer_kernels.get("QLinearAveragePool", 0) <= 1
    assert {"x", "conv1.weight", "conv2.weight", "fc.weight"} <= onnx_quantize_inputs(r.onnx_path)


def test_mixed_precision_training_step_runs():
    q = prepare_and_calibrate(Block(), torch.randn(4, 3, 8, 8))
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(q(torch.randn(4, 3, 8, 8)), torch.randint(0, 5, (4,)))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in q.parameters())


class AllFusions(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.b1 = nn.BatchNorm1d(4)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.bup = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 8)
        self.bfc = nn.BatchNorm1d(8)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))                    # (N, 4, 16)
        y = self.bup(self.up(y.view(-1, 4, 4, 4)))         # (N, 4, 8, 8)
        return torch.relu(self.bfc(self.fc(y.flatten(1)[:, :64])))


def test_every_documented_fusion_and_float_round_trip(tmp_path):
    from ts_qat_pytorch.utils.utils import save_checkpoint
    model = AllFusions().train()
    x = torch.randn(6, 3, 16)
    model(x)  # move the BN statistics away from their defaults
    q = prepare_and_calibrate(model.eval(), x)
    assert (type(q.c1), type(q.up), type(q.fc)) == (qat.ConvBnReLU1d, qat.ConvTransposeBn2d, qat.LinearBnReLU1d)
    with torch.no_grad():
        disable_all(q)
        assert torch.allclose(q(x), model(x), atol=1e-5)  # folding changes nothing numerically
        enable_quantization(q)
    save_checkpoint(q, str(tmp_path / "f.pth"))
    fresh = AllFusions()
    fresh.load_state_dict(torch.load(tmp_path / "f.pth", weights_only=True))
    assert torch.equal(fresh.bup.running_var, model.bup.running_var)
    r, outs, ref = export_and_run(q, x, tmp_path / "f.onnx")
    assert r.quantized_layers == 3
    assert abs(outs[0] - ref[0]).max() <= 2.01 * r.output_scale[0]


def test_excluding_a_conv_keeps_its_bn_and_relu_float_too():
    q = prepare_and_calibrate(Block().eval(), torch.randn(2, 3, 8, 8),
                              config={"extra_quantizer_dict": {"exclude_module_name": ["conv1"]}})
    assert type(q.conv1) is nn.Conv2d and isinstance(q.bn1, nn.BatchNorm2d)
    quantized_inputs = {n.args[0].name for n in q.graph.nodes
                        if n.op == "call_module" and isinstance(q.get_submodule(n.target), QuantizeBase)}
    assert not {"conv1", "bn1"} & quantized_inputs
