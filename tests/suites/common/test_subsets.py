"""--val-images (suites/common/subsets.py): a seeded subset that takes the classes alike, for every suite."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from suites.common.subsets import subset_indices, val_subset


def test_the_subset_takes_every_class_alike_and_is_seeded():
    labels = torch.arange(1000) // 100  # sorted by class, as an ImageFolder lists its images
    idx = subset_indices(1000, 50, seed=0, labels=labels)
    assert torch.bincount(labels[idx], minlength=10).tolist() == [5] * 10
    assert idx == sorted(idx) and idx == subset_indices(1000, 50, seed=0, labels=labels)  # same seed, same images
    assert idx != subset_indices(1000, 50, seed=1, labels=labels)
    few = subset_indices(1000, 7, seed=0, labels=labels)  # fewer images than classes: 7 classes, one image each
    assert sorted(torch.bincount(labels[few], minlength=10).tolist()) == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    uneven = torch.tensor([0] * 3 + [1] * 97)  # a class with fewer images than its share gives what it has
    assert torch.bincount(uneven[subset_indices(100, 20, 0, uneven)]).tolist() == [3, 17]
    assert len(set(subset_indices(100, 30, 0))) == 30 and subset_indices(5, 9, 0) == [0, 1, 2, 3, 4]


def test_val_subset_reads_the_classes_of_a_classification_data_set():
    ds = torch.utils.data.TensorDataset(torch.zeros(40, 1))
    ds.targets = [i // 10 for i in range(40)]
    sub = val_subset(ds, 8, seed=0)
    assert sorted(ds.targets[i] for i in sub.indices) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert val_subset(ds, None, 0) is ds and val_subset(ds, 40, 0) is ds


def test_imagenet_val_images_cover_the_classes_of_an_image_folder(tmp_path):
    """--data with 4 class folders and --val-images 4: one image of each class, not the first class's 4."""
    from PIL import Image

    from suites.common.cli import build_parser, resolve
    from suites.imagenet.suite import SUITE
    for split in ("train", "val"):
        for c in range(4):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(5):
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / f"c{c}" / f"{i}.png")
    args = resolve(SUITE, build_parser(SUITE).parse_args(["--data", str(tmp_path), "-nc", "4", "--pretrained",
                                                          "--val-images", "4"]))
    val = SUITE.datasets(args).val
    assert len(val) == 4 and sorted(val.dataset.targets[i] for i in val.indices) == [0, 1, 2, 3]


@pytest.mark.parametrize("n", [1, 3, 12])
def test_yolov5_val_images_take_the_images_classes_alike(n):
    from suites.yolov5.datasets import Record, val_images
    recs = [Record(i, f"{i}.png", 8, 8, np.zeros((1, 4), np.float32), np.array([i // 4])) for i in range(12)]
    picked = val_images(recs, n, 0)
    counts = [sum(int(recs[i].cls[0]) == c for i in picked) for c in range(3)]
    assert len(picked) == n and max(counts) - min(counts) <= 1
