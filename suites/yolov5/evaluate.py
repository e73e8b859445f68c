"""COCO-style evaluation: predictions of the network (PyTorch or onnxruntime) through the shared float
post-processing, scored by pycocotools (mAP@.5, mAP@.5:.95), plus P and R at the confidence of best mean F1
(the manual's summary line ``Class Images Targets P R mAP@.5 mAP@.5:.95``), the precision-recall curves at IoU 0.5
(a PNG) and the detections as a COCO results JSON (``--save-json``)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .datasets import coco_ground_truth
from .postprocess import postprocess

logger = logging.getLogger("suites")
_trapezoid = getattr(np, "trapezoid", None) or getattr(np, "trapz")  # numpy >= 2 renamed it
HEADER = ("%20s" + "%12s" * 6) % ("Class", "Images", "Targets", "P", "R", "mAP@.5", "mAP@.5:.95")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)


def match(dets: dict, records, nc: int, iou: float = 0.5):
    """Greedy matching at ``iou``, highest confidence first: per detection (confidence, true positive, class), and
    the number of ground-truth boxes per class."""
    conf, tp, pcls = [], [], []
    n_gt = np.zeros(nc)
    for r in records:
        n_gt += np.bincount(r.cls, minlength=nc)[:nc]
        d = dets.get(r.id)
        if d is None or not len(d):
            continue
        d = d[np.argsort(-d[:, 4])]
        matched = np.zeros(len(r.boxes), bool)
        ious = box_iou(d[:, :4], r.boxes) if len(r.boxes) else np.zeros((len(d), 0))
        for k, row in enumerate(d):
            ok = False
            if ious.shape[1]:
                cand = np.where((r.cls == int(row[5])) & ~matched)[0]
                if len(cand):
                    j = cand[np.argmax(ious[k, cand])]
                    if ious[k, j] >= iou:
                        matched[j] = ok = True
            conf.append(row[4])
            tp.append(ok)
            pcls.append(int(row[5]))
    return np.array(conf), np.array(tp, bool), np.array(pcls, int), n_gt


CONFIDENCE_GRID = np.linspace(0, 1, 1000)  # confidences at which P and R are read to find the best mean F1


@dataclass
class ClassCurve:
    """One class's detections, most confident first: their confidence and the recall and precision of the
    detections down to each one."""
    conf: np.ndarray
    recall: np.ndarray
    precision: np.ndarray

    @classmethod
    def of(cls, conf, tp, pcls, n_gt, c: int) -> "ClassCurve":
        mine = pcls == c
        order = np.argsort(-conf[mine])
        hits = np.cumsum(tp[mine][order])
        return cls(conf[mine][order], hits / n_gt[c], hits / np.arange(1, len(hits) + 1))

    def at_confidence(self, levels: np.ndarray):
        """(precision, recall) at each confidence level, linear between detections; above the most confident one
        precision 1 and recall 0. (np.interp wants increasing abscissae: the confidences are walked negated.)"""
        x, xp = -levels, -self.conf
        return np.interp(x, xp, self.precision, left=1), np.interp(x, xp, self.recall, left=0)

    def envelope(self) -> np.ndarray:
        """Precision made monotone: at each detection the best precision at that recall or beyond."""
        return np.maximum.accumulate(self.precision[::-1])[::-1]

    def at_recall(self, levels: np.ndarray) -> np.ndarray:
        """The envelope at each recall level (0 beyond the highest recall reached)."""
        return np.interp(levels, self.recall, self.envelope(), right=0.0)


def class_curves(dets: dict, records, nc: int, iou: float = 0.5) -> dict:
    """{class index: ClassCurve, or None without detections} for the classes that have ground truth."""
    conf, tp, pcls, n_gt = match(dets, records, nc, iou)
    return {int(c): ClassCurve.of(conf, tp, pcls, n_gt, c) if (pcls == c).any() else None
            for c in np.flatnonzero(n_gt > 0)}


def precision_recall(dets: dict, records, nc: int, iou: float = 0.5):
    """Mean P and R over the classes with ground truth at the confidence that maximises their mean F1 (greedy
    matching at ``iou``); a class without detections counts as P = R = 0."""
    curves = class_curves(dets, records, nc, iou)
    if not any(c is not None for c in curves.values()):
        return 0.0, 0.0
    p = np.zeros((len(curves), len(CONFIDENCE_GRID)))
    r = np.zeros_like(p)
    for row, curve in enumerate(curves.values()):
        if curve is not None:
            p[row], r[row] = curve.at_confidence(CONFIDENCE_GRID)
    f1 = 2 * p * r / (p + r + 1e-16)
    best = int(f1.mean(0).argmax())
    return float(p[:, best].mean()), float(r[:, best].mean())


def pr_curves(dets: dict, records, nc: int, iou: float = 0.5, points: int = 101):
    """Precision at ``points`` recall levels (0..1) per class (its precision envelope, 0 beyond its highest recall),
    for the classes with ground truth: (recall grid, {class index: precision}, {class index: AP@iou, the area
    under those points})."""
    levels = np.linspace(0, 1, points)
    precision = {c: curve.at_recall(levels) if curve is not None else np.zeros(points)
                 for c, curve in class_curves(dets, records, nc, iou).items()}
    return levels, precision, {c: float(_trapezoid(py, levels)) for c, py in precision.items()}


def plot_pr_curve(dets: dict, records, names, path: str, title: str) -> None:
    """The precision-recall curves at IoU 0.5 as a PNG: one thin line per class (its AP in the legend), their mean
    as a thick line (mAP@0.5)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recall, curves, ap = pr_curves(dets, records, len(names))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    colours = plt.get_cmap("tab20")
    for k, (c, precision) in enumerate(curves.items()):
        ax.step(recall, precision, where="post", color=colours(k % 20), linewidth=0.9,
                label=f"{names[c]}: AP {ap[c]:.3f}")
    if curves:
        ax.step(recall, np.mean(list(curves.values()), 0), where="post", color="black", linewidth=2.5,
                label=f"mean: mAP@0.5 {np.mean(list(ap.values())):.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (envelope)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def save_json(coco_dets: list[dict], path: str) -> None:
    """COCO results JSON (``[{image_id, category_id, bbox: [x, y, w, h], score}]``: pycocotools' ``loadRes``)."""
    from ts_qat_pytorch.utils.utils import atomic_write_bytes
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, json.dumps(coco_dets).encode())


def coco_map(gt: dict, dets: list[dict]) -> tuple[float, float]:
    """(mAP@.5, mAP@.5:.95) of COCO-format detections against a COCO ground-truth dict (pycocotools)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    if not dets:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO()
        cg.dataset = gt
        cg.createIndex()
        cd = cg.loadRes([dict(d) for d in dets])  # loadRes adds keys (area, id, ...) to the dicts it is given
        e = COCOeval(cg, cd, "bbox")
        e.params.imgIds = [im["id"] for im in gt["images"]]
        e.evaluate()
        e.accumulate()
        e.summarize()
    return float(e.stats[1]), float(e.stats[0])


@dataclass
class EvalResult:
    scores: dict            # map50, map50_95, precision, recall, images, targets, seconds
    dets: dict              # image id -> n x 6 [x1, y1, x2, y2, conf, class index]
    coco_dets: list         # the same as COCO results (category ids of the data)
    records: list           # the evaluated images' records


class Evaluator:
    """The validation records, their COCO ground truth and the thresholds of the shared float post-processing."""

    def __init__(self, records, cat_ids, names, conf_thres=0.001, iou_thres=0.6):
        self.records, self.cat_ids, self.names = records, cat_ids, list(names)
        self.gt = coco_ground_truth(records, cat_ids, names)
        self.conf_thres, self.iou_thres = conf_thres, iou_thres

    def run(self, predict, loader, anchors, strides, prefix, log=print) -> EvalResult:
        """``predict(images) -> list of raw feature maps``; everything after it is the shared float code."""
        anchors, strides = torch.as_tensor(anchors).float().cpu(), torch.as_tensor(strides).cpu()
        dets, coco_dets = {}, []
        t0, n_img = time.time(), 0
        for bi, (x, _t, metas, ids) in enumerate(loader):
            raw = predict(x)
            for d, iid in zip(postprocess(raw, anchors, strides, metas, self.conf_thres, self.iou_thres), ids):
                d = d.numpy()
                dets[iid] = d
                for row in d:
                    coco_dets.append({"image_id": int(iid), "category_id": int(self.cat_ids[int(row[5])]),
                                      "bbox": [round(float(row[0]), 3), round(float(row[1]), 3),
                                               round(float(row[2] - row[0]), 3), round(float(row[3] - row[1]), 3)],
                                      "score": round(float(row[4]), 5)})
            n_img += len(ids)
            if bi % 20 == 0:
                log(f"{prefix}: [{bi:>4}/{len(loader)}] {n_img} images, {time.time() - t0:.1f} s")
        seen = set(dets)
        recs = [r for r in self.records if r.id in seen]
        gt = self.gt
        if len(recs) != len(gt["images"]):
            gt = dict(gt, images=[im for im in gt["images"] if im["id"] in seen])
        map50, map5095 = coco_map(gt, coco_dets)
        p, r = precision_recall(dets, recs, len(self.cat_ids))
        targets = int(sum(len(x.cls) for x in recs))
        log(HEADER)
        log(("%20s" + "%12i" * 2 + "%12.3g" * 4) % ("all", len(recs), targets, p, r, map50, map5095))
        scores = {"map50": round(map50, 4), "map50_95": round(map5095, 4), "precision": round(p, 4),
                  "recall": round(r, 4), "images": len(recs), "targets": targets,
                  "seconds": round(time.time() - t0, 2)}
        return EvalResult(scores, dets, coco_dets, recs)


def torch_predictor(model, device="cpu"):
    def predict(x):
        model.eval()
        with torch.no_grad():
            return [o.float().cpu() for o in model(x.to(device))]
    return predict


def onnx_predictor(sess, batch: int | None = None):
    """Raw feature maps from an onnxruntime session of the exported network; batches are cut or zero-padded to the
    file's fixed batch size."""
    from ts_qat_pytorch.onnx.verify import run_in_batches

    def predict(x):
        return [torch.from_numpy(o) for o in run_in_batches(sess, x.numpy().astype(np.float32), batch)]
    return predict
