"""Data for the ImageNet suite: an ImageFolder root (train/ and val/) or the embedded default,
Fashion-MNIST (real data, read by suites.common.assets.load_fashion_mnist) shaped like ImageNet input:
grey -> 3 channels, resized to ``image_size``, ImageNet mean/std normalisation."""
from __future__ import annotations

import logging
import multiprocessing
import os

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
logger = logging.getLogger("imagenet")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    pass


class FashionMNISTImageNet(Dataset):
    """Fashion-MNIST as 3 x S x S ImageNet-normalised tensors. ``train=True`` adds light augmentation
    (random 2-pixel shift and horizontal flip, drawn from torch's global RNG)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int = 64, train: bool = False,
                 indices=None):
        if indices is not None:
            idx = torch.as_tensor(indices, dtype=torch.long)
            images, labels = images[idx], labels[idx]
        self.images, self.labels = images, labels
        self.image_size = image_size
        self.train = train
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.classes = list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i].float().div_(255.0)[None]  # 1 x 28 x 28
        if self.train:
            padded = F.pad(img[None], (2, 2, 2, 2))[0]
            dy, dx = torch.randint(0, 5, (2,)).tolist()
            img = padded[:, dy:dy + 28, dx:dx + 28]
            if torch.rand(()) < 0.5:
                img = img.flip(-1)
        img = F.interpolate(img[None], size=(self.image_size, self.image_size), mode="bilinear",
                            align_corners=False)[0]
        img = (img.expand(3, -1, -1) - self.mean) / self.std
        return img, self.labels[i]


def check_imagefolder(root: str) -> None:
    """Clear errors for a --data root that is missing, empty, or not train/ + val/ ImageFolders."""
    if not os.path.exists(root):
        raise DataError(f"--data '{root}' does not exist")
    if not os.path.isdir(root):
        raise DataError(f"--data '{root}' is not a directory")
    for split in ("train", "val"):
        d = os.path.join(root, split)
        if not os.path.isdir(d):
            have = sorted(os.listdir(root))[:10]
            raise DataError(f"--data '{root}' has no '{split}/' folder (an ImageFolder root needs train/ and "
                            f"val/, each with one sub-folder per class); it contains {have or 'nothing'}")
        classes = [c for c in sorted(os.listdir(d)) if os.path.isdir(os.path.join(d, c))]
        if not classes:
            raise DataError(f"'{d}' has no class sub-folders (expected {d}/<class>/<image files>)")
        found = False
        for c in classes:
            for _dirpath, _dirs, names in os.walk(os.path.join(d, c)):
                if any(n.lower().endswith(IMG_EXTENSIONS) for n in names):
                    found = True
                    break
            if found:
                break
        if not found:
            raise DataError(f"'{d}' has {len(classes)} class folders but no image files "
                            f"({', '.join(IMG_EXTENSIONS)})")


def class_folders(split_dir: str) -> list[str]:
    """The class names ImageFolder will find under ``split_dir`` (its sub-folders, sorted), without scanning
    the images: cheap enough to check -nc before any long work."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


class CheckedImageFolder(Dataset):
    """A torchvision ImageFolder whose unreadable images (corrupt, truncated, not an image) are found lazily, when
    a sample is loaded (no pre-scan of the data set): with ``on_bad='error'`` a DataError naming the file; with
    ``on_bad='skip'`` the next readable image (in index order) takes its place, the file is logged and
    ``skipped`` counts the event. ``skipped`` is a multiprocessing.Value, so increments made in DataLoader worker
    processes (forked, or spawned: the dataset travels with the worker's start-up arguments) reach the main
    process, which reports the count after each epoch / evaluation."""

    def __init__(self, root: str, transform=None, on_bad: str = "error"):
        import torchvision.datasets as datasets
        folder = datasets.ImageFolder(root)
        self.root, self.loader, self.transform = root, folder.loader, transform
        self.classes, self.class_to_idx, self.samples = folder.classes, folder.class_to_idx, folder.samples
        self.targets = folder.targets
        self.on_bad = on_bad
        self.skipped = multiprocessing.Value("q", 0)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        n = len(self.samples)
        for k in range(n):
            path, target = self.samples[(index + k) % n]
            try:
                sample = self.loader(path)
            except Exception as exc:  # noqa: BLE001 - PIL raises OSError, UnidentifiedImageError, ...
                why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                if self.on_bad != "skip":
                    raise DataError(f"image '{path}' cannot be read ({why}); replace or remove it, or pass "
                                    "--on-bad-image skip to skip such images (counted and reported)") from None
                with self.skipped.get_lock():
                    self.skipped.value += 1
                logger.warning("skipping unreadable image %s (%s)", path, why)
                continue
            return (self.transform(sample) if self.transform is not None else sample), target
        raise DataError(f"'{self.root}': none of its {n} images can be read")


def imagefolder_datasets(root: str, image_size: int = 224, on_bad: str = "error"):
    import torchvision.transforms as T
    check_imagefolder(root)
    folder = CheckedImageFolder
    normalize = T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    resize = int(round(image_size / 0.875))
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    eval_tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), normalize])
    try:
        train = folder(os.path.join(root, "train"), train_tf, on_bad)
        calib = folder(os.path.join(root, "train"), eval_tf, on_bad)
        val = folder(os.path.join(root, "val"), eval_tf, on_bad)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"--data '{root}': {exc}") from exc
    if train.classes != val.classes:
        raise DataError(f"--data '{root}': train/ has {len(train.classes)} classes and val/ has "
                        f"{len(val.classes)}; they must be the same folders")
    return train, val, calib
