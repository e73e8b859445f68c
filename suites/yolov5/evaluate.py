"""COCO-style evaluation: predictions of the network (PyTorch or onnxruntime) through the shared float
post-processing, scored by pycocotools (mAP@.5, mAP@.5:.95), plus P and R at the confidence of best mean F1
(the manual's summary line ``Class Images Targets P R mAP@.5 mAP@.5:.95``)."""
from __future__ import annotations

import contextlib
import io
import logging
import time

import numpy as np
import torch

from .postprocess import postprocess

logger = logging.getLogger("suites")
HEADER = ("%20s" + "%12s" * 6) % ("Class", "Images", "Targets", "P", "R", "mAP@.5", "mAP@.5:.95")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)


def precision_recall(dets: dict, records, nc: int, iou: float = 0.5):
    """Mean P and R over classes at the confidence that maximises mean F1 (greedy matching at ``iou``)."""
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
    if not conf:
        return 0.0, 0.0
    conf, tp, pcls = np.array(conf), np.array(tp), np.array(pcls)
    grid = np.linspace(0, 1, 1000)
    p_all, r_all = np.zeros((nc, len(grid))), np.zeros((nc, len(grid)))
    present = n_gt > 0
    for c in range(nc):
        m = pcls == c
        if not m.any() or not present[c]:
            continue
        o = np.argsort(-conf[m])
        tpc = np.cumsum(tp[m][o])
        fpc = np.cumsum(~tp[m][o])
        rec = tpc / n_gt[c]
        prec = tpc / (tpc + fpc)
        cf = conf[m][o]
        r_all[c] = np.interp(-grid, -cf, rec, left=0)
        p_all[c] = np.interp(-grid, -cf, prec, left=1)
    p_all, r_all = p_all[present], r_all[present]
    f1 = 2 * p_all * r_all / (p_all + r_all + 1e-16)
    i = int(f1.mean(0).argmax())
    return float(p_all[:, i].mean()), float(r_all[:, i].mean())


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
        cd = cg.loadRes(dets)
        e = COCOeval(cg, cd, "bbox")
        e.params.imgIds = [im["id"] for im in gt["images"]]
        e.evaluate()
        e.accumulate()
        e.summarize()
    return float(e.stats[1]), float(e.stats[0])


def run_eval(predict, loader, anchors, strides, records, cat_ids, gt: dict, conf_thres=0.001, iou_thres=0.6,
             prefix="Eval", log=print, max_batches=None) -> dict:
    """``predict(images) -> list of raw feature maps``; everything after it is the shared float code."""
    dets, coco_dets = {}, []
    t0, n_img = time.time(), 0
    for bi, (x, _t, metas, ids) in enumerate(loader):
        if max_batches is not None and bi >= max_batches:
            break
        raw = predict(x)
        for d, iid in zip(postprocess(raw, anchors, strides, metas, conf_thres, iou_thres), ids):
            d = d.numpy()
            dets[iid] = d
            for row in d:
                coco_dets.append({"image_id": int(iid), "category_id": int(cat_ids[int(row[5])]),
                                  "bbox": [round(float(row[0]), 3), round(float(row[1]), 3),
                                           round(float(row[2] - row[0]), 3), round(float(row[3] - row[1]), 3)],
                                  "score": round(float(row[4]), 5)})
        n_img += len(ids)
        if bi % 20 == 0:
            log(f"{prefix}: [{bi:>4}/{len(loader)}] {n_img} images, {time.time() - t0:.1f} s")
    seen = set(dets)
    recs = [r for r in records if r.id in seen]
    if len(recs) != len(gt["images"]):
        gt = dict(gt, images=[im for im in gt["images"] if im["id"] in seen])
    map50, map5095 = coco_map(gt, coco_dets)
    p, r = precision_recall(dets, recs, len(cat_ids))
    targets = int(sum(len(x.cls) for x in recs))
    log(HEADER)
    log(("%20s" + "%12i" * 2 + "%12.3g" * 4) % ("all", len(recs), targets, p, r, map50, map5095))
    return {"map50": round(map50, 4), "map50_95": round(map5095, 4), "precision": round(p, 4),
            "recall": round(r, 4), "images": len(recs), "targets": targets,
            "seconds": round(time.time() - t0, 2)}


def torch_predictor(model, device="cpu"):
    def predict(x):
        model.eval()
        with torch.no_grad():
            return [o.float().cpu() for o in model(x.to(device))]
    return predict


def onnx_predictor(onnx_path: str, threads: int | None = None):
    """Raw feature maps from an exported network in onnxruntime (CPU, ORT_ENABLE_ALL); batches are cut or
    zero-padded to the file's fixed batch size."""
    from ts_qat_pytorch.onnx.verify import ort_session, run_in_batches
    sess = ort_session(onnx_path, threads=threads)

    def predict(x):
        return [torch.from_numpy(o) for o in run_in_batches(sess, x.numpy().astype(np.float32))]
    return predict
