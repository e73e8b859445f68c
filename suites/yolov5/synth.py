"""The embedded default data set: SYNTHETIC scenes made of real Fashion-MNIST items.

Each 128 x 128 scene comes from the shared generator (suites/common/scenes.py: a smooth random background with
noise, 1-4 real Fashion-MNIST items pasted at random positions, scaled 1-3x and tinted, never overlapping), so
every box is the exact tight box of the item's visible pixels. 10 classes. Written in
the COCO layout (images/<split>/*.png, annotations/instances_<split>.json) under the cache directory, keyed
on the generation parameters; generated once, deterministically from the seed."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from suites.common.scenes import FASHION_MNIST_CLASSES, compose_scene

VERSION = 1
CLASSES = FASHION_MNIST_CLASSES


def _write_split(root, split, images, labels, n, size, max_items, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    d = os.path.join(root, "images", split)
    os.makedirs(d, exist_ok=True)
    ims, anns = [], []
    for i in range(n):
        sc = compose_scene(rng, images, labels, size, max_items)
        img, boxes, cls = sc.image, sc.boxes, sc.classes
        name = f"{i:06d}.png"
        Image.fromarray(img).save(os.path.join(d, name))
        ims.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for b, c in zip(boxes, cls):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "iscrowd": 0,
                         "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h})
    cats = [{"id": i + 1, "name": n_} for i, n_ in enumerate(CLASSES)]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump({"images": ims, "annotations": anns, "categories": cats}, f)


def fashion_scenes(n_train: int = 6000, n_val: int = 500, size: int = 128, max_items: int = 4, seed: int = 0,
                   cache_dir: str | None = None) -> dict:
    """The data config (same keys as a data YAML) of the cached synthetic scene set, generated if needed."""
    key = dict(n_train=n_train, n_val=n_val, size=size, max_items=max_items, seed=seed, version=VERSION)
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    if cache_dir is None:
        from suites.common.assets import cache_dir as _cd
        cache_dir = _cd()
    root = os.path.join(cache_dir, f"yolov5_fashion_scenes_{h}")
    done = os.path.join(root, "done.json")
    if not os.path.exists(done):
        from suites.common.assets import load_fashion_mnist
        fm = load_fashion_mnist()
        tmp = root + f".tmp{os.getpid()}"
        for split, (x, y), n, s in (("train", fm["train"], n_train, seed), ("val", fm["test"], n_val, seed + 1)):
            _write_split(tmp, split, x.numpy(), y.numpy(), n, size, max_items, s)
        with open(os.path.join(tmp, "done.json"), "w") as f:
            json.dump(key, f)
        try:
            os.replace(tmp, root)
        except OSError:  # another process won the race
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return {"path": root, "train": os.path.join(root, "images", "train"), "val": os.path.join(root, "images", "val"),
            "train_json": os.path.join(root, "annotations", "instances_train.json"),
            "val_json": os.path.join(root, "annotations", "instances_val.json"), "nc": len(CLASSES),
            "names": list(CLASSES), "synthetic": True}
