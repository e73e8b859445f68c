"""Data of the segmentation suite: the embedded default, SYNTHETIC scenes of real Fashion-MNIST items with
per-pixel masks (suites/common/scenes.py, the generator of yolov5's scenes), or the user's images and masks.

Masks hold one class index per pixel; 255 is "ignore" (the VOC / Cityscapes convention), never scored or trained
on. The embedded scenes have 11 classes: 0 background, 1..10 the Fashion-MNIST classes.

User data (``--data DIR``)::

    DIR/images/train/NAME.jpg|png ...   DIR/masks/train/NAME.png   (same size as the image, mode L or P)
    DIR/images/val/NAME.jpg|png ...     DIR/masks/val/NAME.png

Images and masks are resized to ``--image-size`` squares (masks by nearest neighbour); the metric is computed at
that size. Missing masks and size mismatches are found before any work; class indices when a mask is loaded.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from suites.common.scenes import FASHION_MNIST_CLASSES, compose_scene
from suites.common.suite import SuiteError
from suites.segmentation.metric import IGNORE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCENE_CLASSES = ("background",) + FASHION_MNIST_CLASSES
SCENE_SIZE = 128      # the scenes are drawn as yolov5's (128 x 128, 1-4 items of 28-84 px), then resized
SCENES_VERSION = 1    # bump when the generated data changes (part of the float cache key)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def make_scenes(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int, size: int = SCENE_SIZE,
                max_items: int = 4, chunk: int = 500):
    """``n`` scenes (uint8 N x size x size x 3) and their masks (uint8 N x size x size), deterministic from
    ``seed``: drawn at 128 x 128, then resized (the masks by nearest neighbour), ``chunk`` scenes at a time."""
    rng = np.random.default_rng(seed)
    x, y = images.numpy(), labels.numpy()
    out_i, out_m = np.empty((n, size, size, 3), np.uint8), np.empty((n, size, size), np.uint8)
    for i in range(0, n, chunk):
        scenes = [compose_scene(rng, x, y, SCENE_SIZE, max_items) for _ in range(min(chunk, n - i))]
        img, m = np.stack([s.image for s in scenes]), np.stack([s.mask for s in scenes])
        if size != SCENE_SIZE:
            img, m = resize(torch.from_numpy(img).permute(0, 3, 1, 2).float(), torch.from_numpy(m), size)
            img = img.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            m = m.to(torch.uint8).numpy()
        out_i[i:i + len(img)], out_m[i:i + len(m)] = img, m
    return out_i, out_m


def resize(images: torch.Tensor, masks: torch.Tensor, size: int):
    """N x 3 x H x W float images (antialiased bilinear) and N x H x W masks (nearest) at size x size."""
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    masks = F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0].long()
    return images, masks


class SegmentationArrays(Dataset):
    """(3 x S x S ImageNet-normalised image, S x S int64 mask) from uint8 arrays (N x H x W x 3, N x H x W);
    ``train=True`` flips horizontally at random (torch's global RNG)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, image_size: int, train: bool = False):
        self.images, self.masks, self.image_size, self.train = images, masks, image_size, train
        self.classes = list(SCENE_CLASSES)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img, mask = to_tensors(self.images[i], self.masks[i], self.image_size)
        if self.train and torch.rand(()) < 0.5:
            img, mask = img.flip(-1), mask.flip(-1)
        return img, mask


def to_tensors(image: np.ndarray, mask: np.ndarray, size: int):
    """uint8 H x W x 3 image, H x W mask -> the normalised 3 x S x S image and the S x S int64 mask."""
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    m = torch.from_numpy(np.ascontiguousarray(mask)).long()
    if img.shape[-2:] != (size, size):
        img, m = (t[0] for t in resize(img[None], m[None], size))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img - mean) / std, m


def embedded_datasets(n_train: int, n_val: int, image_size: int, seed: int = 0, max_items: int = 4):
    """(train, calib, val): scenes of Fashion-MNIST's training items (train, calib) and of its test items (val)."""
    from suites.common.assets import load_fashion_mnist
    fm = load_fashion_mnist()
    tr_img, tr_mask = make_scenes(*fm["train"], n_train, seed, image_size, max_items)
    va_img, va_mask = make_scenes(*fm["test"], n_val, seed + 1, image_size, max_items)
    return (SegmentationArrays(tr_img, tr_mask, image_size, train=True),
            SegmentationArrays(tr_img, tr_mask, image_size),
            SegmentationArrays(va_img, va_mask, image_size))


# ---- user data
def pairs(root: str, split: str) -> list[tuple[str, str]]:
    """(image, mask) paths of ``split``, checked: folders, a mask for every image, the same sizes."""
    from PIL import Image
    idir, mdir = os.path.join(root, "images", split), os.path.join(root, "masks", split)
    for d in (idir, mdir):
        if not os.path.isdir(d):
            raise SuiteError(f"--data '{root}' has no '{os.path.relpath(d, root)}/' folder: expected "
                             f"images/{{train,val}}/ with the images and masks/{{train,val}}/ with one PNG mask per "
                             "image (same name, one class index per pixel, 255 = ignore)")
    names = sorted(n for n in os.listdir(idir) if n.lower().endswith(IMG_EXTENSIONS))
    if not names:
        raise SuiteError(f"'{idir}' has no images ({', '.join(IMG_EXTENSIONS)})")
    out = []
    for n in names:
        ipath, mpath = os.path.join(idir, n), os.path.join(mdir, os.path.splitext(n)[0] + ".png")
        if not os.path.isfile(mpath):
            raise SuiteError(f"image '{ipath}' has no mask: expected '{mpath}' (a PNG, one class index per pixel, "
                             "255 = ignore)")
        with Image.open(ipath) as im, Image.open(mpath) as mk:
            if im.size != mk.size:
                raise SuiteError(f"mask '{mpath}' is {mk.size[0]} x {mk.size[1]} but its image '{ipath}' is "
                                 f"{im.size[0]} x {im.size[1]}: a mask must have its image's size")
            if mk.mode not in ("L", "P", "I", "I;16"):
                raise SuiteError(f"mask '{mpath}' is a {mk.mode} image: give one class index per pixel (a grey "
                                 "'L' or palette 'P' PNG, as VOC's SegmentationClass), not colours")
        out.append((ipath, mpath))
    return out


class ImageMaskFolder(Dataset):
    """The user's (image, mask) pairs, resized to ``image_size``; a class index >= ``num_classes`` (other than
    255) is an error naming the mask. ``train=True`` flips horizontally at random."""

    def __init__(self, items: list[tuple[str, str]], num_classes: int, image_size: int, train: bool = False):
        self.items, self.num_classes, self.image_size, self.train = items, num_classes, image_size, train

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image
        ipath, mpath = self.items[i]
        with Image.open(ipath) as im, Image.open(mpath) as mk:
            image, mask = np.array(im.convert("RGB")), np.array(mk, dtype=np.int64)
        check_mask(mask, self.num_classes, mpath)
        img, m = to_tensors(image, mask, self.image_size)
        if self.train and torch.rand(()) < 0.5:
            img, m = img.flip(-1), m.flip(-1)
        return img, m


def check_mask(mask: np.ndarray, num_classes: int, path: str) -> None:
    bad = np.unique(mask[(mask != IGNORE) & ((mask >= num_classes) | (mask < 0))])
    if len(bad):
        raise SuiteError(f"mask '{path}' has class indices {bad[:8].tolist()} but -nc/--num-classes is {num_classes} "
                         f"(classes 0..{num_classes - 1}, 255 = ignore): give -nc {int(bad.max()) + 1} or fix the "
                         "mask")


def user_datasets(root: str, num_classes: int, image_size: int):
    """(train, calib, val) of ``--data root``."""
    if not os.path.isdir(root):
        raise SuiteError(f"--data '{root}' does not exist or is not a directory")
    train, val = pairs(root, "train"), pairs(root, "val")
    return (ImageMaskFolder(train, num_classes, image_size, train=True),
            ImageMaskFolder(train, num_classes, image_size), ImageMaskFolder(val, num_classes, image_size))
