"""What goes into and out of convert_export: nested and dict outputs, keyword / dict inputs, wrong dummy
inputs, the caller's model and input left untouched, and non-finite quantization parameters refused."""
import copy
import json
import math
import re

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ts_qat_pytorch.convert_export import convert_export
from ts_qat_pytorch.onnx.qparams import write_qparams_json
from ts_qat_pytorch.onnx.verify import ort_session
from ts_qat_pytorch.prepare_by_platform import prepare_by_platform
from ts_qat_pytorch.utils.state import enable_calibration_woquantization, enable_quantization

from .helpers import onnx_quantize_inputs, prepare_and_calibrate, qparams

IMG = (2, 3, 16, 16)


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


class SegHeads(nn.Module):
    """torchvision segmentation models' output: {"out": ..., "aux": ...}."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.out, self.aux = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f = torch.relu(self.body(x))
        return {"out": self.out(f), "aux": self.aux(f)}


class NestedHeads(SegHeads):
    def forward(self, x):
        f = torch.relu(self.body(x))
        return f, (self.out(f), self.aux(f))


class ImageAndMask(nn.Module):
    """A forward called with keyword arguments."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, image, mask=None):
        return self.conv(image) * mask


class BatchDict(ImageAndMask):
    """A forward that takes one dict argument."""

    def forward(self, batch):
        return self.conv(batch["image"]) * batch["mask"]


def _store(d, key, value):
    d[key] = value
    return value


torch.fx.wrap("_store")  # fx cannot trace item assignment on a traced dict: keep it a call in the graph


class AddsKey(nn.Module):
    """A detector-style forward that stores an intermediate result in its dict input (MQBench's det models)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        _store(x, "y_z", torch.relu(self.conv(x["y"])))
        return self.head(x["y_z"])


def _image(shape=IMG, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ort(path, feeds):
    sess = ort_session(str(path))
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {k: v.numpy() for k, v in feeds.items()})))


def _assert_close(out, ref, step):
    assert np.abs(out - ref.numpy()).max() <= 1.01 * step


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_dict_output_exports_and_verifies_every_key(exporter, tmp_path):
    x = _image()
    q = prepare_and_calibrate(SegHeads().eval(), x)
    r = convert_export(q, x, str(tmp_path / "seg.onnx"), exporter=exporter)
    assert r.exporter == exporter
    assert r.output_names == ["out", "aux"]
    assert [o.name for o in onnx.load(r.onnx_path).graph.output] == ["out", "aux"]
    # the layer "out" is quantized before the output "out": the JSON names that tensor as the file does
    assert set(qparams(r.qparams_path)["tensors"]) == onnx_quantize_inputs(r.onnx_path)
    assert len(r.max_abs_diff) == len(r.output_scale) == 2 and all(s for s in r.output_scale)
    assert qparams(r.qparams_path)["outputs"] == ["out", "aux"]
    with torch.no_grad():
        ref = q(x)
    outs = _ort(r.onnx_path, {"x": x})
    for name, step in zip(r.output_names, r.output_scale):
        assert outs[name].shape == tuple(ref[name].shape)
        _assert_close(outs[name], ref[name], step)


def test_nested_tuple_output_is_flattened_depth_first(tmp_path):
    x = _image()
    q = prepare_and_calibrate(NestedHeads().eval(), x)
    r = convert_export(q, x, str(tmp_path / "nested.onnx"))
    assert r.output_names == ["output_0", "output_1_0", "output_1_1"]
    assert len(r.max_abs_diff) == len(r.output_scale) == 3
    with torch.no_grad():
        f, (out, aux) = q(x)
    outs = _ort(r.onnx_path, {"x": x})
    for name, ref, step in zip(r.output_names, (f, out, aux), r.output_scale):
        _assert_close(outs[name], ref, step)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_dict_dummy_input_is_passed_by_parameter_name(exporter, tmp_path):
    image, mask = _image(), torch.rand(2, 1, 16, 16)
    q = prepare_and_calibrate(ImageAndMask().eval(), (image, mask))
    r = convert_export(q, {"mask": mask, "image": image}, str(tmp_path / "kw.onnx"), exporter=exporter)
    assert r.exporter == exporter
    assert r.input_names == ["image", "mask"]
    assert [i.name for i in onnx.load(r.onnx_path).graph.input] == ["image", "mask"]
    assert qparams(r.qparams_path)["inputs"] == ["image", "mask"]
    with torch.no_grad():
        ref = q(image=image, mask=mask)
    _assert_close(_ort(r.onnx_path, {"image": image, "mask": mask})["output"], ref, r.output_scale[0])


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_dict_argument_inputs_are_named_by_key(exporter, tmp_path):
    batch = {"mask": torch.rand(2, 1, 16, 16), "image": _image()}  # insertion order, not sorted
    q = prepare_and_calibrate(BatchDict().eval(), (batch,))
    r = convert_export(q, (batch,), str(tmp_path / "batch.onnx"), exporter=exporter)
    assert r.exporter == exporter
    assert r.input_names == ["batch_mask", "batch_image"]
    # the JSON names each quantized tensor as the file does, graph inputs included
    names = set(qparams(r.qparams_path)["tensors"])
    assert names == onnx_quantize_inputs(r.onnx_path) and {"batch_image", "batch_mask"} <= names
    with torch.no_grad():
        ref = q(batch)
    outs = _ort(r.onnx_path, {"batch_image": batch["image"], "batch_mask": batch["mask"]})
    _assert_close(outs["output"], ref, r.output_scale[0])


def test_dict_dummy_input_with_unknown_name_lists_the_parameters(tmp_path):
    image = _image()
    q = prepare_and_calibrate(ImageAndMask().eval(), (image, torch.rand(2, 1, 16, 16)))
    with pytest.raises(ValueError, match=r"'img'.*\['image', 'mask'\]"):
        convert_export(q, {"img": image}, str(tmp_path / "x.onnx"))


def test_wrong_dummy_input_shape_is_a_value_error_naming_it(tmp_path):
    q = prepare_and_calibrate(TwoConvs().eval(), _image())
    calibrated = tuple(_image().shape)
    with pytest.raises(ValueError, match=r"dummy_input \(x: \(1, 4, 16, 16\)\)") as err:
        convert_export(q, (1, 4, 16, 16), str(tmp_path / "x.onnx"))
    assert f"calibrated or traced with x: {calibrated}" in str(err.value)  # the shape it was calibrated with
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_forward_that_adds_a_key_to_its_dict_input_exports_the_given_inputs(exporter, tmp_path):
    q = prepare_and_calibrate(AddsKey().eval(), ({"y": _image()},))
    x = {"y": _image(seed=1)}
    r = convert_export(q, (x,), str(tmp_path / "det.onnx"), exporter=exporter)
    assert r.exporter == exporter
    assert list(x) == ["y"]  # the caller's dict: the forward's key went into a copy
    assert r.input_names == ["x_y"]
    assert [i.name for i in onnx.load(r.onnx_path).graph.input] == ["x_y"]
    with torch.no_grad():
        ref = q({"y": x["y"]})
    _assert_close(_ort(r.onnx_path, {"x_y": x["y"]})["output"], ref, r.output_scale[0])


def test_onnx_path_that_is_a_directory_is_refused_before_any_work(tmp_path):
    q = prepare_by_platform(TwoConvs().eval())  # not even calibrated: the argument is checked first
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=rf"onnx_path '{re.escape(str(out))}' is a directory.*"
                                         rf"{re.escape(str(out / 'model.onnx'))}"):
        convert_export(q, _image(), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not list(out.iterdir())


def test_qparams_path_that_is_a_directory_is_refused_before_any_work(tmp_path):
    q = prepare_by_platform(TwoConvs().eval())
    (tmp_path / "json").mkdir()
    with pytest.raises(ValueError, match=rf"qparams_path '{re.escape(str(tmp_path / 'json'))}' is a directory.*"
                                         rf"{re.escape(str(tmp_path / 'json' / 'm_qparams.json'))}"):
        convert_export(q, _image(), str(tmp_path / "m.onnx"), qparams_path=str(tmp_path / "json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["json"]  # no ONNX file written either


@pytest.mark.parametrize("batch_size", [0, -2])
def test_batch_size_must_be_positive_before_any_work(batch_size, tmp_path):
    q = prepare_by_platform(TwoConvs().eval())  # not even calibrated: the argument is checked first
    with pytest.raises(ValueError, match=f"batch_size must be a positive int.*{batch_size}"):
        convert_export(q, _image(), str(tmp_path / "x.onnx"), batch_size=batch_size)
    assert not list(tmp_path.iterdir())


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                         b.view(-1).view(torch.uint8))
    return a == b


def test_export_leaves_the_callers_model_and_input_untouched(tmp_path):
    x = _image()
    q = prepare_by_platform(TwoConvs().eval())
    # calibrate activations only: export itself initialises the weight quantizers (on its copy)
    enable_calibration_woquantization(q, "act_fake_quant")
    with torch.no_grad():
        q(x)
    enable_quantization(q)
    q.train()
    before = copy.deepcopy(q.state_dict())
    modes = {n: m.training for n, m in q.named_modules()}
    x_before = x.clone()
    convert_export(q, x, str(tmp_path / "m.onnx"))
    after = q.state_dict()
    assert list(after) == list(before)
    changed = [k for k in before if not _same(before[k], after[k])]
    assert not changed, changed
    assert {n: m.training for n, m in q.named_modules()} == modes
    assert _same(x, x_before)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_scale_is_refused_naming_the_quantizer(value, tmp_path):
    x = _image()
    q = prepare_and_calibrate(TwoConvs().eval(), x)
    with torch.no_grad():
        q.head_post_act_fake_quantizer.scale.fill_(value)
        q.body.weight_fake_quant.scale[1] = value
    with pytest.raises(ValueError, match=r"2 quantizer\(s\).*(head_post_act_fake_quantizer.*body\.weight_fake_quant"
                                         r"|body\.weight_fake_quant.*head_post_act_fake_quantizer).*learning rate"):
        convert_export(q, x, str(tmp_path / "nan.onnx"))
    assert not list(tmp_path.iterdir())


def test_qparams_json_refuses_nan(tmp_path):
    path = tmp_path / "q.json"
    with pytest.raises(ValueError, match="NaN or infinity"):
        write_qparams_json({"tensors": {"x": {"scale": [math.nan]}}}, str(path))
    assert not path.exists()
    write_qparams_json({"tensors": {"x": {"scale": [0.5]}}}, str(path))
    assert json.loads(path.read_text())["tensors"]["x"]["scale"] == [0.5]
