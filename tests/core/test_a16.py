"""16-bit activations for chosen layers (W8A16, as AIMET offers): ``module_qconfig`` with ``a_qscheme`` bit 16 under
TSQAT, fake-quantized on a 0..65535 grid and exported at opset 21 as uint16 QuantizeLinear/DequantizeLinear that
onnxruntime runs."""
import importlib
import logging

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, numpy_helper
from torch import nn

from ts_qat_pytorch.fake_quantize import QuantizeBase
from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform

from .helpers import export_and_run, max_steps, prepare_and_calibrate, qparams

ce = importlib.import_module("ts_qat_pytorch.convert_export")  # the module (the flat name is the function)

A16 = {"a_qscheme": {"bit": 16}}


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv3(self.conv2(self.conv1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _small():
    torch.manual_seed(0)
    return SmallNet().eval()


def _ranges(q):
    return {n: (m.quant_min, m.quant_max) for n, m in q.named_modules() if isinstance(m, QuantizeBase)}


def _qdq_pairs(model: onnx.ModelProto, tensor: str):
    """The QuantizeLinear of ``tensor``, the DequantizeLinear nodes reading it, and the initializers by name."""
    inits = {i.name: i for i in model.graph.initializer}
    (q,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor]
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]
    return q, dqs, inits


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_one_layer_w8a16_exports_uint16_qdq_that_onnxruntime_runs(exporter, tmp_path, caplog):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q = prepare_and_calibrate(_small(), x, BackendType.TSQAT, {"module_qconfig": {"conv2": A16}})
    ranges = _ranges(q)
    wide = {n for n, r in ranges.items() if r == (0, 65535)}
    # the layer's input (conv1's output) and output; its weight and every other quantizer stay 8-bit
    assert wide == {"conv1_0_post_act_fake_quantizer", "conv2_0_post_act_fake_quantizer"}, ranges
    assert ranges["conv2.0.weight_fake_quant"] == (-128, 127)
    assert all(r in ((0, 255), (-128, 127)) for n, r in ranges.items() if n not in wide)
    # the LSQ quantizer (fused CPU kernel) computes torch's own 16-bit fake quantization
    fq = q.get_submodule("conv2_0_post_act_fake_quantizer")
    s, z = fq.qparams()
    probe = torch.randn(2, 16, 16, 16) * 4
    torch.testing.assert_close(fq(probe), torch.fake_quantize_per_tensor_affine(probe, float(s), int(z), 0, 65535),
                               rtol=0, atol=0)
    # and its gradients in training (input and learned scale) are those of torch's learnable kernel
    fq.train()
    xa, xb = probe.clone().requires_grad_(), probe.clone().requires_grad_()
    fq(xa).square().sum().backward()
    s_ref = fq.scale.detach().clone().requires_grad_()
    torch._fake_quantize_learnable_per_tensor_affine(xb, s_ref, fq.zero_point.detach(), 0, 65535,
                                                     1.0 / (probe.numel() * 65535) ** 0.5).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
    torch.testing.assert_close(fq.scale.grad, s_ref.grad, rtol=1e-4, atol=0)
    fq.eval()
    fq.scale.grad = None

    with caplog.at_level(logging.WARNING, logger="ts_qat_pytorch"):
        r, outs, ref = export_and_run(q, x, tmp_path / "m.onnx", opset_version=21, exporter=exporter,
                                      qparams_path=str(tmp_path / "q.json"))
    assert r.exporter == exporter and r.opset_version == 21
    assert not any("bits: exported as 8-bit" in rec.getMessage() for rec in caplog.records)
    assert max_steps(outs[0], ref[0], r.output_scale[0]) <= 2
    tensors = qparams(tmp_path / "q.json")["tensors"]
    sixteen = {k: t for k, t in tensors.items() if t["bit"] == 16}
    assert {t["quantizer"] for t in sixteen.values()} == wide
    model = onnx.load(r.onnx_path)
    for name, t in sixteen.items():
        assert (t["quant_min"], t["quant_max"], t["onnx_dtype"]) == (0, 65535, "uint16")
        assert t["onnx_zero_point"] == t["zero_point"] and 0 <= t["zero_point"][0] <= 65535
        qn, dqs, inits = _qdq_pairs(model, name)
        assert dqs
        for node in [qn, *dqs]:
            zp = inits[node.input[2]]
            assert zp.data_type == TensorProto.UINT16
            assert int(numpy_helper.to_array(zp)) == t["zero_point"][0]
            assert float(numpy_helper.to_array(inits[node.input[1]])) == pytest.approx(t["scale"][0], rel=1e-6)
    eight = [k for k, t in tensors.items() if t["kind"] == "activation" and t["bit"] == 8]
    assert eight and all(tensors[k]["onnx_dtype"] == "uint8" for k in eight)
    qn, _, inits = _qdq_pairs(model, eight[0])
    assert inits[qn.input[2]].data_type == TensorProto.UINT8


def test_mobilenet_v2_block_at_16_bits_agrees_with_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    calib = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    q = prepare_and_calibrate(model, calib, BackendType.TSQAT, {"module_qconfig": {"features.3": A16}})
    layers = {n.rsplit(".weight_fake_quant", 1)[0] for n, r in _ranges(q).items() if n.endswith("weight_fake_quant")}
    assert {"features.3.conv.0.0", "features.3.conv.1.0", "features.3.conv.2"} <= layers
    wide = {n for n, r in _ranges(q).items() if r == (0, 65535)}
    assert "features_2_conv_2_post_act_fake_quantizer" in wide  # the block's input
    assert len(wide) == 4 and not any(n.startswith("features.3.") for n in wide)  # activations only

    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    r, outs, ref = export_and_run(q, x, tmp_path / "mb.onnx", opset_version=21)
    assert (np.argmax(outs[0], 1) == np.argmax(ref[0], 1)).sum() >= 7
    assert max_steps(outs[0], ref[0], r.output_scale[0]) <= 4
    tensors = qparams(r.qparams_path)["tensors"]
    sixteen = {k for k, t in tensors.items() if t["bit"] == 16}
    assert len(sixteen) == 4 and all(tensors[k]["onnx_dtype"] == "uint16" for k in sixteen)
    model_proto = onnx.load(r.onnx_path)
    for name in sixteen:
        qn, _, inits = _qdq_pairs(model_proto, name)
        assert inits[qn.input[2]].data_type == TensorProto.UINT16
    assert r.integer_matmul_kernels > 0  # the 8-bit layers still run as integer kernels


def test_opset_below_21_is_refused_before_any_export_work(tmp_path, monkeypatch):
    q = prepare_by_platform(_small(), BackendType.TSQAT, {"module_qconfig": {"conv2": A16}})  # not even calibrated

    def no_work(*args, **kwargs):
        raise AssertionError("convert_export froze the model before checking the opset")

    monkeypatch.setattr(ce, "freeze_for_export", no_work)
    with pytest.raises(ValueError, match=r"opset_version=21"):
        ce.convert_export(q, torch.randn(1, 3, 32, 32), str(tmp_path / "m.onnx"), opset_version=18)
    assert not list(tmp_path.iterdir())


def test_unsupported_widths_say_what_tsqat_accepts():
    with pytest.raises(ValueError, match=r"module_qconfig\['conv2'\].*a_qscheme bit=12.*16 for activations"):
        prepare_by_platform(_small(), BackendType.TSQAT, {"module_qconfig": {"conv2": {"a_qscheme": {"bit": 12}}}})
    with pytest.raises(ValueError, match=r"w_qscheme bit=16.*activations only"):
        prepare_by_platform(_small(), BackendType.TSQAT, {"module_qconfig": {"conv2": {"w_qscheme": {"bit": 16}}}})
    with pytest.raises(ValueError, match=r"a_qscheme bit=16 is not supported"):  # only TSQAT offers 16 bits
        prepare_by_platform(_small(), BackendType.Experimental, {"module_qconfig": {"conv2": A16}})


def test_model_wide_signed_16_bit_activations_export_as_int16(tmp_path):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = {"extra_qconfig_dict": {"a_qscheme": {"bit": 16, "symmetry": True}}}
    q = prepare_and_calibrate(_small(), x, BackendType.TSQAT, cfg)
    acts = [m for m in q.modules() if isinstance(m, QuantizeBase) and not m.is_weight]
    assert acts and all((m.quant_min, m.quant_max) == (-32768, 32767) for m in acts)
    r, outs, ref = export_and_run(q, x, tmp_path / "s.onnx", opset_version=21)
    assert max_steps(outs[0], ref[0], r.output_scale[0]) <= 2
    model = onnx.load(r.onnx_path)
    tensors = qparams(r.qparams_path)["tensors"]
    for name, t in tensors.items():
        if t["kind"] == "activation":
            assert t["onnx_dtype"] == "int16"
            qn, _, inits = _qdq_pairs(model, name)
            assert inits[qn.input[2]].data_type == TensorProto.INT16
