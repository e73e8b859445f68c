"""SYNTHETIC scenes made of real Fashion-MNIST items (shared/ASSETS.md: no detection or segmentation data set is
packaged): the embedded default of the yolov5 suite (boxes) and of the segmentation suite (masks).

A scene is a smooth random colour gradient with noise, with 1..``max_items`` Fashion-MNIST items (real images,
suites.common.assets.load_fashion_mnist) pasted at random positions, scaled 1-3x (28-84 px at size 128) and tinted.
Items never overlap, so each box is the exact tight box of an item's visible pixels and each mask pixel belongs to
one item. Everything is drawn from the ``rng`` given, in a fixed order: the same generator state gives the same
scene, boxes and mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
VISIBLE = 0.04  # an item pixel whose alpha (its grey value / 255) is below this is not pasted at all


@dataclass
class Scene:
    image: np.ndarray   # size x size x 3, uint8 RGB
    boxes: list         # (x0, y0, x1, y1) per item, exclusive ends: the tight box of its visible pixels
    classes: list       # Fashion-MNIST class 0..9 per item
    mask: np.ndarray    # size x size, uint8: 0 background, class + 1 (alpha >= mask_alpha), ``void`` (faint edges)


def compose_scene(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, size: int = 128,
                  max_items: int = 4, mask_alpha: float = 0.25, void: int = 255) -> Scene:
    """One scene from ``items`` (N x 28 x 28 uint8) and their ``labels``. A mask pixel is the item's (class + 1)
    where the item covers at least ``mask_alpha`` of its colour (the pixel looks like the item), ``void`` where
    it covers less but is pasted (faint edges and straps, neither item nor background: VOC marks such outlines
    255, "ignore"), background (0) elsewhere."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(0, 160, 3), rng.uniform(0, 160, 3)
    ang = rng.uniform(0, 2 * np.pi)
    t = (np.cos(ang) * xx + np.sin(ang) * yy + 1.5) / 3
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    img += rng.normal(0, 8, img.shape)
    mask = np.zeros((size, size), np.uint8)
    boxes, cls = [], []
    for _ in range(int(rng.integers(1, max_items + 1))):
        k = int(rng.integers(len(items)))
        s = int(round(28 * rng.uniform(1.0, 3.0)))
        it = F.interpolate(torch.from_numpy(np.asarray(items[k])).float()[None, None], size=(s, s), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        alpha = np.clip(it / 255.0, 0, 1)
        alpha[alpha < VISIBLE] = 0.0
        ys, xs = np.nonzero(alpha)
        if not len(ys):
            continue
        by0, by1, bx0, bx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        for _try in range(20):
            ox, oy = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
            b = (ox + bx0, oy + by0, ox + bx1, oy + by1)
            if all(b[2] <= o[0] or o[2] <= b[0] or b[3] <= o[1] or o[3] <= b[1] for o in boxes):
                break
        else:
            continue
        color = rng.uniform(120, 255, 3)
        region = img[oy:oy + s, ox:ox + s]
        img[oy:oy + s, ox:ox + s] = region * (1 - alpha[..., None]) + color[None, None] * alpha[..., None]
        patch = mask[oy:oy + s, ox:ox + s]
        patch[alpha > 0] = void
        patch[alpha >= mask_alpha] = int(labels[k]) + 1
        boxes.append(b)
        cls.append(int(labels[k]))
    return Scene(np.clip(img, 0, 255).astype(np.uint8), boxes, cls, mask)
