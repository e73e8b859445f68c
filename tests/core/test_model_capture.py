"""The architectures users bring (issue: 49 timm / torchvision models): what torch.fx alone cannot capture, the
building blocks model libraries use instead of torch's own modules, and export on torch's current exporter."""
import logging

import numpy as np
import onnx
import pytest
import timm.layers
import torch
import torch.nn.functional as F
from torch import nn

from ts_qat_pytorch import BackendType, convert_export, prepare_by_platform
from ts_qat_pytorch.nn.qat import LinearBn1d
from ts_qat_pytorch.onnx.verify import optimized_op_counts
from ts_qat_pytorch.quantization.tracer import TraceFailure
from ts_qat_pytorch.utils.state import disable_all, enable_calibration, enable_quantization


def _calibrate(gm, *inputs):
    gm.eval()
    enable_calibration(gm)
    with torch.no_grad():
        for _ in range(2):
            gm(*inputs)
    enable_quantization(gm)
    return gm


def _export(gm, x, tmp_path):
    r = convert_export(gm, x, str(tmp_path / "m.onnx"))
    return r, optimized_op_counts(r.onnx_path)


def _computes_the_float_model(gm, model, x, modes=(False, True), tol=1e-4):
    """Quantizers off, the prepared model computes the float model (eval: running statistics; train: batch ones)."""
    disable_all(gm)
    for train in modes:
        model.train(train), gm.train(train)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=tol, atol=tol)


class NormActNet(nn.Module):
    """timm's way: a conv, then BatchNormAct2d (BatchNorm, dropout and activation in one module)."""

    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = timm.layers.BatchNormAct2d(8, act_layer=act)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU])
def test_timm_norm_act_layers_fold_into_their_conv(act, tmp_path):
    model = NormActNet(act)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    gm = prepare_by_platform(model, BackendType.TSQAT)
    assert type(gm.conv).__name__ == ("ConvBnReLU2d" if act is nn.ReLU else "ConvBn2d")  # ReLU folds too
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for n, m in gm.named_modules() if n != "conv.bn")
    # the BatchNorm keeps its float-model name: the float state_dict maps back
    assert gm.conv.bn_name == "bn"
    x = torch.randn(4, 3, 8, 8)
    _computes_the_float_model(gm, model, x)
    r, ops = _export(_calibrate(gm, x), x, tmp_path)
    assert r.exporter == "dynamo"
    assert "BatchNormalization" not in ops and ops["QLinearConv"] == 2, ops


def test_a_linear_batch_norm_over_tokens_folds(tmp_path):
    """LeViT's LinearNorm: linear -> flatten(0, 1) -> BatchNorm1d -> reshape_as: one BatchNorm over all tokens."""
    from timm.models.levit import LinearNorm
    model = nn.Sequential(LinearNorm(16, 24), nn.Hardswish(), nn.Linear(24, 4))
    gm = prepare_by_platform(model, BackendType.TSQAT)
    assert isinstance(gm.get_submodule("0.linear"), LinearBn1d)
    x = torch.randn(3, 10, 16)
    _computes_the_float_model(gm, model, x)
    r, ops = _export(_calibrate(gm, x), x, tmp_path)
    assert "BatchNormalization" not in ops and r.float_batch_norms == {}, ops


class Attention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def test_fused_attention_runs_on_integer_matmuls(tmp_path):
    model = Attention().eval()
    gm = prepare_by_platform(model, BackendType.TSQAT)
    assert not any(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)
    disable_all(gm)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    r, ops = _export(_calibrate(gm, x), x, tmp_path)
    # both attention products and the two linears are integer kernels; nothing matmul-like stays float
    assert r.integer_matmul_kernels == 4, ops
    assert not any(ops.get(k) for k in ("MatMul", "FusedMatMul", "Gemm")), ops


def test_attention_dropout_follows_train_and_eval():
    class DropAttention(Attention):
        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    model = DropAttention()
    gm = prepare_by_platform(model, BackendType.TSQAT)
    disable_all(gm)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        gm.eval()
        assert torch.equal(gm(x), gm(x))  # no dropout in eval
        gm.train()
        assert not torch.equal(gm(x), gm(x))


def test_a_timm_vit_block_keeps_its_default_arguments_checked():
    block = timm.layers.Attention(32, num_heads=4).eval()
    gm = prepare_by_platform(block, BackendType.TSQAT)
    x = torch.randn(2, 5, 32)
    disable_all(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), block(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attn_mask"):
        gm(x, attn_mask=torch.zeros(5, 5, dtype=torch.bool))


class ShapeChecks(nn.Module):
    """Python code on shapes, as in timm's vgg ConvMlp and MobileViT: torch.fx alone cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.conv(x)
        if x.shape[-1] != 4:
            x = F.adaptive_avg_pool2d(x, 4)
        b, c, h, w = x.shape
        return self.fc(x.reshape(b, c * h * w))


def test_shape_dependent_code_traces_with_an_example_input(caplog):
    model = ShapeChecks().eval()
    with pytest.raises(TraceFailure, match="control flow"):
        prepare_by_platform(model, BackendType.TSQAT)
    with caplog.at_level(logging.WARNING):
        gm = prepare_by_platform(model, BackendType.TSQAT, {"example_inputs": torch.randn(1, 3, 16, 16)})
    assert any("specialised" in r.message for r in caplog.records)
    disable_all(gm)
    for batch in (1, 5):  # the batch dimension stays free
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x))


def test_a_timm_models_input_size_serves_as_the_example():
    model = ShapeChecks().eval()
    model.pretrained_cfg = {"input_size": (3, 12, 12)}
    gm = prepare_by_platform(model, BackendType.TSQAT)
    disable_all(gm)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_tensorflow_same_padding_conv_folds_and_exports(tmp_path):
    model = nn.Sequential(timm.layers.create_conv2d(3, 8, 3, stride=2, padding="same"), nn.BatchNorm2d(8),
                          nn.ReLU(), timm.layers.create_conv2d(8, 4, 3, stride=2, padding="same"))
    assert type(model[0]).__name__ == "Conv2dSame"
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    model.eval()
    gm = prepare_by_platform(model, BackendType.TSQAT)
    assert type(gm.get_submodule("0")).__name__ == "ConvBnReLU2d"
    x = torch.randn(2, 3, 15, 15)  # odd size: asymmetric padding
    _computes_the_float_model(gm, model, x, modes=(False,))
    r, ops = _export(_calibrate(gm, x), x, tmp_path)
    assert ops["QLinearConv"] == 2 and "BatchNormalization" not in ops, ops


class TwoHeads(nn.Module):
    """Two heads freshly initialised alike on one input (LeViT's head and head_dist): equal quantizers of equal
    tensors, which the exporter's common-subexpression pass merged, losing one quantizer's name."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn_a, self.bn_b = nn.BatchNorm1d(8), nn.BatchNorm1d(8)
        self.fc_a, self.fc_b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(x).mean((2, 3))
        return self.fc_a(self.bn_a(x)) + self.fc_b(self.bn_b(x))


def test_equal_quantizers_of_equal_tensors_each_keep_their_node(tmp_path):
    model = TwoHeads().eval()
    x = torch.randn(4, 3, 8, 8)
    gm = _calibrate(prepare_by_platform(model, BackendType.TSQAT), x)
    r, _ = _export(gm, x, tmp_path)
    assert r.exporter == "dynamo"
    names = {n.input[0] for n in onnx.load(r.onnx_path).graph.node if n.op_type == "QuantizeLinear"}
    assert {"bn_a", "bn_b"} <= names
    # the two BatchNorms before their linears cannot fold: the export says which and why
    assert set(r.float_batch_norms) == {"bn_a", "bn_b"}
    assert all("not from a conv / linear" in why for why in r.float_batch_norms.values())


def test_a_batch_norm_with_no_conv_before_it_runs_as_an_integer_per_channel_conv(tmp_path):
    """Pre-activation (BN -> ReLU -> conv, as in DenseNet): no layer before the BatchNorm to fold into. It folds into
    a depthwise 1x1 conv of weight 1 instead, an integer kernel, and the float state_dict stays the float model's."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        model[2].running_mean.uniform_(-1, 1)
        model[2].weight.uniform_(0.5, 2)
    gm = prepare_by_platform(model, BackendType.TSQAT)
    assert not any(type(m) is nn.BatchNorm2d for n, m in gm.named_modules() if not n.endswith(".bn"))
    from ts_qat_pytorch.utils.checkpoint import float_state_dict
    assert set(float_state_dict(gm)) == set(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    _computes_the_float_model(gm, model, x)
    r, ops = _export(_calibrate(gm, x), x, tmp_path)
    assert "BatchNormalization" not in ops and ops["QLinearConv"] == 3 and r.float_batch_norms == {}, ops
