"""Float pre- and post-processing around the traced network, shared by PyTorch and onnxruntime evaluation.

    letterbox(img_hwc_uint8, size)  -> padded image, ratio, (pad_w, pad_h)
    decode(raw, anchors, strides)   -> B x N x (5 + nc): xywh in input pixels, objectness and class scores
    nms(pred, conf_thres, iou_thres) -> per image an n x 6 tensor [x1, y1, x2, y2, conf, cls]
    scale_boxes(boxes, ratio, pad, shape) -> boxes in the original image, clipped

An exported network carries what decoding needs (anchors, strides, class names, input size) in a sidecar
``<file>_meta.json`` (``write_meta`` / ``read_meta``).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torchvision

PAD_VALUE = 114


def letterbox(img: np.ndarray, size: int, stride: int = 32):
    """Resize keeping the aspect ratio so the long side is ``size``, pad to ``size x size`` (grey 114)."""
    h, w = img.shape[:2]
    r = min(size / h, size / w)
    nh, nw = int(round(h * r)), int(round(w * r))
    if (nh, nw) != (h, w):
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
        t = torch.nn.functional.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False)
        img = t[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    top, left = (size - nh) // 2, (size - nw) // 2
    out = np.full((size, size, img.shape[2]), PAD_VALUE, dtype=np.uint8)
    out[top:top + nh, left:left + nw] = img
    return out, r, (left, top)


def to_input(img: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float in [0, 1] (the network's normalisation)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


def decode(raw, anchors: torch.Tensor, strides) -> torch.Tensor:
    """Raw Detect outputs (``B x na*no x H x W`` per level) -> ``B x N x no`` (xywh pixels, obj, cls scores)."""
    out = []
    for i, p in enumerate(raw):
        p = torch.as_tensor(p).float()
        b, _, h, w = p.shape
        na = anchors.shape[1]
        no = p.shape[1] // na
        p = p.view(b, na, no, h, w).permute(0, 1, 3, 4, 2).sigmoid()
        gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        grid = torch.stack((gx, gy), -1).view(1, 1, h, w, 2)
        s = float(strides[i])
        ag = (anchors[i] * s).view(1, na, 1, 1, 2)
        xy = (p[..., :2] * 2 - 0.5 + grid) * s
        wh = (p[..., 2:4] * 2) ** 2 * ag
        out.append(torch.cat((xy, wh, p[..., 4:]), -1).view(b, -1, no))
    return torch.cat(out, 1)


def xywh2xyxy(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


MAX_CANDIDATES = 30000  # most confident candidates per image that go into NMS


def _candidates(x: torch.Tensor, conf_thres: float, multi_label: bool):
    """(box index, class index, score) of one image's decoded rows whose objectness and score pass ``conf_thres``;
    score = objectness x class probability. ``multi_label``: every passing class of a box, else its best class."""
    scores = x[:, 5:] * x[:, 4:5]
    confident = x[:, 4] > conf_thres
    if multi_label:
        box_idx, cls_idx = torch.where((scores > conf_thres) & confident[:, None])
    else:
        best, best_cls = scores.max(1)
        box_idx = torch.where(confident & (best > conf_thres))[0]
        cls_idx = best_cls[box_idx]
    return box_idx, cls_idx, scores[box_idx, cls_idx]


def nms(pred: torch.Tensor, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 300,
        multi_label: bool = True) -> list[torch.Tensor]:
    """Class-aware NMS (``torchvision.ops.batched_nms``: boxes of different classes never suppress each other) on
    decoded predictions, per image an ``n x 6`` tensor [x1, y1, x2, y2, score, class], best first, at most
    ``max_det`` rows."""
    out = []
    for x in pred:
        box_idx, cls_idx, score = _candidates(x, conf_thres, multi_label)
        if score.numel() > MAX_CANDIDATES:
            top = score.topk(MAX_CANDIDATES).indices
            box_idx, cls_idx, score = box_idx[top], cls_idx[top], score[top]
        boxes = xywh2xyxy(x[box_idx, :4])
        keep = torchvision.ops.batched_nms(boxes, score, cls_idx, iou_thres)[:max_det]
        out.append(torch.cat((boxes[keep], score[keep, None], cls_idx[keep, None].to(boxes.dtype)), 1))
    return out


def scale_boxes(boxes: torch.Tensor, ratio: float, pad, shape) -> torch.Tensor:
    """Boxes (x1, y1, x2, y2) in the letterboxed input -> the original ``shape`` (h, w), clipped."""
    b = boxes.clone()
    b[:, [0, 2]] = (b[:, [0, 2]] - pad[0]) / ratio
    b[:, [1, 3]] = (b[:, [1, 3]] - pad[1]) / ratio
    b[:, [0, 2]] = b[:, [0, 2]].clamp(0, shape[1])
    b[:, [1, 3]] = b[:, [1, 3]].clamp(0, shape[0])
    return b


def postprocess(raw, anchors, strides, metas, conf_thres=0.001, iou_thres=0.6, max_det=300, multi_label=True):
    """Decode + NMS + scaling back through the letterbox; ``metas`` = per image (ratio, pad, (h, w))."""
    dets = nms(decode(raw, anchors, strides), conf_thres, iou_thres, max_det, multi_label)
    res = []
    for d, (ratio, pad, shape) in zip(dets, metas):
        if len(d):
            d = torch.cat((scale_boxes(d[:, :4], ratio, pad, shape), d[:, 4:]), 1)
        res.append(d)
    return res


def meta_path(onnx_path: str) -> str:
    return os.path.splitext(onnx_path)[0] + "_meta.json"


def write_meta(onnx_path: str, meta: dict) -> None:
    from ts_qat_pytorch.utils.utils import atomic_write_bytes
    atomic_write_bytes(meta_path(onnx_path), (json.dumps(meta, indent=1) + "\n").encode())


def read_meta(onnx_path: str) -> dict | None:
    p = meta_path(onnx_path)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)
