"""YOLOv5 suite tests: model configs, post-processing, COCO scoring (mAP, PR curves, results JSON), bad input, the
restricted checkpoint unpickler, the manual's command line on the runner (flags, devices, output folders) and tiny
end-to-end runs of train_qat.py (suites/common/runner.py over suites/yolov5/suite.py) and test.py."""
from __future__ import annotations

import json
import os
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from suites.common.metrics import load_metrics
from suites.yolov5 import ckpt as C
from suites.yolov5 import datasets as D
from suites.yolov5 import evaluate as E
from suites.yolov5 import postprocess as PP
from suites.yolov5.loss import YoloLoss
from suites.yolov5.models import common
from suites.yolov5.models.yolo import ConfigError, Model, count_params

torch.set_num_threads(1)

# every block type in a network small enough to export in a few seconds
TINY = {
    "nc": 3, "depth_multiple": 0.33, "width_multiple": 0.125, "act": "hardswish",
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]],
    "backbone": [[-1, 1, "Focus", [64, 3]], [-1, 1, "Conv", [128, 3, 2]], [-1, 1, "BottleneckCSP", [128]],
                 [-1, 1, "Conv", [256, 3, 2]], [-1, 1, "C3", [256]], [-1, 1, "SPP", [256, [3, 5]]],
                 [-1, 1, "SPPF", [256, 3]]],
    "head": [[-1, 1, "Conv", [128, 1, 1]], [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
             [[-1, 2], 1, "Concat", [1]], [-1, 1, "C3", [128, False]],
             [[10, 6], 1, "Detect", ["nc", "anchors"]]],
}


def test_published_parameter_counts():
    # published model summaries: v3.0 yolov5s 7.47 M (Focus/BottleneckCSP/SPP), v6 yolov5n 1.87 M, v6 yolov5s 7.24 M
    assert count_params(Model("yolov5s")) == 7468157
    assert count_params(Model("yolov5n-v6")) == 1872157
    m = Model("yolov5s-v6", nc=10)
    assert count_params(m) == 7235389 - 3 * 70 * (128 + 256 + 512) - 3 * 70 * 3  # nc=10: only the Detect convs shrink
    det = m.detect
    assert [c.out_channels for c in det.m] == [45, 45, 45] and m.stride.tolist() == [8, 16, 32]
    assert isinstance(Model("yolov5s").model[0].conv.act, nn.Hardswish)
    assert isinstance(Model("yolov5n-v6").model[0].act, nn.SiLU)
    out = Model(TINY).eval()(torch.zeros(1, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(1, 24, 16, 16), (1, 24, 8, 8)]


def test_unknown_module_is_a_clear_error():
    bad = json.loads(json.dumps(TINY))
    bad["backbone"][3][2] = "GhostConv"
    with pytest.raises(ConfigError, match=r"layer 3: unknown module 'GhostConv'"):
        Model(bad)
    with pytest.raises(ConfigError, match="not found"):
        Model("yolov5q")


def test_decode_nms_and_letterbox_scaling():
    anchors = torch.tensor([[[2.0, 2.0]]])  # one level, one anchor of 2x2 cells = 16 px at stride 8
    raw = torch.full((1, 1 * 7, 4, 4), -10.0)
    cell = raw[0].view(7, 4, 4)
    cell[0:4, 1, 2] = 0.0                # x, y offsets 0.5 -> centre of the cell; w, h -> 1 x anchor
    cell[4, 1, 2], cell[6, 1, 2] = 10.0, 10.0   # objectness, class 1
    cell[0:4, 1, 3] = 0.0                # a neighbour: shifted by a cell, overlapping (IoU 1/3), lower score
    cell[4, 1, 3], cell[6, 1, 3] = 2.0, 10.0
    pred = PP.decode([raw], anchors, [8])
    assert pred.shape == (1, 16, 7)
    best = pred[0, 1 * 4 + 2]
    assert torch.allclose(best[:4], torch.tensor([20.0, 12.0, 16.0, 16.0]))
    d = PP.nms(pred, conf_thres=0.1, iou_thres=0.3)[0]
    assert len(d) == 1 and torch.allclose(d[0, :4], torch.tensor([12.0, 4.0, 28.0, 20.0])) and d[0, 5] == 1
    d2 = PP.nms(pred, conf_thres=0.1, iou_thres=0.5)[0]
    assert len(d2) == 2  # IoU 1/3 < 0.5 keeps both
    # letterbox: a 64 x 128 (h x w) image into 64: ratio 0.5, pad 16 on top
    img = np.zeros((64, 128, 3), np.uint8)
    out, ratio, pad = PP.letterbox(img, 64)
    assert out.shape == (64, 64, 3) and ratio == 0.5 and pad == (0, 16) and out[0, 0, 0] == PP.PAD_VALUE
    back = PP.scale_boxes(d[:, :4], ratio, pad, (64, 128))
    assert torch.allclose(back[0], torch.tensor([24.0, 0.0, 56.0, 8.0]))


def _records():
    return [D.Record(1, "a.png", 100, 80, np.array([[10, 10, 50, 40], [60, 20, 90, 70]], np.float32),
                     np.array([0, 1])),
            D.Record(2, "b.png", 100, 80, np.array([[5, 5, 30, 30]], np.float32), np.array([1]))]


def test_pycocotools_scoring_perfect_and_degraded():
    recs, cat_ids = _records(), [1, 2]
    gt = D.coco_ground_truth(recs, cat_ids)
    perfect = [{"image_id": r.id, "category_id": cat_ids[c], "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                "score": 0.9} for r in recs for b, c in zip(r.boxes.tolist(), r.cls)]
    assert E.coco_map(gt, perfect) == (1.0, 1.0)
    dets = {r.id: np.array([[*b, 0.9, c] for b, c in zip(r.boxes.tolist(), r.cls)]) for r in recs}
    assert E.precision_recall(dets, recs, 2) == (1.0, 1.0)
    shifted = [dict(d, bbox=[d["bbox"][0] + 6, *d["bbox"][1:]]) for d in perfect]
    m50, m = E.coco_map(gt, shifted)
    assert m < 0.8 and m50 >= 0.5
    wrong_class = [dict(d, category_id=3 - d["category_id"]) for d in perfect]
    assert E.coco_map(gt, wrong_class) == (0.0, 0.0)
    # PR curves at IoU 0.5: perfect detections give precision 1 at every recall, AP 1 per class
    px, curves, ap = E.pr_curves(dets, recs, 2)
    assert sorted(curves) == [0, 1] and all(np.allclose(c, 1.0) for c in curves.values()) and ap == {0: 1.0, 1: 1.0}
    half = {1: dets[1][:1], 2: dets[2]}  # class 0 found, one of the two class-1 boxes missed
    px, curves, ap = E.pr_curves(half, recs, 2)
    assert ap[0] == pytest.approx(1.0) and ap[1] == pytest.approx(0.5, abs=0.01) and curves[1][-1] == 0.0


def _yolo_set(root, labels: dict, bad_image=None):
    from PIL import Image
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name, text in labels.items():
        Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(root / "images" / f"{name}.png")
        if text is not None:
            (root / "labels" / f"{name}.txt").write_text(text)
    if bad_image:
        (root / "images" / bad_image).write_bytes(b"not an image")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images\nval: images\nnc: 2\n")
    return D.load_data_config(str(root / "data.yaml"))


def test_label_errors_name_file_and_line_or_are_counted(tmp_path):
    cfg = _yolo_set(tmp_path / "a", {"ok": "0 0.5 0.5 0.2 0.2\n", "bg": None,
                                     "cls": "1 0.5 0.5 0.2 0.2\n\n2 0.5 0.5 0.1 0.1\n",
                                     "out": "0 0.95 0.5 0.2 0.2\n", "junk": "0 0.5 0.5\n"})
    with pytest.raises(D.LabelError, match=r"cls\.txt:3: class index 2 outside 0\.\.1"):
        D.load_split(cfg, "val", "stop")
    recs, cat_ids, skips = D.load_split(cfg, "val", "skip")
    assert sorted(os.path.basename(r.file) for r in recs) == ["bg.png", "ok.png"]
    assert skips.counts == {"bad label": 3} and any("out.txt:1" in e for e in skips.examples)
    assert any("junk.txt:1: expected 'class cx cy w h'" in e for e in skips.examples)
    ok = next(r for r in recs if r.file.endswith("ok.png"))
    assert np.allclose(ok.boxes, [[19.2, 12.8, 28.8, 19.2]]) and len(next(r for r in recs if "bg" in r.file).boxes) == 0
    cfg2 = _yolo_set(tmp_path / "b", {"ok": "0 0.5 0.5 0.2 0.2\n"}, bad_image="broken.jpg")
    with pytest.raises(D.DataError, match="broken.jpg cannot be decoded"):
        D.load_split(cfg2, "val", "stop")
    assert D.load_split(cfg2, "val", "skip")[2].counts == {"undecodable image": 1}
    lst = tmp_path / "list.txt"
    lst.write_text(f"{tmp_path}/b/images/ok.png\n{tmp_path}/b/images/gone.png\n")
    with pytest.raises(D.DataError, match="gone.png not found"):
        D.records_from_yolo(str(lst), 2, D.Skips("stop"))


def test_coco_json_bad_box_is_reported(tmp_path):
    from PIL import Image
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img" / "x.png")
    js = {"images": [{"id": 8, "file_name": "missing.png", "width": 30, "height": 20},
                     {"id": 7, "file_name": "x.png", "width": 30, "height": 20}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 5, "bbox": [20, 5, 15, 5], "iscrowd": 0}],
          "categories": [{"id": 5, "name": "a"}]}
    (tmp_path / "i.json").write_text(json.dumps(js))
    with pytest.raises(D.DataError, match="missing.png"):
        D.records_from_coco(str(tmp_path / "img"), str(tmp_path / "i.json"), D.Skips("stop"))
    sk = D.Skips("skip")
    with pytest.raises(D.DataError, match="no usable images"):
        D.records_from_coco(str(tmp_path / "img"), str(tmp_path / "i.json"), sk)
    assert sk.counts == {"missing image": 1, "bad label": 1} and "outside the 30x20 image" in sk.examples[1]


def test_non_finite_label_values_are_bad_labels(tmp_path):
    """NaN / inf in a label line (class id or coordinates) is a bad label: an error naming file:line, or a counted
    skip; never an invented box (NaN passes every range comparison) nor a crash (int(nan) in the class check)."""
    cfg = _yolo_set(tmp_path / "a", {"ok": "0 0.5 0.5 0.2 0.2\n", "nancls": "nan 0.5 0.5 0.2 0.2\n",
                                     "nanbox": "0 0.5 0.5 0.2 0.2\n1 nan 0.5 0.2 0.2\n",
                                     "infw": "1 0.5 0.5 inf 0.2\n", "infcls": "inf 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(D.LabelError, match=r"infcls\.txt:1: non-finite number \(NaN or inf\)"):
        D.load_split(cfg, "val", "stop")
    for name, line in (("nanbox", 2), ("nancls", 1), ("infw", 1)):
        with pytest.raises(D.LabelError, match=rf"{name}\.txt:{line}: non-finite"):
            D._parse_yolo_label(str(tmp_path / "a" / "labels" / f"{name}.txt"), 48, 32, 2)
    recs, _c, skips = D.load_split(cfg, "val", "skip")
    assert [os.path.basename(r.file) for r in recs] == ["ok.png"]
    assert skips.counts == {"bad label": 4} and all("non-finite" in e for e in skips.examples)
    gt = D.coco_ground_truth(recs, _c)
    assert all(np.isfinite(a["bbox"]).all() for a in gt["annotations"]) and len(gt["annotations"]) == 1
    # COCO JSON: a NaN in a bbox (Python's json reads NaN) is a bad label too
    from PIL import Image
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img" / "x.png")
    js = {"images": [{"id": 7, "file_name": "x.png", "width": 30, "height": 20}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 5, "bbox": [float("nan"), 5, 10, 5]}],
          "categories": [{"id": 5, "name": "a"}]}
    (tmp_path / "i.json").write_text(json.dumps(js))
    with pytest.raises(D.LabelError, match=r"annotation 1 of .*x\.png: bbox \[nan, 5, 10, 5\] is not 4 finite"):
        D.records_from_coco(str(tmp_path / "img"), str(tmp_path / "i.json"), D.Skips("stop"))


def test_unreadable_weights_and_bad_data_yaml_are_clear_errors(tmp_path, capsys):
    from suites.yolov5 import test as test_script
    from suites.yolov5 import train_qat
    _yolo_set(tmp_path / "d", {"ok": "0 0.5 0.5 0.2 0.2\n"})
    data = str(tmp_path / "d" / "data.yaml")
    good = tmp_path / "good.pt"
    C.save_float(str(good), Model(TINY))
    blob = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(b"these are not the weights you are looking for" * 20)
    (tmp_path / "adir.pt").mkdir()
    for name, msg in (("trunc", "could not be read"), ("empty", "is empty (0 bytes)"),
                      ("garbage", "could not be read"), ("adir", "is a directory")):
        path = str(tmp_path / f"{name}.pt")
        with pytest.raises(C.CheckpointError, match=re.escape(f"--weights '{path}' {msg}")):
            C.load_weights(path)
        # the scripts: "error: ..." and exit code 2, no traceback
        assert train_qat.main(["--data", data, "--weights", path, "--output_dir", str(tmp_path / "o")]) == 2
        assert f"error: --weights '{path}' {msg}" in capsys.readouterr().err
        assert train_qat.main(["--data", data, "--quantize", "--weights", path, "--output_dir", str(tmp_path)]) == 2
        assert f"error: --weights '{path}' {msg}" in capsys.readouterr().err
        assert test_script.main(["--weights", path, "--data", data]) == 2
        assert f"error: --weights '{path}' {msg}" in capsys.readouterr().err
    onnx_trunc = tmp_path / "net.onnx"
    onnx_trunc.write_bytes(b"\x08\x07\x12\x04trunc\x3a\xff\xff")
    assert test_script.main(["--weights", str(onnx_trunc), "--data", data]) == 2
    assert f"--weights '{onnx_trunc}' could not be read as ONNX" in capsys.readouterr().err
    assert train_qat.main(["--data", data, "--quantize", "--export-only", "--resume", str(tmp_path / "garbage.pt"),
                           "--output_dir", str(tmp_path / "o")]) == 2
    assert "error: --resume: checkpoint" in capsys.readouterr().err
    assert train_qat.main(["--data", data, "--quantize", "--resume", str(good), "--output_dir", str(tmp_path)]) == 2
    assert f"--resume '{good}' is not a QAT checkpoint" in capsys.readouterr().err  # float weights are not a resume
    assert train_qat.main(["--data", data, "--resume", str(good), "--output_dir", str(tmp_path / "o")]) == 2
    assert "error: --resume restores a QAT checkpoint (train_qat.py --quantize writes them): add --quantize" in \
        capsys.readouterr().err
    # a bare state_dict needs its config; --cfg gives it
    torch.save(Model(TINY).state_dict(), tmp_path / "bare.pth")
    with pytest.raises(C.CheckpointError, match="is a bare state_dict .*: give --cfg"):
        C.load_weights(str(tmp_path / "bare.pth"))
    assert C.build_from_weights(str(tmp_path / "bare.pth"), cfg=TINY).nc == 3
    assert C.load_weights(str(good))[0]["nc"] == 3  # the good file still loads
    # data YAML: a syntax error names the file and line; 'nc' missing or not an integer names the key
    bad = tmp_path / "bad.yaml"
    for text, msg in (("val: images\nnc: [1, 2\n", r"bad\.yaml:\d+: not valid YAML"),
                      ("val: images\n", r"bad\.yaml: .*missing 'nc'"),
                      ("val: images\nnc: two\n", r"bad\.yaml: 'nc' \(the number of classes\) must be a positive "
                                                  r"integer, got 'two'"),
                      ("val: images\nnc: 2.5\n", r"'nc' .* got 2\.5"),
                      ("val: images\nnc: true\n", r"'nc' .* got True")):
        bad.write_text(text)
        with pytest.raises(D.DataError, match="--data .*" + msg):
            D.load_data_config(str(bad))
    bad.write_text("val: images\nnc: [1, 2\n")
    assert train_qat.main(["--data", str(bad), "--output_dir", str(tmp_path / "o")]) == 2
    assert "error: --data " in capsys.readouterr().err
    bad.write_text("lr0: [0.01\n")  # the same for --hyp
    assert train_qat.main(["--data", data, "--hyp", str(bad), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: --hyp " in err and "not valid YAML" in err
    assert test_script.main(["--weights", str(good), "--data", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def _fake_ultralytics_modules():
    """Stand-ins for the ultralytics ``models.yolo`` / ``models.common`` modules, so pickled objects name them."""
    pkg, my, mc = types.ModuleType("models"), types.ModuleType("models.yolo"), types.ModuleType("models.common")
    from suites.yolov5.models import yolo
    mapping = {}
    for mod, src, names in ((my, yolo, ("Model", "Detect")),
                            (mc, common, ("Conv", "Focus", "Bottleneck", "BottleneckCSP", "C3", "SPP", "SPPF",
                                          "Concat"))):
        for n in names:
            cls = type(n, (getattr(src, n),), {"__module__": mod.__name__})
            setattr(mod, n, cls)
            mapping[getattr(src, n)] = cls
    pkg.yolo, pkg.common = my, mc
    return {"models": pkg, "models.yolo": my, "models.common": mc}, mapping


def test_restricted_unpickler_loads_ultralytics_style_pickle(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ours = Model(TINY)
    for m in ours.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    fake, mapping = _fake_ultralytics_modules()
    for k, v in fake.items():
        monkeypatch.setitem(sys.modules, k, v)
    import copy
    theirs = copy.deepcopy(ours)
    for m in theirs.modules():
        if type(m) in mapping:
            m.__class__ = mapping[type(m)]
    theirs.model[-1].register_buffer("anchor_grid", torch.ones(2, 1, 3, 1, 1, 2))  # v3.0 had this buffer
    del theirs.yaml["act"]  # v3.0 YAMLs have no activation key: it is read off the pickled modules
    theirs.half()
    path = tmp_path / "yolov5s.pt"
    torch.save({"epoch": 3, "best_fitness": np.array([0.5]), "model": theirs, "optimizer": None,
                "training_results": "..."}, path)
    for k in fake:
        monkeypatch.delitem(sys.modules, k)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    cfg, sd = C.load_weights(str(path))
    assert cfg["act"] == "hardswish" and "model.11.anchor_grid" not in sd
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    m = C.build_from_weights(str(path))
    ref = ours.state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref[k].half().float() if v.is_floating_point() else ref[k]), k
    assert isinstance(m.model[0].conv.act, nn.Hardswish)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/yolov5_pickle_pwned",))


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    if os.path.exists("/tmp/yolov5_pickle_pwned"):
        os.unlink("/tmp/yolov5_pickle_pwned")
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(C.CheckpointError, match=r"refusing to load the global '(posix|os)\.system'"):
        C.load_weights(str(path))
    assert not os.path.exists("/tmp/yolov5_pickle_pwned")
    torch.save({"model": nn.Sequential(nn.GELU())}, path)  # torch, but not a class of YOLOv5
    with pytest.raises(C.CheckpointError, match="torch.nn.modules.activation.GELU"):
        C.load_weights(str(path))




def _args(argv):
    """The runner's resolved flags of a train_qat.py command line (no work done)."""
    from suites.common.cli import build_parser, resolve
    from suites.yolov5.suite import SUITE
    return resolve(SUITE, build_parser(SUITE).parse_args(argv))


def test_the_manuals_command_line_on_the_runner(tmp_path, monkeypatch):
    from suites.common.devices import parse_devices
    from suites.common.suite import SuiteError
    monkeypatch.chdir(tmp_path)
    hyp = os.path.join(os.path.dirname(C.__file__), "data", "hyp.qat.yaml")
    a = _args(["--data", "data/coco.yaml", "--device", "1,2,3,4,5,6,7", "--epochs", "10", "--batch-size", "49",
               "--workers", "6", "--quantize", "--output_dir", "checkpoint_qat", "--hyp", hyp])
    assert (a.not_qat, a.evaluate, a.epochs, a.batch_size, a.workers) == (False, False, 10, 49, 6)
    assert a.out_dir == os.path.join("checkpoint_qat", "yolov5") and a.arch == "yolov5s" and a.img_size == 640
    assert a.weights == "yolov5s.pt" and a.pretrained  # QAT on --data fine-tunes ./yolov5s.pt by default
    assert (a.lr, a.optim, a.weight_decay, a.calib_batches, a.freeze_bn_epoch) == (5e-4, "sgd", 0.0, 16, 0)  # the hyp
    assert [str(d) for d in parse_devices(a.device, a.gpu, visible=8)] == [f"cuda:{i}" for i in range(1, 8)]
    with pytest.raises(SuiteError, match=r"--device 1,2,3,4,5,6,7: GPU 1, 2, 3, 4, 5, 6, 7 is not there \(no CUDA "
                                         r"GPU is visible.*use --device cpu"):
        parse_devices(a.device, a.gpu, visible=0)
    # without --quantize: float training (the runner's --not-qat); --export-only is -e; --output-dir spelled either way
    a = _args(["--data", "d.yaml", "--output-dir", "o", "--export-only", "--imgsz", "320"])
    assert a.not_qat and a.evaluate and a.weights is None and a.out_dir == os.path.join("o", "yolov5")
    assert a.img_size == 320 and _args(["--img", "96"]).img_size == 96 and _args(["--img-size", "64"]).img_size == 64
    a = _args([])  # the embedded default: yolov5n (v6) at 128, 240 QAT steps of 32 when --quantize is given
    assert (a.arch, a.img_size, a.epochs * a.train_images // a.batch_size, a.out_dir) == \
        ("yolov5n-v6", 128, 240, os.path.join("checkpoint", "yolov5"))
    assert _args(["--weights", "w/best.pt"]).arch == "best" and _args(["--cfg", "yolov5s", "--weights", "x.pt"]).arch \
        == "yolov5s"
    with pytest.raises(SuiteError, match="--img-size 100 must be a multiple of 32"):
        _args(["--img", "100"])
    with pytest.raises(SuiteError, match="--quantize and --not-qat contradict"):
        _args(["--quantize", "--not-qat"])


def test_project_name_exist_ok_like_ultralytics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _args(["--project", "p"]).out_dir == os.path.join("p", "exp")
    os.makedirs(os.path.join("p", "exp"))
    assert _args(["--project", "p"]).out_dir == os.path.join("p", "exp2")
    os.makedirs(os.path.join("p", "exp2"))
    assert _args(["--project", "p"]).out_dir == os.path.join("p", "exp3")
    assert _args(["--project", "p", "--exist-ok"]).out_dir == os.path.join("p", "exp")
    assert _args(["--name", "run"]).out_dir == os.path.join("runs", "train", "run")
    a = _args(["--project", "p", "--name", "q"])
    assert a.metrics == os.path.join("p", "q", "yolov5n-v6_metrics.json")


def test_missing_default_weights_and_absent_gpu_are_clear_errors(tmp_path, monkeypatch, capsys):
    from suites.yolov5 import train_qat
    _yolo_set(tmp_path / "d", {"ok": "0 0.5 0.5 0.2 0.2\n"})
    monkeypatch.chdir(tmp_path)
    assert train_qat.main(["--data", str(tmp_path / "d" / "data.yaml"), "--quantize"]) == 2
    err = capsys.readouterr().err
    assert f"error: --weights 'yolov5s.pt' not found ({tmp_path / 'yolov5s.pt'})" in err and "give --weights" in err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert train_qat.main(["--device", "0", "--quantize"]) == 2  # never a silent CPU fallback
    assert "error: --device 0: GPU 0 is not there" in capsys.readouterr().err


def test_distill_loss_is_detection_loss_plus_raw_map_mse():
    from suites.yolov5.suite import Yolov5Suite
    suite = Yolov5Suite()
    m = Model(TINY)
    suite.criterion = YoloLoss(m.detect.anchors, m.nc, {}, 64)
    out = m(torch.rand(2, 3, 64, 64))
    target = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.2]])
    args = types.SimpleNamespace(distill_alpha=0.5)
    det = suite.loss(out, target)[0]
    assert torch.equal(suite.loss(out, target, out, args)[0], det)  # the teacher agrees: no extra term
    shifted = tuple(o + 1.0 for o in out)  # MSE 1 per level, 2 levels, batch 2: + 0.5 * 2 * 2
    assert torch.allclose(suite.loss(out, target, shifted, args)[0], det + 2.0)


def test_train_qat_and_test_scripts_end_to_end(tmp_path, capsys):
    import yaml
    from pycocotools.coco import COCO

    from suites.yolov5 import test as test_script
    from suites.yolov5 import train_qat
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(dict(TINY, nc=10)))
    out = tmp_path / "out"
    args = ["--cfg", str(cfg), "--scenes", "40", "12", "--float-steps", "2", "--batch-size", "4", "--img-size", "64",
            "--cache-dir", str(tmp_path / "cache"), "--output_dir", str(out), "--val-batch-size", "6", "--threads", "1"]
    qat = ["--quantize", "--epochs", "1", "--train-images", "8", "--calib-batches", "1"]
    low = ["--conf-thres", "0.00001"]  # the untrained model's scores are ~1e-4: detections to save and score
    assert train_qat.main(args + qat + low + ["--save-json"]) == 0
    m = load_metrics(out / "yolov5" / "tiny_metrics.json")  # the suites' one schema, in <output-dir>/yolov5/
    assert (m["suite"], m["arch"], m["backend"], m["metric"]) == ("yolov5", "tiny", "TSQAT", "map50_95")
    assert m["run"]["entry"] == "suites/yolov5/train_qat.py" and m["run"]["qat_steps"] == 2
    for stage in ("float", "qat", "ort"):
        assert 0.0 <= m[stage] <= 1.0 and m[stage] == m["scores"][stage]["map50_95"], stage
        assert 0.0 <= m["scores"][stage]["map50"] <= 1.0, stage
        # the PR curve beside the metrics; --save-json: COCO results that pycocotools loads
        assert os.path.getsize(m["extras"]["outputs"][f"{stage}_pr_curve"]) > 1000
        pred = out / "yolov5" / f"tiny_{stage}_predictions.json"
        assert m["extras"]["outputs"][f"{stage}_predictions"] == str(pred)
        dets = json.loads(pred.read_text())
        assert dets and set(dets[0]) == {"image_id", "category_id", "bbox", "score"} and len(dets[0]["bbox"]) == 4
    gt = COCO(next((tmp_path / "cache").glob("yolov5_fashion_scenes_*/annotations/instances_val.json")))
    assert len(gt.loadRes(str(out / "yolov5" / "tiny_ort_predictions.json")).getAnnIds()) == len(dets)
    assert m["run"]["float_cached"] is False and m["run"]["val_images"] == 12 and m["scores"]["ort"]["images"] == 12
    # the split network: every convolution (backbone, neck, Detect) runs as an integer kernel in onnxruntime,
    # and the exported file agrees with the PyTorch fake-quant network within four output quantization steps
    # (a BatchNorm with no conv before it, after a concat, folds into a 1x1 depthwise conv: one more; core 85effb9)
    assert m["integer_kernels"]["QLinearConv"] == m["quantized_layers"] == m["extras"]["conv_layers"] + 1 == 27
    assert m["export"]["max_abs_diff"] <= 4 * max(m["export"]["output_scale"]) + 1e-6
    assert len(m["extras"]["out_ranges"]) == 2  # the Detect outputs' ranges clipped after calibration (hyp.qat.yaml)
    assert set(m["times_s"]) >= {"float_train", "float_eval", "calibration", "qat_train", "export", "ort_eval"}
    onnx_path = m["files"]["onnx"]
    assert all(os.path.exists(m["files"][k]) for k in ("onnx", "qparams", "onnx_meta"))
    # the same exported network scored by test.py (its _meta.json gives anchors and strides)
    rc = test_script.main(["--weights", onnx_path, "--scenes", "40", "12", "--metrics", str(tmp_path / "t.json"),
                           "--save-json", "--device", "cpu", *low])
    t = json.loads((tmp_path / "t.json").read_text())
    assert rc == 0 and t["map50_95"] == m["ort"] and os.path.exists(t["pr_curve"])
    assert json.loads(open(t["predictions"]).read()) == dets
    # --resume continues the QAT checkpoint exactly (epoch, optimizer, schedule); --export-only evaluates + exports it
    ckpt = str(out / "yolov5" / "tiny_checkpoint.pth")
    assert train_qat.main(args + qat + ["--resume", ckpt, "--epochs", "2", "--metrics", str(tmp_path / "r.json")]) == 0
    assert load_metrics(tmp_path / "r.json")["run"]["qat_steps"] == 4
    assert train_qat.main(args + qat + ["--resume", ckpt, "--export-only", "--metrics", str(tmp_path / "e.json")]) == 0
    e = load_metrics(tmp_path / "e.json")
    assert e["qat"] is not None and e["ort"] is not None and "qat_train" not in e["times_s"]
    # distillation from the float model (the default teacher) or --teacher-path
    flt = str(next((tmp_path / "cache").glob("tiny_scenes_float_*.pth")))  # the float model (a state_dict)
    assert train_qat.main(args + qat + ["--distill-method", "kd", "--teacher-path", flt, "--no-export",
                                        "--metrics", str(tmp_path / "k.json")]) == 0
    assert load_metrics(tmp_path / "k.json")["qat"] is not None
    # float-only run reuses the cached float model
    capsys.readouterr()
    assert train_qat.main(args + low + ["--metrics", str(tmp_path / "f.json")]) == 0
    f = load_metrics(tmp_path / "f.json")
    assert f["run"]["float_cached"] is True and f["float"] == m["float"] and f["qat"] is None and f["backend"] is None
    # user data (--data, YOLO-format labels): float training from the cached weights, then test.py on its checkpoint
    from PIL import Image
    root = tmp_path / "user"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(4):
        Image.fromarray(np.full((48, 64, 3), 40 * i, np.uint8)).save(root / "images" / f"{i}.jpg")
        (root / "labels" / f"{i}.txt").write_text(f"{i} 0.5 0.5 0.25 0.5\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images\nval: images\nnc: 10\n")
    cached = next((tmp_path / "cache").glob("tiny_scenes_float_*.pth"))
    data = ["--data", str(root / "data.yaml"), "--cfg", str(cfg), "--img-size", "64"]
    assert train_qat.main(data + ["--weights", str(cached), "--epochs", "1", "--batch-size", "2", "--threads", "1",
                                  "--output_dir", str(tmp_path / "user_out")]) == 0
    best = tmp_path / "user_out" / "yolov5" / "tiny_model_best_float.pth"
    assert best.exists()
    test = ["--weights", str(best), "--cfg", str(cfg), "--data", str(root / "data.yaml"), "--img-size", "64"]
    assert test_script.main(test + ["--metrics", str(tmp_path / "u.json")]) == 0
    u = json.loads((tmp_path / "u.json").read_text())
    assert u["images"] == 4 and u["targets"] == 4
    (root / "labels" / "3.txt").write_text("12 0.5 0.5 0.25 0.5\n")
    assert test_script.main(test) == 2
    assert test_script.main(test + ["--on-bad-label", "skip", "--metrics", str(tmp_path / "u.json")]) == 0
    u = json.loads((tmp_path / "u.json").read_text())
    assert u["images"] == 3 and u["skipped"] == {"bad label": 1}
    assert test_script.main(test + ["--device", "3"]) == 2
    assert "error: --device 3: GPU 3 is not there" in capsys.readouterr().err
    # bad config: a clear error before the data, exit code 2
    bad = json.loads(json.dumps(TINY))
    bad["head"][0][2] = "Conv3"
    cfg.write_text(yaml.safe_dump(bad))
    assert train_qat.main(args) == 2
    assert "unknown module 'Conv3'" in capsys.readouterr().err


def _torchrun(tmp_path, *launch: str, timeout: float = 240):
    """train_qat.py under torchrun, 2 CPU processes (gloo), the tiny network on 32 scenes; ``launch``: what torchrun
    starts before the script (a wrapper). The whole process tree is killed on timeout (tests/processes.py)."""
    import yaml
    from tests.processes import run_group
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(dict(TINY, nc=10)))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *launch,
           os.path.join(root, "suites", "yolov5", "train_qat.py"), "--cfg", str(cfg), "--scenes", "32", "8",
           "--float-steps", "2", "--batch-size", "8", "--img-size", "64", "--quantize", "--epochs", "1",
           "--train-images", "16", "--calib-batches", "1", "--no-export", "--threads", "1", "--device", "cpu",
           "--cache-dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path)]
    return run_group(cmd, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_two_processes_gloo(tmp_path):
    """Distributed QAT under torchrun (gloo on CPU): DDP, the runner's sampler split, rank 0 evaluates and writes."""
    r = _torchrun(tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = load_metrics(tmp_path / "yolov5" / "tiny_metrics.json")
    assert m["run"]["world_size"] == 2 and m["run"]["qat_steps"] == 2 and m["qat"] is not None
    assert "onnx" not in m["files"]
    assert (tmp_path / "yolov5" / "tiny_checkpoint.pth").exists()
    assert (r.stdout + r.stderr).count("Epoch: [0][0/2]") == 1  # progress lines from rank 0 only


def test_torchrun_with_a_late_rank_does_not_hang(tmp_path):
    """Rank 1 reaches the float stage after rank 0 has fine-tuned and cached the float model (tests/suites/late_rank.py
    holds it back): rank 0 decides whether the cache is used and every rank follows, so the run ends instead of
    rank 1 skipping the barrier rank 0 waits in (the CI deadlock of issue 23)."""
    import subprocess
    launcher = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "late_rank.py")
    try:
        r = _torchrun(tmp_path, launcher, str(tmp_path / "cache"), timeout=150)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the run hung with rank 1 late:\n{(exc.output or '')[-1500:]}\n{(exc.stderr or '')[-1500:]}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "late rank 1: starting" in r.stdout
    m = load_metrics(tmp_path / "yolov5" / "tiny_metrics.json")
    assert m["run"]["world_size"] == 2 and m["run"]["float_cached"] is False and m["qat"] is not None
