"""YOLOv5 training loss on the raw Detect maps: box regression by CIoU, objectness BCE, class BCE.

Written here from the published descriptions. Taken as facts: the CIoU formula (Zheng et al., "Distance-IoU
Loss", AAAI 2020), YOLOv5's documented target assignment (anchor-shape ratio below ``anchor_t``; a target's own
cell plus the nearer horizontal and the nearer vertical neighbour), its box decode (``xy = 2 sigmoid - 0.5``,
``wh = (2 sigmoid)^2 anchor``), the loss gains of the hyp files (box 0.05, obj 1.0, cls 0.5, scaled by the number
of levels, classes and the image size) and the per-level objectness balance (4.0, 1.0, 0.4)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEIGHBOUR_REACH = 0.5  # a neighbour cell is used when the centre lies within this much (in cells) of their border
LEVEL_BALANCE = {3: (4.0, 1.0, 0.4)}  # objectness weight per level, finest first
LEVEL_BALANCE_OTHER = (4.0, 1.0, 0.25, 0.06, 0.02)


def ciou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of matching rows of two ``n x 4`` (cx, cy, w, h) box sets:
    ``IoU - rho^2 / c^2 - alpha v`` with rho the centre distance, c the diagonal of the smallest enclosing box,
    ``v = 4 / pi^2 (atan(w_gt / h_gt) - atan(w / h))^2`` and ``alpha = v / (1 - IoU + v)`` (a weight: no gradient)."""
    p_half, t_half = pred[:, 2:] / 2, target[:, 2:] / 2
    p_min, p_max = pred[:, :2] - p_half, pred[:, :2] + p_half
    t_min, t_max = target[:, :2] - t_half, target[:, :2] + t_half
    overlap = (torch.minimum(p_max, t_max) - torch.maximum(p_min, t_min)).clamp(min=0).prod(1)
    union = pred[:, 2:].prod(1) + target[:, 2:].prod(1) - overlap + eps
    iou = overlap / union
    enclosing = torch.maximum(p_max, t_max) - torch.minimum(p_min, t_min)
    diag2 = enclosing.square().sum(1) + eps
    centre2 = (pred[:, :2] - target[:, :2]).square().sum(1)
    aspect_gap = torch.atan(target[:, 2] / (target[:, 3] + eps)) - torch.atan(pred[:, 2] / (pred[:, 3] + eps))
    v = (4 / math.pi ** 2) * aspect_gap.square()
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return iou - centre2 / diag2 - alpha * v


@dataclass
class Assignment:
    """The prediction slots of one detection level that get a target, one row each."""
    image: torch.Tensor      # long: batch index
    anchor: torch.Tensor     # long: anchor index within the level
    gy: torch.Tensor         # long: grid row
    gx: torch.Tensor         # long: grid column
    cls: torch.Tensor        # long: class index
    box: torch.Tensor        # n x 4: centre offset within the cell (-0.5..1.5) and w, h, in grid units
    anchor_wh: torch.Tensor  # n x 2: the anchor's w, h in grid units

    def __len__(self) -> int:
        return self.image.numel()


def assign_targets(targets: torch.Tensor, anchors: torch.Tensor, grid_w: int, grid_h: int,
                   anchor_t: float = 4.0) -> Assignment:
    """YOLOv5's assignment for one level. ``targets``: n x 6 (image, class, cx, cy, w, h normalised to 0..1);
    ``anchors``: na x 2 in grid units. A (target, anchor) pair is kept when no side ratio between them exceeds
    ``anchor_t``; a kept pair is predicted from the target's own cell, the nearer horizontal neighbour and the nearer
    vertical neighbour (each only when the centre is within half a cell of their shared border and more than one
    cell from that image edge): up to 3 cells."""
    size = targets.new_tensor([grid_w, grid_h])
    centre = targets[:, 2:4] * size
    extent = targets[:, 4:6] * size
    ratio = extent[None] / anchors[:, None]                  # na x n x 2
    fits = torch.maximum(ratio, 1 / ratio).amax(2) < anchor_t
    anchor_idx, target_idx = fits.nonzero(as_tuple=True)    # anchor-major order

    xy = centre[target_idx]
    cell = xy.long()
    within = xy - cell  # position inside the own cell, 0..1
    toward_low = (within < NEIGHBOUR_REACH) & (xy > 1)
    toward_high = (within > 1 - NEIGHBOUR_REACH) & (size - xy > 1)
    step = torch.where(toward_low, -1, torch.where(toward_high, 1, 0))  # per axis: -1, 0 or +1

    # three candidate sets: the own cell, the horizontal neighbour, the vertical neighbour
    zero = torch.zeros_like(step[:, 0])
    shifts = [torch.zeros_like(step), torch.stack((step[:, 0], zero), 1), torch.stack((zero, step[:, 1]), 1)]
    used = [torch.ones_like(zero, dtype=torch.bool), step[:, 0] != 0, step[:, 1] != 0]
    rows = torch.cat([torch.nonzero(u, as_tuple=True)[0] for u in used])
    shift = torch.cat([s[u] for s, u in zip(shifts, used)])

    slot = cell[rows] + shift
    gx = slot[:, 0].clamp(0, grid_w - 1)
    gy = slot[:, 1].clamp(0, grid_h - 1)
    t = targets[target_idx[rows]]
    a = anchor_idx[rows]
    offset = xy[rows] - torch.stack((gx, gy), 1)
    return Assignment(image=t[:, 0].long(), anchor=a, gy=gy, gx=gx, cls=t[:, 1].long(),
                      box=torch.cat((offset, extent[target_idx[rows]]), 1), anchor_wh=anchors[a])


class YoloLoss:
    """``loss, items = YoloLoss(anchors, nc, hyp, img_size)(raw, targets)``: ``loss`` is the weighted sum times the
    batch size (what is back-propagated), ``items`` the detached (box, obj, cls) terms for the progress line."""

    def __init__(self, anchors: torch.Tensor, nc: int, hyp: dict, img_size: int):
        self.anchors = anchors.detach().clone()  # nl x na x 2, grid units of each level
        self.nl, self.na = anchors.shape[:2]
        self.nc = nc
        self.balance = LEVEL_BALANCE.get(self.nl, LEVEL_BALANCE_OTHER[:self.nl])
        per_level = 3 / self.nl  # the hyp gains are stated for 3 levels, 80 classes, 640 px
        self.box_gain = hyp.get("box", 0.05) * per_level
        self.cls_gain = hyp.get("cls", 0.5) * nc / 80 * per_level
        self.obj_gain = hyp.get("obj", 1.0) * (img_size / 640) ** 2 * per_level
        self.anchor_t = hyp.get("anchor_t", 4.0)

    def __call__(self, raw, targets: torch.Tensor):
        """``raw``: per level B x na*(5+nc) x H x W; ``targets``: n x 6 (image index, class, cx, cy, w, h in 0..1)."""
        device = raw[0].device
        targets = targets.to(device)
        box_term, obj_term, cls_term = (torch.zeros((), device=device) for _ in range(3))
        for level, maps in enumerate(raw):
            batch, _, h, w = maps.shape
            pred = maps.view(batch, self.na, 5 + self.nc, h, w).permute(0, 1, 3, 4, 2)  # B x na x H x W x (5+nc)
            hits = assign_targets(targets, self.anchors[level].to(device), w, h, self.anchor_t)
            objectness = torch.zeros(pred.shape[:4], device=device)
            if len(hits):
                where = (hits.image, hits.anchor, hits.gy, hits.gx)
                chosen = pred[where]
                xy = chosen[:, :2].sigmoid() * 2 - 0.5
                wh = (chosen[:, 2:4].sigmoid() * 2) ** 2 * hits.anchor_wh
                quality = ciou(torch.cat((xy, wh), 1), hits.box)
                box_term = box_term + (1.0 - quality).mean()
                objectness[where] = quality.detach().clamp(min=0).to(objectness.dtype)
                if self.nc > 1:
                    onehot = F.one_hot(hits.cls, self.nc).to(chosen.dtype)
                    cls_term = cls_term + F.binary_cross_entropy_with_logits(chosen[:, 5:], onehot)
            obj_term = obj_term + F.binary_cross_entropy_with_logits(pred[..., 4], objectness) * self.balance[level]
        terms = torch.stack((box_term * self.box_gain, obj_term * self.obj_gain, cls_term * self.cls_gain))
        return terms.sum() * raw[0].shape[0], terms.detach()
