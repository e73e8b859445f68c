"""Pieces of the YOLOv5 QAT pipeline shared by train_qat.py and test.py: stage timing and the metrics JSON,
data loaders, the float cache of the embedded default, calibration, export and evaluation."""
from __future__ import annotations

import json
import logging
import os

import torch
import torch.distributed as dist

from suites.common.distributed import is_main, say  # noqa: F401 - the suite's modules log through P.say

from . import datasets as D
from . import evaluate as E

logger = logging.getLogger("suites")


def load_hyp(path: str) -> dict:
    h = D.read_yaml(path, "--hyp") or {}
    if not isinstance(h, dict):
        raise D.DataError(f"--hyp {path}: not a YAML mapping")
    return h


def subset(records, n, seed):
    if n is None or n >= len(records):
        return records
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(records), generator=g)[:n].sort().values.tolist()
    return [records[i] for i in idx]


def train_loader(records, img_size, batch_size, workers, seed):
    ds = D.DetectionDataset(records, img_size, augment=True)
    sampler = None
    if dist.is_initialized():
        sampler = torch.utils.data.distributed.DistributedSampler(ds, shuffle=True, seed=seed, drop_last=True)
        batch_size = max(1, batch_size // dist.get_world_size())
    g = torch.Generator().manual_seed(seed)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                                     num_workers=workers, collate_fn=D.collate, drop_last=True, generator=g,
                                     persistent_workers=workers > 0)
    return dl, sampler


def val_loader(records, img_size, batch_size, workers):
    return torch.utils.data.DataLoader(D.DetectionDataset(records, img_size), batch_size=batch_size,
                                       num_workers=workers, collate_fn=D.collate)


def float_cache_path(cache_root: str, key: dict) -> str:
    from suites.common.assets import cache_file
    return cache_file(os.path.join(cache_root, "yolov5"), f"{key['cfg']}_fashion_scenes_float", key, ext=".pt")


class Evaluator:
    """The validation set, its COCO ground truth and the shared float post-processing."""

    def __init__(self, records, cat_ids, names, img_size, batch_size, workers, anchors, strides, conf_thres,
                 iou_thres):
        self.records, self.cat_ids = records, cat_ids
        self.loader = val_loader(records, img_size, batch_size, workers)
        self.gt = D.coco_ground_truth(records, cat_ids, names)
        self.anchors, self.strides = anchors.detach().cpu().clone(), torch.as_tensor(strides).cpu().clone()
        self.conf_thres, self.iou_thres = conf_thres, iou_thres

    def run(self, predict, prefix):
        return E.run_eval(predict, self.loader, self.anchors, self.strides, self.records, self.cat_ids, self.gt,
                          self.conf_thres, self.iou_thres, prefix=prefix, log=say)


def calibrate(q, loader, batches: int) -> int:
    """The core's calibrate on the network part; the number of images it saw."""
    from ts_qat_pytorch.utils.calibrate import calibrate as core_calibrate
    seen = []
    core_calibrate(q, loader, num_batches=batches, forward=lambda m, b: (seen.append(len(b[0])), m(b[0])))
    return sum(seen)


def export(q, img_size: int, out_dir: str, name: str, meta: dict, opset: int = 18):
    """QDQ ONNX of the network part + qparams JSON + the post-processing metadata (anchors, strides, names); the
    core's ExportResult."""
    from ts_qat_pytorch.convert_export import convert_export
    onnx_path = os.path.join(out_dir, f"{name}_qat_int8.onnx")
    qp = os.path.join(out_dir, f"{name}_qat_qparams.json")
    dummy = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    r = convert_export(getattr(q, "module", q), dummy, onnx_path, opset_version=opset, qparams_path=qp)
    write_meta(onnx_path, meta)
    return r


def meta_path(onnx_path: str) -> str:
    return os.path.splitext(onnx_path)[0] + "_meta.json"


def write_meta(onnx_path: str, meta: dict) -> None:
    from ts_qat_pytorch.utils.utils import atomic_write_bytes
    atomic_write_bytes(meta_path(onnx_path), (json.dumps(meta, indent=1) + "\n").encode())


def model_meta(model, img_size: int, names) -> dict:
    det = model.detect
    return {"anchors": det.anchors.tolist(), "strides": det.stride.tolist(), "nc": det.nc,
            "names": list(names), "img_size": img_size}


def count_convs(model) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
