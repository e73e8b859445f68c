"""Scripts written for MQBench (the documented API's ancestor) run: its switches, config keys, quantizers,
observers and modules."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ts_qat_pytorch.fake_quantize import FAKE_QUANTIZERS, QuantizeBase
from ts_qat_pytorch.fake_quantize.dsq import DSQFakeQuantize, soft_round
from ts_qat_pytorch.nn import qat
from ts_qat_pytorch.observer import OBSERVERS, ClipStdObserver, MinMaxObserver
from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
from ts_qat_pytorch.scheme import QuantScheme
from ts_qat_pytorch.utils.calibrate import calibrate
from ts_qat_pytorch.utils.state import (enable_calibration_quantization, enable_calibration_woquantization,
                                        enable_quantization)

from .helpers import export_and_run
from .test_prepare import Block

X = torch.randn(4, 3, 8, 8)


def _kinds(q):
    fqs = [m for m in q.modules() if isinstance(m, QuantizeBase)]
    return [m for m in fqs if m.is_weight], [m for m in fqs if not m.is_weight]


def test_enable_calibration_switches_turn_the_other_kind_off():
    q = prepare_by_platform(Block())
    weights, acts = _kinds(q)
    enable_quantization(q)
    enable_calibration_quantization(q, quantizer_type="weight_fake_quant")
    assert all(m.observer_enabled and m.fake_quant_enabled for m in weights)
    assert not any(m.observer_enabled or m.fake_quant_enabled for m in acts)
    enable_quantization(q)
    enable_calibration_woquantization(q, quantizer_type="act_fake_quant")
    assert all(m.observer_enabled and not m.fake_quant_enabled for m in acts)
    assert not any(m.observer_enabled or m.fake_quant_enabled for m in weights)


class MyBatchNorm2d(nn.BatchNorm2d):
    """A project's own BatchNorm: not in the default fusion table."""


class ConvMyBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = MyBatchNorm2d(4)
        self.relu = nn.ReLU6()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def test_extra_fuse_dict_adds_fusion_patterns():
    plain = prepare_by_platform(ConvMyBn(), BackendType.TSQAT, {"leaf_module": [MyBatchNorm2d]})
    assert type(plain.conv) is qat.Conv2d  # not fused by default
    extra = {"additional_fuser_method_mapping": {(nn.Conv2d, MyBatchNorm2d, nn.ReLU6): qat.ConvBnReLU2d}}
    q = prepare_by_platform(ConvMyBn(), BackendType.TSQAT, {"extra_fuse_dict": extra})
    assert type(q.conv) is qat.ConvBnReLU2d and isinstance(q.conv.bn, MyBatchNorm2d) and q.conv.bn_name == "bn"
    assert "self.bn(" not in q.code and "self.relu(" not in q.code

    def fuser(layer, bn, act, weight_qconfig, bn_name):  # a function with from_modules' signature works too
        return qat.ConvBn2d.from_modules(layer, bn, None, weight_qconfig, bn_name)

    class ConvMyBnOnly(ConvMyBn):
        def forward(self, x):
            return self.bn(self.conv(x))

    extra = {"additional_fuser_method_mapping": {(nn.Conv2d, MyBatchNorm2d): fuser}}
    q = prepare_by_platform(ConvMyBnOnly(), BackendType.TSQAT, {"extra_fuse_dict": extra})
    assert type(q.conv) is qat.ConvBn2d


def _mqbench_fuser(is_qat, conv, bn):
    return conv


@pytest.mark.parametrize("extra,match", [
    ({"fuser_mapping": {}}, "unknown extra_fuse_dict keys"),
    ({"additional_fuser_method_mapping": {nn.Conv2d: qat.ConvBn2d}}, "not a tuple of 2 or 3 nn.Module classes"),
    ({"additional_fuser_method_mapping": {(nn.Conv2d, nn.BatchNorm2d, nn.SiLU): qat.ConvBnReLU2d}},
     "only \\['ReLU', 'ReLU6'\\] fold into a layer"),
    ({"additional_fuser_method_mapping": {(nn.Conv2d, MyBatchNorm2d): "ConvBn2d"}}, "neither a fused QAT class"),
    ({"additional_fuser_method_mapping": {(nn.Conv2d, MyBatchNorm2d): _mqbench_fuser}}, "MQBench / torch.ao fuser"),
    ({"additional_fuser_method_mapping": {(nn.Conv2d, nn.LayerNorm): qat.ConvBn2d}}, "folds a BatchNorm"),
])
def test_malformed_extra_fuse_dict_entries_are_clear_errors(extra, match):
    with pytest.raises(ValueError, match=match):
        prepare_by_platform(ConvMyBn(), BackendType.TSQAT, {"extra_fuse_dict": extra})


def test_dsq_soft_rounding_is_hard_forward_and_tanh_backward():
    u = torch.tensor([0.0, 0.3, 0.5001, 1.0, 1.45, 1.7], requires_grad=True)
    out = soft_round(u, alpha=0.4)
    assert torch.equal(out.detach(), torch.round(u.detach()))
    out.sum().backward()
    g = u.grad
    assert (g > 0).all() and g[4] > g[3]  # steepest at a step's edge (x.5), flattest at an integer
    k = torch.tensor(2 / 0.4 - 1).log()
    assert float(g[3]) == pytest.approx(float(0.5 * k * (1 - torch.tanh(-k / 2) ** 2) / 0.6), rel=1e-5)


def test_dsq_and_clip_std_prepare_calibrate_train_and_export(tmp_path):
    assert FAKE_QUANTIZERS["DSQFakeQuantize"] is DSQFakeQuantize and OBSERVERS["ClipStdObserver"] is ClipStdObserver
    cfg = {"extra_qconfig_dict": {"w_fakequantize": "DSQFakeQuantize", "a_fakequantize": "DSQFakeQuantize",
                                  "a_observer": "ClipStdObserver", "a_observer_params": {"std_scale": 3.0},
                                  "w_fakeq_params": {"alpha": 0.2}}}
    q = prepare_by_platform(Block().eval(), BackendType.TSQAT, cfg)
    assert isinstance(q.conv1.weight_fake_quant, DSQFakeQuantize) and q.conv1.weight_fake_quant.alpha == 0.2
    assert isinstance(q.x_post_act_fake_quantizer.activation_post_process, ClipStdObserver)
    calibrate(q, [X, X * 0.5])
    q.train()
    F.cross_entropy(q(X), torch.arange(4)).backward()
    assert q.conv1.weight_fake_quant.scale.grad.abs().sum() > 0
    assert q.x_post_act_fake_quantizer.scale.grad.abs().sum() > 0
    q.eval()
    r, outs, ref = export_and_run(q, X, tmp_path / "dsq.onnx")
    scale = r.output_scale[0]
    assert abs(outs[0] - ref[0]).max() <= 1.01 * scale


def test_clip_std_observer_clips_outliers_to_k_standard_deviations():
    x = torch.randn(20000)
    x[0] = 50.0
    obs = ClipStdObserver(QuantScheme(symmetry=False), std_scale=3.0)
    obs(x)
    std, mean = torch.std_mean(x, correction=0)
    assert float(obs.max_val) == pytest.approx(float(mean + 3 * std), rel=1e-5)
    assert float(obs.min_val) == pytest.approx(max(float(x.min()), float(mean - 3 * std)), rel=1e-5)
    mm = MinMaxObserver(QuantScheme(symmetry=False))
    mm(x)
    assert obs.calculate_qparams()[0] < mm.calculate_qparams()[0] / 5
    with pytest.raises(ValueError, match="std_scale"):
        ClipStdObserver(QuantScheme(), std_scale=0)


def test_custom_symbolic_opset_is_importable_and_says_what_it_holds():
    mod = importlib.import_module("ts_qat_pytorch.custom_symbolic_opset")
    from ts_qat_pytorch.onnx.freeze import freeze_for_export
    from ts_qat_pytorch.onnx.qdq import QDQ
    assert mod.QDQ is QDQ and mod.freeze_for_export is freeze_for_export and sorted(mod.__all__) == [
        "QDQ", "freeze_for_export"]
    assert "registers none" in mod.__doc__


def test_unknown_leaf_module_names_are_errors_with_close_matches():
    with pytest.raises(ValueError, match=r"leaf_module: no module named 'conv11' in Block; did you mean \['conv1'"):
        prepare_by_platform(Block(), BackendType.TSQAT, {"leaf_module": ["conv11"]})
    with pytest.raises(ValueError, match="nn.Module classes or qualified module names"):
        prepare_by_platform(Block(), BackendType.TSQAT, {"leaf_module": [nn.ReLU()]})
    q = prepare_by_platform(Block(), BackendType.TSQAT, {"leaf_module": ["pool", nn.AdaptiveAvgPool2d]})
    assert isinstance(q.pool, nn.AdaptiveAvgPool2d)
