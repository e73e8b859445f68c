"""Real weights, real photos: the exported int8 model predicts what the PyTorch fake-quant model predicts."""
import numpy as np
import pytest
import torch
import torchvision
from skimage import data

from suites.common.assets import MOBILENET_V2, install_torchvision_weights

from .helpers import export_and_run, prepare_and_calibrate

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "camera", "horse", "hubble_deep_field", "immunohistochemistry"]


def _views():
    """8 real photos x 8 crops / flips = 64 inputs of 3x128x128, ImageNet-normalised."""
    out = []
    for name in PHOTOS:
        img = getattr(data, name)()
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255
        t = torch.nn.functional.interpolate(t[None], size=(160, 160), mode="bilinear", antialias=True)[0]
        for i, (dy, dx) in enumerate([(0, 0), (32, 32), (0, 32), (32, 0), (16, 16), (8, 24), (24, 8), (16, 0)]):
            crop = t[:, dy:dy + 128, dx:dx + 128]
            out.append(crop.flip(-1) if i % 2 else crop)
    x = torch.stack(out)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean[:, None, None]) / std[:, None, None]


@pytest.fixture(scope="module")
def mobilenet():
    install_torchvision_weights(MOBILENET_V2)
    return torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()


def test_int8_onnx_agrees_with_fake_quant_on_real_photos(mobilenet, tmp_path):
    x = _views()
    q = prepare_and_calibrate(mobilenet, x, batches=1)
    r, outs, ref = export_and_run(q, x, tmp_path / "mbv2.onnx", batch_size=len(x))
    assert r.integer_matmul_kernels == r.quantized_layers == 53
    ort_top1, fq_top1 = outs[0].argmax(1), ref[0].argmax(1)
    with torch.no_grad():
        float_top1 = mobilenet(x).argmax(1).numpy()
    # Measured: PTQ-only mobilenet_v2 keeps 84% of the float predictions on these 64 views on an AVX2 CPU and
    # 78% on an AVX-512 one (oneDNN's convolutions round differently), and ORT int8 agrees with the fake-quant
    # model on 84% too. The disagreements are rounding flips (values on a
    # .5 boundary, 1e-5 of the first layer's outputs) that this PTQ model amplifies about 2x per layer;
    # ORT's float QDQ reference (no integer kernels) disagrees with PyTorch just as much. Exact agreement
    # needs integer-exact emulation in PyTorch (not done); QAT-trained models are far less sensitive.
    assert (ort_top1 == fq_top1).mean() >= 0.8
    assert (fq_top1 == float_top1).mean() >= 0.75
    assert (ort_top1[[0, 8]] == [285, 967]).all()  # chelsea -> Egyptian cat, coffee -> espresso


def test_onnxruntime_backend_uses_fast_int8_weights_exactly(mobilenet, tmp_path):
    """7-bit weights stored as int8: onnxruntime's uint8 x int8 kernels cannot saturate."""
    from ts_qat_pytorch.prepare_by_platform import BackendType
    import json
    x = _views()[:16]
    q = prepare_and_calibrate(mobilenet, x, backend=BackendType.ONNXRuntime, batches=1)
    r, outs, ref = export_and_run(q, x, tmp_path / "ort.onnx", batch_size=len(x))
    with open(r.qparams_path) as f:
        w = json.load(f)["tensors"]["features.0.0.weight"]
    assert (w["bit"], w["quant_min"], w["quant_max"], w["onnx_dtype"]) == (7, -64, 63, "int8")
    assert r.integer_matmul_kernels == r.quantized_layers == 53
    assert (outs[0].argmax(1) == ref[0].argmax(1)).mean() >= 0.8
