#!/usr/bin/env python3
"""COCO-style evaluation of a YOLOv5 network (the manual's command):

    python test.py --weights yolov5s.pt --data data/coco.yaml --device 1

--weights is a PyTorch checkpoint (this suite's, or an ultralytics YOLOv5 .pt read through the restricted
unpickler) or an exported ONNX model (the network part; its ``*_meta.json`` sidecar, or --cfg, gives the
anchors and strides). Both go through the same float letterbox, decode and NMS, and are scored by pycocotools:

                   Class      Images     Targets           P           R      mAP@.5  mAP@.5:.95
                     all         500         952       0.608        0.82       0.743       0.595
(the int8 ONNX of the embedded default on its 500 synthetic validation scenes).
Without --data: the embedded synthetic Fashion-MNIST scenes' validation split."""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from suites.yolov5 import ckpt as C  # noqa: E402
from suites.yolov5 import datasets as D  # noqa: E402
from suites.yolov5 import pipeline as P  # noqa: E402
from suites.yolov5.evaluate import onnx_predictor, torch_predictor  # noqa: E402
from suites.yolov5.models.yolo import ConfigError, Model  # noqa: E402


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help=".pt / .pth checkpoint or .onnx network")
    ap.add_argument("--data", default=None, help="data YAML (default: the embedded synthetic scenes)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=None, help="default: the ONNX input size, else 640 "
                    "(embedded: 128)")
    ap.add_argument("--conf-thres", type=float, default=0.001)
    ap.add_argument("--iou-thres", type=float, default=0.6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cfg", default=None, help="model YAML, for an ONNX file without its _meta.json")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--on-bad-label", choices=["stop", "skip"], default="stop")
    ap.add_argument("--val-images", type=int, default=None)
    ap.add_argument("--scenes", type=int, nargs=2, default=(6000, 500))
    ap.add_argument("--metrics", default=None, help="also write the results as JSON here")
    ap.add_argument("--threads", type=int, default=None)
    return ap


def onnx_meta(path: str, cfg: str | None, nc: int):
    mp = P.meta_path(path)
    if os.path.exists(mp):
        with open(mp) as f:
            m = json.load(f)
        return torch.tensor(m["anchors"]), torch.tensor(m["strides"]), m.get("img_size"), int(m["nc"])
    if not cfg:
        raise ConfigError(f"{path}: no {os.path.basename(mp)} beside it; give --cfg (the model YAML) for the anchors")
    m = Model(cfg, nc=nc)
    return m.detect.anchors, m.detect.stride, None, nc


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return run(a)
    except (ConfigError, D.DataError, C.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(a) -> int:
    device = torch.device("cpu" if a.device == "cpu" or not torch.cuda.is_available() else f"cuda:{a.device}")
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
        model = C.build_from_weights(a.weights).to(device).eval()
    if a.data:
        cfg = D.load_data_config(a.data)
    else:
        from suites.yolov5.synth import fashion_scenes
        cfg = fashion_scenes(n_train=a.scenes[0], n_val=a.scenes[1])
    if is_onnx:
        anchors, strides, size, nc = onnx_meta(a.weights, a.cfg, cfg["nc"])
        shp = proto.graph.input[0].type.tensor_type.shape.dim
        size = a.img_size or size or shp[-1].dim_value or 640
        if shp[-1].dim_value and shp[-1].dim_value != size:
            raise ConfigError(f"{a.weights} takes {shp[-1].dim_value}x{shp[-1].dim_value} inputs, not --img-size {size}")
        predict = onnx_predictor(a.weights, threads=torch.get_num_threads())
    else:
        anchors, strides, nc = model.detect.anchors, model.detect.stride, model.nc
        size = a.img_size or (128 if not a.data else 640)
        predict = torch_predictor(model, device)
    if nc != cfg["nc"]:
        raise ConfigError(f"{a.weights} predicts {nc} classes but the data has nc={cfg['nc']}")
    if size % 32:
        raise ConfigError(f"--img-size {size} must be a multiple of 32")
    val, cat_ids, skips = D.load_split(cfg, "val", a.on_bad_label)
    val = P.subset(val, a.val_images, 0)
    ev = P.Evaluator(val, cat_ids, cfg["names"], size, a.batch_size, a.workers, anchors, strides, a.conf_thres,
                     a.iou_thres)
    r = ev.run(predict, "ORT" if is_onnx else "Test")
    r.update(weights=a.weights, img_size=size, skipped=skips.counts)
    if a.metrics:
        from ts_qat_pytorch.utils.utils import atomic_write_bytes
        atomic_write_bytes(a.metrics, (json.dumps(r, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
