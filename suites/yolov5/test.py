#!/usr/bin/env python3
"""COCO-style evaluation of a YOLOv5 network (the manual's command):

    python test.py --weights yolov5s.pt --data data/coco.yaml --device 1

--weights is a PyTorch checkpoint (this suite's, an ultralytics YOLOv5 .pt read through the restricted unpickler,
or a bare state_dict such as train_qat.py's <arch>_checkpoint_float.pth with --cfg) or an exported ONNX model (the
network part; its ``*_meta.json`` sidecar, or --cfg, gives the anchors and strides). Both go through the same float
letterbox, decode and NMS, and are scored by pycocotools:

                   Class      Images     Targets           P           R      mAP@.5  mAP@.5:.95
                     all         500         952       0.608        0.82       0.743       0.595
(the int8 ONNX of the embedded default on its 500 synthetic validation scenes).
Without --data: the embedded synthetic Fashion-MNIST scenes' validation split. --save-json writes the detections
as a COCO results JSON (<weights>_predictions.json beside --metrics, else beside --weights); with --metrics the
precision-recall curves go beside it (<weights>_pr_curve.png).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from suites.common.devices import select_devices  # noqa: E402
from suites.common.suite import SuiteError  # noqa: E402
from suites.yolov5 import ckpt as C  # noqa: E402
from suites.yolov5 import datasets as D  # noqa: E402
from suites.yolov5 import evaluate as E  # noqa: E402
from suites.yolov5.models.yolo import ConfigError, Model  # noqa: E402
from suites.yolov5.postprocess import meta_path, read_meta  # noqa: E402


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help=".pt / .pth checkpoint or .onnx network")
    ap.add_argument("--data", default=None, help="data YAML (default: the embedded synthetic scenes)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--img", "--img-size", "--imgsz", dest="img_size", type=int, default=None,
                    help="default: the ONNX input size, else 640 (embedded: 128)")
    ap.add_argument("--conf-thres", type=float, default=0.001)
    ap.add_argument("--iou-thres", type=float, default=0.6)
    ap.add_argument("--device", default=None, help="cpu, a GPU index (0) or cuda:N (default: the first visible GPU, "
                    "else the CPU); a list evaluates on its first GPU")
    ap.add_argument("--cfg", default=None, help="model YAML: for a bare state_dict, or an ONNX file without its "
                    "_meta.json")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--on-bad-label", choices=["stop", "skip"], default="stop")
    ap.add_argument("--val-images", type=int, default=None,
                    help="evaluate on N validation images: a seeded subset with every class alike")
    ap.add_argument("--scenes", type=int, nargs=2, default=(6000, 500))
    ap.add_argument("--metrics", default=None, help="also write the results as JSON here")
    ap.add_argument("--save-json", action="store_true", help="write the detections as a COCO results JSON")
    ap.add_argument("--threads", type=int, default=None)
    return ap


def onnx_meta(path: str, cfg: str | None, nc: int):
    m = read_meta(path)
    if m is not None:
        return torch.tensor(m["anchors"]), torch.tensor(m["strides"]), m.get("img_size"), int(m["nc"]), m.get("names")
    if not cfg:
        raise ConfigError(f"{path}: no {os.path.basename(meta_path(path))} beside it; give --cfg (the model YAML) for "
                          "the anchors")
    m = Model(cfg, nc=nc)
    return m.detect.anchors, m.detect.stride, None, nc, None


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return run(a)
    except (ConfigError, D.DataError, C.CheckpointError, SuiteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(a) -> int:
    devices = select_devices(a.device, None)
    device = devices[0]
    C.check_file(a.weights)  # missing, a directory, empty: before any other work
    is_onnx = a.weights.endswith(".onnx")
    if is_onnx:  # read the file before the data (the embedded scenes take a while to generate the first time)
        import onnx
        try:
            proto = onnx.load(a.weights, load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf DecodeError and friends
            raise C.CheckpointError(f"--weights '{a.weights}' could not be read as ONNX ({type(exc).__name__}: "
                                    f"{(str(exc).splitlines() or [''])[0][:200]}): the file is truncated or corrupt; "
                                    "export it again") from exc
        if not proto.graph.input:
            raise C.CheckpointError(f"--weights '{a.weights}': the ONNX graph has no inputs")
    else:
        model = C.build_from_weights(a.weights, cfg=a.cfg).to(device).eval()
    if a.data:
        cfg = D.load_data_config(a.data)
    else:
        from suites.yolov5.synth import fashion_scenes
        cfg = fashion_scenes(n_train=a.scenes[0], n_val=a.scenes[1])
    if is_onnx:
        anchors, strides, size, nc, _names = onnx_meta(a.weights, a.cfg, cfg["nc"])
        shp = proto.graph.input[0].type.tensor_type.shape.dim
        size = a.img_size or size or shp[-1].dim_value or 640
        if shp[-1].dim_value and shp[-1].dim_value != size:
            raise ConfigError(f"{a.weights} takes {shp[-1].dim_value}x{shp[-1].dim_value} inputs, not --img-size "
                              f"{size}")
        from ts_qat_pytorch.onnx.verify import ort_session
        predict = E.onnx_predictor(ort_session(a.weights, threads=torch.get_num_threads()))
    else:
        anchors, strides, nc = model.detect.anchors, model.detect.stride, model.nc
        size = a.img_size or (128 if not a.data else 640)
        predict = E.torch_predictor(model, device)
    if nc != cfg["nc"]:
        raise ConfigError(f"{a.weights} predicts {nc} classes but the data has nc={cfg['nc']}")
    if size % 32:
        raise ConfigError(f"--img-size {size} must be a multiple of 32")
    val, cat_ids, skips = D.load_split(cfg, "val", a.on_bad_label)
    if a.val_images:
        val = [val[i] for i in D.val_images(val, a.val_images, 0)]
    loader = torch.utils.data.DataLoader(D.DetectionDataset(val, size), batch_size=a.batch_size,
                                         num_workers=a.workers, collate_fn=D.collate)
    res = E.Evaluator(val, cat_ids, cfg["names"], a.conf_thres, a.iou_thres).run(
        predict, loader, anchors, strides, "ORT" if is_onnx else "Test")
    r = dict(res.scores, weights=a.weights, img_size=size, skipped=skips.counts)
    stem = os.path.splitext(os.path.basename(a.weights))[0]
    folder = os.path.dirname(os.path.abspath(a.metrics or a.weights))
    if a.save_json:
        r["predictions"] = os.path.join(folder, f"{stem}_predictions.json")
        E.save_json(res.coco_dets, r["predictions"])
        print(f"=> {len(res.coco_dets)} detections written to {r['predictions']}")
    if a.metrics:
        r["pr_curve"] = os.path.join(folder, f"{stem}_pr_curve.png")
        E.plot_pr_curve(res.dets, res.records, cfg["names"], r["pr_curve"], f"{stem}: precision-recall at IoU 0.5")
        from ts_qat_pytorch.utils.utils import atomic_write_bytes
        atomic_write_bytes(a.metrics, (json.dumps(r, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
