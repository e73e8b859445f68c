"""The documented flow on the model families users bring: every quantized conv/linear (and quantized
activation matmul) runs as an onnxruntime integer kernel, and ORT agrees with the PyTorch fake-quant forward."""
import operator

import numpy as np
import pytest
import timm
import torch
import torchvision

from ts_qat_pytorch.convert_export import convert_export

from .helpers import export_and_run, onnx_quantize_inputs, prepare_and_calibrate, qparams
from .models import TinyBert

IMG = (4, 3, 64, 64)
ZOO = {
    "resnet18": (lambda: torchvision.models.resnet18(), IMG),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), IMG),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), IMG),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(), IMG),
    "timm_vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=64), IMG),
    "tiny_bert": (lambda: TinyBert(), "ids"),
}


def _inputs(spec):
    g = torch.Generator().manual_seed(0)
    if spec == "ids":
        return (torch.randint(0, 100, (4, 16), generator=g),)
    return (torch.randn(*spec, generator=g),)


def _quantized_matmuls(gm):
    fns = {torch.matmul, operator.matmul, torch.bmm}
    return sum(1 for n in gm.graph.nodes if (n.op == "call_function" and n.target in fns)
               or (n.op == "call_method" and n.target in ("matmul", "bmm")))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_model_family_exports_integer_model_that_agrees(name, tmp_path):
    factory, spec = ZOO[name]
    model = factory().eval()
    inputs = _inputs(spec)
    q = prepare_and_calibrate(model, inputs)
    r, outs, ref = export_and_run(q, inputs, tmp_path / f"{name}.onnx")
    assert r.exporter == "dynamo"
    # every quantized conv / linear / activation matmul became an integer kernel
    assert r.integer_matmul_kernels == r.quantized_layers + _quantized_matmuls(q), r.integer_kernels
    # agreement with the fake-quant forward: same predictions, near-identical logits
    o, t = outs[0].reshape(len(outs[0]), -1), ref[0].reshape(len(ref[0]), -1)
    steps = np.abs(o - t) / r.output_scale[0]
    cos = (o * t).sum(1) / (np.linalg.norm(o, axis=1) * np.linalg.norm(t, axis=1) + 1e-12)
    # Two implementations of the same QDQ graph differ in float summation order; a value that lands on a
    # rounding boundary flips by one step and the flip propagates. With random weights a 12-block ViT whose
    # attention runs on integer kernels too (QLinearMatMul, QLinearSoftmax's lookup table) amplifies that to a
    # median of 3 output steps and a cosine of 0.988-0.995 (measured); the CNNs and the small BERT stay within 1.
    assert ((cos > (0.98 if name == "timm_vit_tiny" else 0.99)) | (steps.max(1) <= 1.0)).all(), (cos, steps.max(1))
    assert np.median(steps) <= (4.0 if name == "timm_vit_tiny" else 1.0)
    # the JSON names exactly the tensors the ONNX file quantizes
    names = set(qparams(r.qparams_path)["tensors"])
    assert names == onnx_quantize_inputs(r.onnx_path)


@pytest.mark.parametrize("opset", [13, 21])
def test_opset_is_selectable(opset, tmp_path):
    inputs = _inputs(IMG)
    q = prepare_and_calibrate(torchvision.models.resnet18().eval(), inputs)
    r, outs, ref = export_and_run(q, inputs, tmp_path / "r.onnx", opset_version=opset)
    import onnx
    m = onnx.load(r.onnx_path)
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == opset
    assert r.integer_matmul_kernels == r.quantized_layers


def test_batch_size_and_shape_input(tmp_path):
    q = prepare_and_calibrate(torchvision.models.resnet18().eval(), _inputs(IMG))
    r = convert_export(q, (1, 3, 64, 64), str(tmp_path / "b.onnx"), batch_size=8)
    import onnx
    dims = onnx.load(r.onnx_path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [8, 3, 64, 64]


def test_export_before_calibration_is_an_error(tmp_path):
    from ts_qat_pytorch.prepare_by_platform import prepare_by_platform
    q = prepare_by_platform(torchvision.models.resnet18())
    with pytest.raises(RuntimeError, match="never calibrated"):
        convert_export(q, (1, 3, 64, 64), str(tmp_path / "x.onnx"))
    assert not (tmp_path / "x.onnx").exists()


def test_experimental_w4a4_exports_and_agrees(tmp_path, caplog):
    from ts_qat_pytorch.prepare_by_platform import BackendType
    inputs = _inputs(IMG)
    cfg = {"extra_qconfig_dict": {"w_qscheme": {"bit": 4}, "a_qscheme": {"bit": 4}}}
    q = prepare_and_calibrate(torchvision.models.resnet18().eval(), inputs, BackendType.Experimental, cfg)
    r, outs, ref = export_and_run(q, inputs, tmp_path / "w4a4.onnx")
    tensors = qparams(r.qparams_path)["tensors"]
    import onnx
    g = onnx.load(r.onnx_path).graph
    consumed = {i for n in g.node for i in n.input} | {t.name for t in g.initializer}
    assert set(tensors) <= consumed  # every JSON name is a tensor of the file
    entries = tensors.values()
    assert {e["bit"] for e in entries} == {4}
    assert all(e["quant_max"] - e["quant_min"] == 15 for e in entries)
    steps = np.abs(outs[0] - ref[0]) / r.output_scale[0]
    assert np.median(steps) <= 1.0
    assert any("true bit widths" in rec.getMessage() for rec in caplog.records)
