"""Per-layer quantization settings (prepare_custom_config_dict['module_qconfig']): mixed precision such as W4A4
with 8-bit first and last layers, carried through fake quant, the ONNX export and the parameter JSON."""
import numpy as np
import pytest
import torch
import torchvision

from ts_qat_pytorch.fake_quantize import QuantizeBase
from ts_qat_pytorch.prepare_by_platform import prepare_by_platform

from .helpers import export_and_run, max_steps, prepare_and_calibrate, qparams

W4A4 = {"w_qscheme": {"bit": 4}, "a_qscheme": {"bit": 4}}
EIGHT = {"w_qscheme": {"bit": 8}, "a_qscheme": {"bit": 8}}


def _mobilenet():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(num_classes=10).eval()


def _bits(q):
    return {n: m.scheme.bit for n, m in q.named_modules() if isinstance(m, QuantizeBase)}


def test_first_and_last_layer_keep_8_bits_through_export(tmp_path):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = {"extra_qconfig_dict": W4A4, "module_qconfig": {"features.0.0": EIGHT, "classifier.1": EIGHT}}
    q = prepare_and_calibrate(_mobilenet(), x, "Experimental", cfg)
    bits = _bits(q)
    eight = {n for n, b in bits.items() if b == 8}
    # the two layers' weights, the image, the first layer's output, the classifier's input and the logits
    assert eight == {"features.0.0.weight_fake_quant", "classifier.1.weight_fake_quant", "x_post_act_fake_quantizer",
                     "features_0_0_post_act_fake_quantizer", "adaptive_avg_pool2d_post_act_fake_quantizer",
                     "classifier_1_post_act_fake_quantizer"}
    assert all(b == 4 for n, b in bits.items() if n not in eight)
    # the int32 bias of the classifier follows its (now 8-bit) input grid
    assert q.classifier.get_submodule("1").input_fake_quant is \
        q.get_submodule("adaptive_avg_pool2d_post_act_fake_quantizer")

    r, outs, ref = export_and_run(q, x, tmp_path / "m.onnx", qparams_path=str(tmp_path / "q.json"))
    scale = float(q.get_submodule("classifier_1_post_act_fake_quantizer").qparams()[0])
    assert max_steps(outs[0], ref[0], scale) <= 2
    assert (np.argmax(outs[0], 1) == np.argmax(ref[0], 1)).mean() >= 0.75
    tensors = qparams(tmp_path / "q.json")["tensors"]
    by_quantizer = {t["quantizer"]: t["bit"] for t in tensors.values() if "quantizer" in t}
    assert by_quantizer["x_post_act_fake_quantizer"] == 8
    assert by_quantizer["classifier_1_post_act_fake_quantizer"] == 8
    assert 4 in by_quantizer.values()


def test_unknown_layer_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"module_qconfig: 'classifier\.2' is not a quantized layer.*classifier\.1"):
        prepare_by_platform(_mobilenet(), "Experimental",
                            {"extra_qconfig_dict": W4A4, "module_qconfig": {"classifier.2": EIGHT}})


def test_bits_outside_the_backend_are_refused_with_the_layer_named():
    with pytest.raises(ValueError, match=r"module_qconfig\['features\.0\.0'\].*bit=4.*allowed: 8\.\.8"):
        prepare_by_platform(_mobilenet(), "TSQAT", {"module_qconfig": {"features.0.0": W4A4}})


def test_each_quantizer_is_built_once_with_its_layer_config(monkeypatch):
    built = []
    init = QuantizeBase.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(QuantizeBase, "__init__", counting_init)
    cfg = {"extra_qconfig_dict": {"w_qscheme": {"bit": 4, "per_channel": False}, "a_qscheme": {"bit": 4}},
           "module_qconfig": {"features.0.0": {"w_qscheme": {"bit": 8, "per_channel": True}}, "classifier.1": EIGHT}}
    q = prepare_by_platform(_mobilenet(), "Experimental", cfg)
    final = [m for m in q.modules() if isinstance(m, QuantizeBase)]
    assert len(built) == len(final), "a quantizer was built, then replaced"
    # a per-channel weight quantizer over a per-tensor model gets one scale per output channel from the start
    first = q.get_submodule("features.0.0").weight_fake_quant
    assert first.scheme.per_channel and first.scheme.bit == 8 and tuple(first.scale.shape) == (32,)
    assert q.get_submodule("classifier_1_post_act_fake_quantizer").scheme.bit == 8
