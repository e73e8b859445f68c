"""YOLOv5 training loss (box CIoU + objectness + class BCE, targets assigned by anchor-shape ratio to the cell
and its two nearest neighbours), on the raw Detect outputs."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def bbox_ciou(b1: torch.Tensor, b2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """CIoU of matching rows of two xywh box sets."""
    b1x1, b1x2 = b1[:, 0] - b1[:, 2] / 2, b1[:, 0] + b1[:, 2] / 2
    b1y1, b1y2 = b1[:, 1] - b1[:, 3] / 2, b1[:, 1] + b1[:, 3] / 2
    b2x1, b2x2 = b2[:, 0] - b2[:, 2] / 2, b2[:, 0] + b2[:, 2] / 2
    b2y1, b2y2 = b2[:, 1] - b2[:, 3] / 2, b2[:, 1] + b2[:, 3] / 2
    inter = (torch.min(b1x2, b2x2) - torch.max(b1x1, b2x1)).clamp(0) * \
            (torch.min(b1y2, b2y2) - torch.max(b1y1, b2y1)).clamp(0)
    w1, h1, w2, h2 = b1[:, 2], b1[:, 3] + eps, b2[:, 2], b2[:, 3] + eps
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.max(b1x2, b2x2) - torch.min(b1x1, b2x1)
    ch = torch.max(b1y2, b2y2) - torch.min(b1y1, b2y1)
    c2 = cw ** 2 + ch ** 2 + eps
    rho2 = ((b2[:, 0] - b1[:, 0]) ** 2 + (b2[:, 1] - b1[:, 1]) ** 2)
    v = (4 / math.pi ** 2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


class YoloLoss:
    def __init__(self, anchors: torch.Tensor, nc: int, hyp: dict, img_size: int):
        self.anchors = anchors.detach().clone()  # nl x na x 2, grid units
        self.nl, self.na = anchors.shape[:2]
        self.nc = nc
        self.balance = [4.0, 1.0, 0.4] if self.nl == 3 else [4.0, 1.0, 0.25, 0.06, 0.02][:self.nl]
        self.box_gain = hyp.get("box", 0.05) * 3 / self.nl
        self.cls_gain = hyp.get("cls", 0.5) * nc / 80 * 3 / self.nl
        self.obj_gain = hyp.get("obj", 1.0) * (img_size / 640) ** 2 * 3 / self.nl
        self.anchor_t = hyp.get("anchor_t", 4.0)
        self.bce = nn.BCEWithLogitsLoss()

    def __call__(self, raw, targets: torch.Tensor):
        """``raw``: per level B x na*no x H x W; ``targets``: n x 6 (image index, class, cx, cy, w, h in [0, 1])."""
        dev = raw[0].device
        lbox, lobj, lcls = (torch.zeros((), device=dev) for _ in range(3))
        tcls, tbox, indices, anch = self.build_targets(raw, targets.to(dev))
        for i, p in enumerate(raw):
            b_, _, h, w = p.shape
            p = p.view(b_, self.na, self.nc + 5, h, w).permute(0, 1, 3, 4, 2)
            tobj = torch.zeros(p.shape[:4], device=dev)
            b, a, gj, gi = indices[i]
            if b.numel():
                ps = p[b, a, gj, gi]
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anch[i]
                iou = bbox_ciou(torch.cat((pxy, pwh), 1), tbox[i])
                lbox = lbox + (1.0 - iou).mean()
                tobj[b, a, gj, gi] = iou.detach().clamp(0).to(tobj.dtype)
                if self.nc > 1:
                    t = torch.zeros_like(ps[:, 5:])
                    t[torch.arange(len(b), device=dev), tcls[i]] = 1.0
                    lcls = lcls + self.bce(ps[:, 5:], t)
            lobj = lobj + self.bce(p[..., 4], tobj) * self.balance[i]
        bs = raw[0].shape[0]
        loss = lbox * self.box_gain + lobj * self.obj_gain + lcls * self.cls_gain
        return loss * bs, torch.stack((lbox * self.box_gain, lobj * self.obj_gain, lcls * self.cls_gain)).detach()

    def build_targets(self, raw, targets):
        na, nt = self.na, targets.shape[0]
        dev = targets.device
        tcls, tbox, indices, anch = [], [], [], []
        ai = torch.arange(na, device=dev).float().view(na, 1).repeat(1, nt)
        targets = torch.cat((targets.repeat(na, 1, 1), ai[:, :, None]), 2)  # na x nt x 7
        g = 0.5
        off = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=dev).float() * g
        for i, p in enumerate(raw):
            h, w = p.shape[-2:]
            anchors = self.anchors[i].to(dev)
            gain = torch.tensor([1, 1, w, h, w, h, 1], device=dev, dtype=torch.float32)
            t = targets * gain
            if nt:
                r = t[:, :, 4:6] / anchors[:, None]
                j = torch.max(r, 1 / r).max(2)[0] < self.anchor_t
                t = t[j]
                gxy = t[:, 2:4]
                gxi = gain[[2, 3]] - gxy
                j, k = ((gxy % 1 < g) & (gxy > 1)).T
                l, m = ((gxi % 1 < g) & (gxi > 1)).T
                j = torch.stack((torch.ones_like(j), j, k, l, m))
                t = t.repeat((5, 1, 1))[j]
                offsets = (torch.zeros_like(gxy)[None] + off[:, None])[j]
            else:
                t = targets[0]
                offsets = 0
            b, c = t[:, :2].long().T
            gxy = t[:, 2:4]
            gwh = t[:, 4:6]
            gij = (gxy - offsets).long()
            gi = gij[:, 0].clamp_(0, w - 1)
            gj = gij[:, 1].clamp_(0, h - 1)
            a = t[:, 6].long()
            indices.append((b, a, gj, gi))
            tbox.append(torch.cat((gxy - torch.stack((gi, gj), 1), gwh), 1))
            anch.append(anchors[a])
            tcls.append(c)
        return tcls, tbox, indices, anch
