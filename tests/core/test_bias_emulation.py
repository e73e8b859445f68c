"""The fake-quant forward adds each conv / linear bias the way the deployed integer kernel does: int32 on the grid
input scale x weight scale (onnxruntime's WeightBiasQuantization pass does exactly that to the exported float bias).
Without it the PyTorch model and the deployed model disagree at rounding boundaries."""
import numpy as np
import pytest
import torch
from torch import nn

from ts_qat_pytorch.nn.qat.modules import deployed_bias
from ts_qat_pytorch.prepare_by_platform import BackendType

from .helpers import export_and_run, prepare_and_calibrate


def _mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for layer in m[::2]:
            layer.bias.mul_(4.0)  # biases of the size trained layers have
    return m.eval(), (torch.randn(64, 48),)


def _cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 8, 1))
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return m.eval(), (torch.randn(8, 3, 16, 16),)


def _layers(q):
    return [m for m in q.modules() if hasattr(m, "weight_fake_quant") and getattr(m, "bias", None) is not None
            or hasattr(m, "bn") and getattr(m, "bn", None) is not None]


@pytest.mark.parametrize("build", [_mlp, _cnn], ids=["mlp", "cnn_bn"])
def test_fake_quant_matches_the_deployed_integer_bias(build, tmp_path):
    model, inputs = build()
    # every output quantized (float_outputs off), so ORT and PyTorch can be compared in output steps
    q = prepare_and_calibrate(model, inputs, BackendType.ONNXRuntime, {"extra_quantizer_dict": {"float_outputs": False}})
    layers = _layers(q)
    assert layers and all(m.input_fake_quant is not None for m in layers)

    # the bias each layer adds lies on its int32 grid
    lin = layers[-1]
    with torch.no_grad():
        q(*inputs)
        b = lin.quantized_weight_source()[1]
        grid = lin.input_fake_quant.qparams()[0] * lin.weight_fake_quant.qparams()[0]
        k = deployed_bias(lin, b) / grid
    assert torch.allclose(k, k.round(), atol=1e-3)

    r, outs, ref = export_and_run(q, inputs, tmp_path / "m.onnx")
    assert r.integer_matmul_kernels == r.quantized_layers
    step = r.output_scale[0]
    off_with = np.abs(outs[0] - ref[0]) / step

    # the same model adding float biases (what the forward did before): more outputs one step off
    for m in layers:
        m.link_input_quantizer(None)
    with torch.no_grad():
        ref_float_bias = q(*inputs).numpy()
    off_without = np.abs(outs[0] - ref_float_bias) / step
    assert (off_with > 0.5).mean() <= 0.01, (off_with > 0.5).mean()
    assert (off_with > 0.5).sum() < (off_without > 0.5).sum(), ((off_with > 0.5).sum(), (off_without > 0.5).sum())


def test_bias_gradient_is_straight_through():
    model, inputs = _mlp()
    q = prepare_and_calibrate(model, inputs, BackendType.TSQAT)
    q.train()
    layer = _layers(q)[0]
    q(*inputs).sum().backward()
    g = layer.bias.grad.clone()
    # the same gradient as a float bias: d(out)/d(bias) of a linear layer is the upstream gradient's sum
    assert g.abs().sum() > 0 and torch.isfinite(g).all()


def test_the_input_quantizer_link_is_visible_and_registered_once(tmp_path):
    """The layer's link to its input quantizer shows in repr, and the quantizer stays one entry of named_modules and
    state_dict (a checkpoint's keys do not change), in the model and in a deep copy."""
    model, inputs = _cnn()
    q = prepare_and_calibrate(model, inputs, BackendType.TSQAT)
    layer = q.get_submodule("3")  # the depthwise conv, fed by the first conv's output quantizer
    fq = layer.input_fake_quant
    assert fq is q.get_submodule(fq.qualname) and fq.qualname == "_0_post_act_fake_quantizer"
    assert "input_fake_quant=_0_post_act_fake_quantizer" in repr(layer)
    assert [n for n, m in q.named_modules() if m is fq] == [fq.qualname]
    keys = list(q.state_dict())
    assert not any(k.startswith("3.input_fake_quant") for k in keys) and len(keys) == len(set(keys))
    assert [k for k in keys if k.startswith(fq.qualname + ".")]  # its scale is saved once, under its own name

    copy = __import__("copy").deepcopy(q)
    assert copy.get_submodule("3").input_fake_quant is copy.get_submodule(fq.qualname)
