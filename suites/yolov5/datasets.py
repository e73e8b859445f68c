"""Detection data: a data YAML (``data/coco.yaml`` layout) naming image folders or lists with YOLO-format
labels (``labels/`` beside ``images/``, one ``cls cx cy w h`` line per box, normalised) or COCO instances
JSON files. Bad input is an error naming the file (and line), or with ``on_bad='skip'`` a counted skip of
the whole image, reported - never a silent drop."""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from .postprocess import letterbox, to_input

logger = logging.getLogger("suites")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
BOX_TOL = 1e-3  # normalised coordinates may overshoot [0, 1] by this much (rounding in label writers)


class DataError(ValueError):
    pass


class LabelError(DataError):
    pass


@dataclass
class Record:
    id: int
    file: str
    width: int
    height: int
    boxes: np.ndarray          # n x 4, x1 y1 x2 y2 in pixels
    cls: np.ndarray            # n, contiguous class index
    crowd: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # ignored regions (COCO)


@dataclass
class Skips:
    on_bad: str = "stop"
    counts: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)

    def bad(self, kind: str, msg: str, exc=DataError):
        if self.on_bad == "stop":
            raise exc(msg + " (use --on-bad-label skip to skip such images, counted)")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(msg)

    def report(self, what: str) -> None:
        if self.counts:
            logger.warning("%s: skipped images: %s; e.g. %s", what, self.counts, "; ".join(self.examples))


def read_yaml(path: str, flag: str) -> object:
    """The parsed YAML file, or a DataError naming ``flag``, the file and (for a syntax error) the line."""
    import yaml
    if not os.path.exists(path):
        raise DataError(f"{flag} '{path}' not found")
    if os.path.isdir(path):
        raise DataError(f"{flag} '{path}' is a directory; give the YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DataError(f"{flag} {where}: not valid YAML ({problem}); fix the file's syntax") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{flag} '{path}': not a UTF-8 text file ({exc.reason})") from None


def load_data_config(path: str) -> dict:
    d = read_yaml(path, "--data")
    if not isinstance(d, dict) or "val" not in d or "nc" not in d:
        missing = [k for k in ("val", "nc") if not isinstance(d, dict) or k not in d]
        raise DataError(f"--data {path}: a data YAML needs at least 'val' and 'nc' (and 'train' for training); "
                        f"missing {', '.join(repr(k) for k in missing)}")
    nc = d["nc"]
    if isinstance(nc, str) and nc.strip().isdigit():
        nc = int(nc)
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise DataError(f"--data {path}: 'nc' (the number of classes) must be a positive integer, got {d['nc']!r}")
    d["nc"] = nc
    root = d.get("path") or ""
    if root and not os.path.isabs(root):
        root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), root))
    for k in ("train", "val", "train_json", "val_json"):
        if d.get(k) and not isinstance(d[k], str):
            raise DataError(f"--data {path}: '{k}' must be a path (a folder, a .txt list or a .json file), "
                            f"got {d[k]!r}")
        if d.get(k) and not os.path.isabs(d[k]):
            d[k] = os.path.join(root or os.path.dirname(os.path.abspath(path)), d[k])
    d.setdefault("names", [str(i) for i in range(d["nc"])])
    if isinstance(d["names"], dict):  # {0: person, 1: bicycle, ...} (later YOLOv5 YAMLs)
        if sorted(d["names"]) != list(range(len(d["names"]))):
            raise DataError(f"--data {path}: 'names' as a mapping needs the keys 0..{len(d['names']) - 1}")
        d["names"] = [str(d["names"][i]) for i in range(len(d["names"]))]
    if not isinstance(d["names"], list):
        raise DataError(f"--data {path}: 'names' must be a list of class names, got {d['names']!r}")
    if len(d["names"]) != d["nc"]:
        raise DataError(f"--data {path}: {len(d['names'])} names for nc={d['nc']}")
    return d


def _image_size(path: str):
    from PIL import Image
    with Image.open(path) as im:
        return im.size  # (w, h)


def _list_images(src: str) -> list[str]:
    if os.path.isdir(src):
        out = [os.path.join(dp, f) for dp, _, fs in os.walk(src) for f in fs if f.lower().endswith(IMG_EXTENSIONS)]
        if not out:
            raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {src}")
        return sorted(out)
    if os.path.isfile(src) and src.endswith(".txt"):
        base = os.path.dirname(src)
        with open(src) as f:
            return [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
                    for p in (ln.strip() for ln in f) if p]
    raise DataError(f"image source '{src}' is neither a folder nor a .txt list of images")


def label_path(img: str) -> str:
    head, sep, tail = img.rpartition(os.sep + "images" + os.sep)
    base = (head + os.sep + "labels" + os.sep + tail) if sep else img
    return os.path.splitext(base)[0] + ".txt"


def _parse_yolo_label(lp: str, w: int, h: int, nc: int):
    boxes, cls = [], []
    with open(lp) as f:
        for ln, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            where = f"{lp}:{ln}"
            try:
                if len(parts) != 5:
                    raise ValueError
                c = float(parts[0])
                cx, cy, bw, bh = (float(v) for v in parts[1:])
            except ValueError:
                raise LabelError(f"{where}: expected 'class cx cy w h', got {line.strip()!r}") from None
            if not all(math.isfinite(v) for v in (c, cx, cy, bw, bh)):
                raise LabelError(f"{where}: non-finite number (NaN or inf) in {line.strip()!r}; every value of "
                                 "'class cx cy w h' must be a finite number")
            if c != int(c) or not 0 <= c < nc:
                raise LabelError(f"{where}: class index {parts[0]} outside 0..{nc - 1} (nc={nc})")
            x1, y1, x2, y2 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
            if bw <= 0 or bh <= 0 or x1 < -BOX_TOL or y1 < -BOX_TOL or x2 > 1 + BOX_TOL or y2 > 1 + BOX_TOL:
                raise LabelError(f"{where}: box {parts[1:]} is empty or outside the image")
            boxes.append([max(0, x1) * w, max(0, y1) * h, min(1, x2) * w, min(1, y2) * h])
            cls.append(int(c))
    return np.array(boxes, np.float32).reshape(-1, 4), np.array(cls, np.int64)


def records_from_yolo(src: str, nc: int, skips: Skips) -> list[Record]:
    recs = []
    no_label = 0
    for img in _list_images(src):
        if not os.path.exists(img):
            skips.bad("missing image", f"image {img} not found")
            continue
        try:
            w, h = _image_size(img)
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
            skips.bad("undecodable image", f"image {img} cannot be decoded ({exc})")
            continue
        lp = label_path(img)
        if not os.path.exists(lp):
            no_label += 1
            boxes, cls = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        else:
            try:
                boxes, cls = _parse_yolo_label(lp, w, h, nc)
            except LabelError as exc:
                skips.bad("bad label", str(exc), LabelError)
                continue
        recs.append(Record(len(recs), img, w, h, boxes, cls))
    if no_label:
        logger.warning("%s: %d of %d images have no label file (%s): counted as background images", src,
                       no_label, len(recs), label_path(os.path.join(src, "images", "x.jpg")))
    if not recs:
        raise DataError(f"{src}: no usable images")
    return recs


def records_from_coco(img_dir: str, json_path: str, skips: Skips):
    """Records and the contiguous-class -> category id list of a COCO instances JSON."""
    if not os.path.exists(json_path):
        raise DataError(f"annotations {json_path} not found")
    with open(json_path) as f:
        d = json.load(f)
    cat_ids = sorted(c["id"] for c in d.get("categories", []))
    cmap = {c: i for i, c in enumerate(cat_ids)}
    anns: dict = {}
    for a in d.get("annotations", []):
        anns.setdefault(a["image_id"], []).append(a)
    recs = []
    for im in d.get("images", []):
        path = os.path.join(img_dir, im["file_name"])
        if not os.path.exists(path):
            skips.bad("missing image", f"{json_path}: image {path} (id {im['id']}) not found")
            continue
        w, h = int(im["width"]), int(im["height"])
        boxes, cls, crowd, err = [], [], [], None
        for a in anns.get(im["id"], []):
            bbox = a.get("bbox")
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
                err = (f"{json_path}: annotation {a.get('id')} of {path}: bbox {bbox!r} is not 4 finite numbers "
                       "[x, y, w, h]")
                break
            x, y, bw, bh = bbox
            if a.get("category_id") not in cmap:
                err = f"{json_path}: annotation {a.get('id')} of {path}: unknown category_id {a.get('category_id')!r}"
            elif bw <= 0 or bh <= 0 or x < -1 or y < -1 or x + bw > w + 1 or y + bh > h + 1:
                err = f"{json_path}: annotation {a.get('id')} of {path}: bbox {a['bbox']} outside the {w}x{h} image"
            if err:
                break
            (crowd if a.get("iscrowd") else boxes).append([x, y, min(x + bw, w), min(y + bh, h)])
            if not a.get("iscrowd"):
                cls.append(cmap[a["category_id"]])
        if err:
            skips.bad("bad label", err, LabelError)
            continue
        recs.append(Record(int(im["id"]), path, w, h, np.array(boxes, np.float32).reshape(-1, 4),
                           np.array(cls, np.int64), np.array(crowd, np.float32).reshape(-1, 4)))
    if not recs:
        raise DataError(f"{json_path}: no usable images")
    return recs, cat_ids


def val_images(records: list, n: int, seed: int | None) -> list[int]:
    """--val-images: the indices of ``n`` records, seeded, with the images' classes (each image's most frequent box
    class; images without boxes one more class) alike (suites/common/subsets.py)."""
    from suites.common.subsets import subset_indices
    labels = [int(np.bincount(r.cls).argmax()) if len(r.cls) else -1 for r in records]
    return subset_indices(len(records), n, seed, labels)


def load_split(cfg: dict, split: str, on_bad: str = "stop"):
    """(records, category ids) of a split of a data config."""
    src = cfg.get(split)
    if not src:
        raise DataError(f"the data config has no '{split}' entry")
    if not os.path.exists(src):
        raise DataError(f"{split} images '{src}' not found")
    skips = Skips(on_bad)
    if cfg.get(f"{split}_json"):
        recs, cat_ids = records_from_coco(src, cfg[f"{split}_json"], skips)
        if len(cat_ids) != cfg["nc"]:
            raise DataError(f"{cfg[f'{split}_json']}: {len(cat_ids)} categories but nc={cfg['nc']}")
    else:
        recs, cat_ids = records_from_yolo(src, cfg["nc"], skips), list(range(1, cfg["nc"] + 1))
    skips.report(f"{split} ({src})")
    return recs, cat_ids, skips


class DetectionDataset(Dataset):
    """Letterboxed images; ``__getitem__`` -> (CHW float [0,1], n x 5 [cls cx cy w h] normalised to the input,
    (ratio, pad, (h, w)), image id). ``augment`` adds a random horizontal flip."""

    def __init__(self, records: list[Record], img_size: int, augment: bool = False):
        self.records, self.img_size, self.augment = records, img_size, augment

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from PIL import Image
        r = self.records[i]
        try:
            with Image.open(r.file) as im:
                img = np.asarray(im.convert("RGB"))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"image {r.file} cannot be decoded ({exc})") from exc
        if img.shape[:2] != (r.height, r.width):
            raise DataError(f"image {r.file} is {img.shape[1]}x{img.shape[0]}, its labels say {r.width}x{r.height}")
        img, ratio, pad = letterbox(img, self.img_size)
        b = r.boxes * ratio + np.array([pad[0], pad[1], pad[0], pad[1]], np.float32)
        s = float(self.img_size)
        t = np.stack([r.cls.astype(np.float32), (b[:, 0] + b[:, 2]) / 2 / s, (b[:, 1] + b[:, 3]) / 2 / s,
                      (b[:, 2] - b[:, 0]) / s, (b[:, 3] - b[:, 1]) / s], 1) if len(b) else np.zeros((0, 5), np.float32)
        x = to_input(img)
        if self.augment and torch.rand(()) < 0.5:
            x = x.flip(-1)
            t[:, 1] = 1.0 - t[:, 1]
        return x, torch.from_numpy(t), (ratio, pad, (r.height, r.width)), r.id


def collate(batch):
    xs, ts, metas, ids = zip(*batch)
    targets = [torch.cat((torch.full((len(t), 1), float(i)), t), 1) for i, t in enumerate(ts)]
    return torch.stack(xs), torch.cat(targets) if targets else torch.zeros((0, 6)), list(metas), list(ids)


def coco_ground_truth(records: list[Record], cat_ids: list[int], names=None) -> dict:
    """A COCO-format ground-truth dict of the records (for pycocotools)."""
    images, anns = [], []
    for r in records:
        images.append({"id": r.id, "file_name": os.path.basename(r.file), "width": r.width, "height": r.height})
        for crowd, boxes, cls in ((0, r.boxes, r.cls), (1, r.crowd, [0] * len(r.crowd))):
            for b, c in zip(boxes, cls):
                w, h = float(b[2] - b[0]), float(b[3] - b[1])
                anns.append({"id": len(anns) + 1, "image_id": r.id, "category_id": cat_ids[int(c)], "iscrowd": crowd,
                             "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h})
    cats = [{"id": c, "name": (names[i] if names else str(c))} for i, c in enumerate(cat_ids)]
    return {"images": images, "annotations": anns, "categories": cats}
