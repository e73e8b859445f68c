"""Segmentation suite tests: the pipeline on tiny synthetic scenes, the metric on a known confusion matrix, the
user-data errors, the dict-output export in onnxruntime, the scene generator shared with yolov5.

Real assets (mobilenet_v2 ImageNet weights, Fashion-MNIST) come from suites.common.assets (pip / apt)."""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

from suites.common.metrics import load_metrics
from suites.common.suite import SuiteError
from suites.segmentation import main as suite_main
from suites.segmentation.suite import SUITE

ARCH = SUITE.recipes["embedded"]["arch"]  # the embedded default's model: every output file's prefix

torch.set_num_threads(min(2, torch.get_num_threads()))


# ---- the metric
def test_confusion_matrix_iou_and_pixel_accuracy():
    from suites.segmentation.metric import ConfusionMatrix
    # 4 classes; class 3 is neither labelled nor predicted (left out of the mean); 255 is never scored
    target = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 255]])
    pred = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 3]])
    cm = ConfusionMatrix(4)
    cm.update(target, pred)
    assert cm.mat.tolist() == [[3, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    iou = cm.iou()
    np.testing.assert_allclose(iou[:3], [3 / 4, 1 / 3, 1 / 2])  # TP / (TP + FP + FN)
    assert math.isnan(iou[3])
    s = cm.scores()
    assert s["miou"] == round(100 * (3 / 4 + 1 / 3 + 1 / 2) / 3, 3) and s["pixel_acc"] == round(100 * 5 / 7, 3)
    assert s["pixels"] == 7 and s["iou"][3] is None
    cm.update(target, target.masked_fill(target == 255, 0))  # accumulates over batches
    assert int(cm.mat.sum()) == 14


def test_logits_are_upsampled_to_the_mask():
    from suites.segmentation.metric import upsampled
    x = torch.randn(2, 11, 12, 12)
    assert upsampled(x, (96, 96)).shape == (2, 11, 96, 96) and upsampled(x, (12, 12)) is x


# ---- data
def test_scenes_masks_match_boxes_and_the_generator_is_yolov5s():
    from suites.common.assets import load_fashion_mnist
    from suites.common.scenes import compose_scene
    fm = load_fashion_mnist()
    x, y = fm["test"][0].numpy(), fm["test"][1].numpy()
    a = compose_scene(np.random.default_rng(3), x, y)
    b = compose_scene(np.random.default_rng(3), x, y)
    assert np.array_equal(a.image, b.image) and a.boxes == b.boxes and np.array_equal(a.mask, b.mask)
    for (x0, y0, x1, y1), c in zip(a.boxes, a.classes):  # every item's labelled pixels lie in its box
        inside = a.mask[y0:y1, x0:x1]
        assert (inside == c + 1).any()
        assert ((a.mask == c + 1).sum() >= (inside == c + 1).sum())
    assert set(np.unique(a.mask)) <= {0, 255, *(c + 1 for c in a.classes)}
    from suites.yolov5 import synth  # yolov5's scenes come from the same generator
    assert synth.compose_scene is compose_scene


def _user_data(root, n=2, size=(40, 32), nc=3):
    from PIL import Image
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray((np.random.rand(size[1], size[0], 3) * 255).astype(np.uint8)).save(
                root / "images" / split / f"{i}.jpg")
            m = np.random.randint(0, nc, (size[1], size[0])).astype(np.uint8)
            m[:2] = 255
            Image.fromarray(m).save(root / "masks" / split / f"{i}.png")
    return root


def test_user_data_errors(tmp_path):
    from PIL import Image
    from suites.segmentation.data import user_datasets
    root = _user_data(tmp_path / "d")
    train, calib, val = user_datasets(str(root), 3, 32)
    img, mask = val[0]
    assert img.shape == (3, 32, 32) and mask.shape == (32, 32) and set(mask.unique().tolist()) <= {0, 1, 2, 255}
    with pytest.raises(SuiteError, match="does not exist"):
        user_datasets(str(tmp_path / "nope"), 3, 32)
    with pytest.raises(SuiteError, match=r"class indices \[2\] but -nc/--num-classes is 2.*give -nc 3"):
        user_datasets(str(root), 2, 32)[2][0]
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(root / "masks" / "val" / "1.png")
    Image.fromarray(np.zeros((31, 40), np.uint8)).save(root / "masks" / "val" / "0.png")
    with pytest.raises(SuiteError, match=r"mask '.*0\.png' is 40 x 31 but its image '.*0\.jpg' is 40 x 32"):
        user_datasets(str(root), 3, 32)
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(root / "masks" / "val" / "0.png")
    with pytest.raises(SuiteError, match="is a RGB image: give one class index per pixel"):
        user_datasets(str(root), 3, 32)
    os.remove(root / "masks" / "val" / "0.png")
    with pytest.raises(SuiteError, match=r"image '.*0\.jpg' has no mask: expected '.*masks/val/0\.png'"):
        user_datasets(str(root), 3, 32)
    os.rename(root / "masks", root / "labels")
    with pytest.raises(SuiteError, match=r"has no 'masks/train/' folder"):
        user_datasets(str(root), 3, 32)


def test_user_data_through_main(tmp_path, capsys):
    """--data: float evaluation of a random-headed model; a bad class index is 'error: ...' (exit 2) naming the
    mask, raised in a DataLoader worker."""
    root = _user_data(tmp_path / "d", nc=3)
    argv = ["--data", str(root), "-nc", "3", "--pretrained", "--not-qat", "-e", "--image-size", "32", "-j", "0",
            "--output-dir", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json")]
    assert suite_main.main(argv) == 0
    m = load_metrics(tmp_path / "m.json")
    assert m["metric"] == "miou" and 0 <= m["float"] <= 100 and m["extras"]["per_class_iou"]["float"]["iou"]
    assert suite_main.main(argv[:2] + ["-nc", "2"] + argv[4:-4] + ["-j", "1"] + argv[-4:]) == 2
    e = capsys.readouterr().err
    assert "error: mask '" in e and "has class indices [2] but -nc/--num-classes is 2" in e and "Traceback" not in e


def test_per_pixel_distillation_loss():
    """kd from the float model (the embedded default): zero KL when student and teacher agree, ignored pixels left
    out, and the loss is the cross entropy's share when alpha is 0."""
    from suites.common.cli import build_parser, resolve
    args = resolve(SUITE, build_parser(SUITE).parse_args([]))
    assert args.distill_method == "kd"
    torch.manual_seed(0)
    logits = torch.randn(2, 11, 4, 4)
    target = torch.randint(0, 11, (2, 16, 16))
    ce, _ = SUITE.loss({"out": logits}, target)
    args = args.replace(distill_alpha=1.0)

    def kd(out, teacher, target, args):
        return float(SUITE.loss(out, target, teacher, args)[0])
    assert kd({"out": logits}, {"out": logits.clone()}, target, args) == pytest.approx(0, abs=1e-6)
    other = {"out": torch.randn(2, 11, 4, 4)}
    ignored = torch.full_like(target, 255)
    assert kd({"out": logits}, other, ignored, args) == 0.0  # no labelled pixel
    assert kd({"out": logits}, other, target, args) > 0
    args = args.replace(distill_alpha=0.0)
    assert kd({"out": logits}, other, target, args) == pytest.approx(float(ce))


def test_flags_are_checked_before_any_work():
    from suites.common.cli import build_parser, resolve
    for argv, msg in ((["-nc", "5"], "the embedded scenes have 11 classes"),
                      (["--image-size", "72"], "--image-size 72 must be a multiple of 16"),
                      (["--scenes", "0", "10"], "--scenes 0 10 must both be >= 1")):
        with pytest.raises(SuiteError, match=re.escape(msg)):
            resolve(SUITE, build_parser(SUITE).parse_args(argv))
    with pytest.raises(SuiteError, match="did you mean lraspp_mobilenet_v2"):
        resolve(SUITE, build_parser(SUITE).parse_args(["-a", "lraspp_mobilenetv2"]))


# ---- model and export
def test_dict_output_export_runs_on_integer_kernels(tmp_path):
    """The LR-ASPP model's {"out": logits} exports as an output named "out"; every convolution (backbone, the
    sigmoid gate's 1x1 on the pooled features, both classifiers) runs as QLinearConv, and onnxruntime agrees with
    the fake-quant model."""
    from suites.segmentation.model import create_model
    from ts_qat_pytorch.convert_export import convert_export
    from ts_qat_pytorch.onnx.verify import ort_session
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    from ts_qat_pytorch.utils.calibrate import calibrate
    torch.manual_seed(0)
    model = create_model("lraspp_mobilenet_v2", 5, pretrained=False).eval()
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    q = prepare_by_platform(model, BackendType.TSQAT)
    x = torch.randn(4, 3, 64, 64)
    calibrate(q, [x])
    q.eval()
    r = convert_export(q, x[:1], str(tmp_path / "seg.onnx"), opset_version=18, batch_size=1)
    assert r.output_names == ["out"] and r.quantized_layers == convs == 56
    assert r.integer_kernels["QLinearConv"] == convs and r.integer_kernels.get("QLinearSigmoid") == 1
    sess = ort_session(r.onnx_path)
    got = sess.run(["out"], {r.input_names[0]: x[:1].numpy()})[0]
    with torch.no_grad():
        want = q(x[:1])["out"].numpy()
    assert got.shape == want.shape == (1, 5, 8, 8)  # logits at 1/8; upsampling and argmax are outside the file
    assert np.abs(got - want).max() <= 4 * r.output_scale[0] + 1e-6


def test_torchvision_arch_and_weights_file(tmp_path):
    """-a takes torchvision's segmentation models (random init; their dict output, upsampled inside, fits the
    loss); --weights loads a state_dict of the arch with torch.load(weights_only=True), and one of another -nc is
    an error naming both."""
    import argparse
    args = argparse.Namespace(num_classes=3, weights="", arch="lraspp_mobilenet_v3_large")
    model = SUITE.build_model(args, args.arch, pretrained=False).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert list(out) == ["out"] and out["out"].shape == (1, 3, 64, 64)
    assert torch.isfinite(SUITE.loss(out, torch.zeros(1, 64, 64, dtype=torch.long))[0])
    torch.save(model.state_dict(), tmp_path / "w.pth")
    args.weights = str(tmp_path / "w.pth")
    again = SUITE.build_model(args, args.arch, pretrained=True)  # --weights wins over the zoo's weights
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, msg=k)
    with pytest.raises(SuiteError, match="has 3 classes but -nc/--num-classes is 5"):
        SUITE.build_model(argparse.Namespace(**{**vars(args), "num_classes": 5}), args.arch, pretrained=False)


# ---- the pipeline
SMOKE = ["--smoke", "--print-freq", "1"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    rc = suite_main.main(SMOKE + ["--output-dir", str(out), "--cache-dir", str(out / "cache"),
                                  "--metrics", str(out / "metrics.json")])
    return rc, out


def test_smoke_pipeline_metrics(smoke_run):
    rc, out = smoke_run
    assert rc == 0
    m = load_metrics(out / "metrics.json")  # the one schema (suites/README.md), checked
    assert (m["suite"], m["arch"], m["backend"], m["metric"], m["direction"]) == \
        ("segmentation", ARCH, "TSQAT", "miou", "higher")
    for k in ("float", "qat", "ort"):
        assert 0.0 <= m[k] <= 100.0 and m[k] == m["scores"][k]["miou"] and 0 <= m["scores"][k]["pixel_acc"] <= 100
        per = m["extras"]["per_class_iou"][k]
        assert per["miou"] == m[k] and len(per["iou"]) == 11
    assert m["scores"]["float"]["pixel_acc"] > 70.0  # background alone is ~84% of the pixels
    assert abs(m["ort"] - m["qat"]) <= 5.0
    assert m["integer_kernels"]["QLinearConv"] == m["quantized_layers"] == m["integer_matmul_kernels"] == 56
    chart = m["extras"]["iou_chart"]  # next to the metrics file
    assert os.path.isfile(chart) and os.path.dirname(chart) == str(out) and m["extras"]["classes"][0] == "background"
    for stage in ("float_train", "float_eval", "calibration", "qat_train", "qat_eval", "export", "ort_eval"):
        assert m["times_s"][stage] >= 0.0
    for name in ("checkpoint.pth", "onnx_quantization.onnx", "qparams.json", "checkpoint_float.pth"):
        assert (out / "segmentation" / f"{ARCH}_{name}").is_file(), name
    # the float weights load into the architecture
    from suites.segmentation.model import create_model
    sd = torch.load(out / "segmentation" / f"{ARCH}_checkpoint_float.pth", weights_only=True)
    create_model(ARCH, 11, pretrained=False).load_state_dict(sd)


def test_shipped_baselines_and_regression_entry_are_well_formed():
    import json
    from suites.common.regression import load_baselines
    here = os.path.dirname(suite_main.__file__)
    entries = load_baselines(os.path.join(here, "baselines.json"))
    assert {e["metric"] for e in entries} >= {"float", "qat", "ort"}
    reg = json.load(open(os.path.join(here, "regression.json")))
    assert reg["script"] == "main.py" and reg["metrics_flag"] == "--metrics"
