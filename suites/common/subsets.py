"""``--val-images N``: which N validation examples a run evaluates on, the same for every suite.

    val = val_subset(val, args.val_images, args.seed)   # a torch Subset (or the data set when N covers it)

Data sets are usually sorted by class (an ImageFolder lists class by class), so their first N examples would hold a
few classes only. The subset is drawn with a fixed seed (the same examples on every run with the same seed, so runs
compare) and, given each example's class, takes the classes alike: N // classes from each (one more from some, when
N does not divide; a random set of classes when N is below their number).
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch


def subset_indices(n_total: int, n: int, seed: int | None, labels: Sequence[int] | None = None) -> list[int]:
    """Sorted indices of ``n`` of ``n_total`` examples: seeded, and class-balanced when ``labels`` (one class per
    example) are given; all of them when ``n >= n_total``."""
    if n >= n_total:
        return list(range(n_total))
    g = torch.Generator().manual_seed(0 if seed is None else seed)
    if labels is None:
        return sorted(torch.randperm(n_total, generator=g)[:n].tolist())
    if len(labels) != n_total:
        raise ValueError(f"{len(labels)} labels for {n_total} examples")
    by_class: dict = {}
    for i in torch.randperm(n_total, generator=g).tolist():  # each class's examples in a random order
        by_class.setdefault(int(labels[i]), []).append(i)
    classes = [sorted(by_class)[k] for k in torch.randperm(len(by_class), generator=g).tolist()]
    picked, depth = [], 0
    while len(picked) < n:  # round robin: one example of each class (in a random class order), then the next ...
        for c in classes:
            if depth < len(by_class[c]):
                picked.append(by_class[c][depth])
                if len(picked) == n:
                    break
        depth += 1
    return sorted(picked)


def class_labels(ds) -> Sequence[int] | None:
    """One class per example of a classification data set (an ImageFolder's ``targets``, ``labels``), else None."""
    for name in ("targets", "labels"):
        labels = getattr(ds, name, None)
        if labels is None or len(labels) != len(ds) or not len(labels):
            continue
        first = labels[0]
        if isinstance(first, numbers.Integral) or (isinstance(first, torch.Tensor) and first.dim() == 0):
            return labels
    return None


def val_subset(ds, n: int | None, seed: int | None, labels: Sequence[int] | None = None):
    """``ds`` limited to ``n`` examples (:func:`subset_indices`; the classes of ``labels``, else the data set's own,
    :func:`class_labels`) as a torch Subset; ``ds`` itself without ``n`` or when ``n`` covers it."""
    if not n or n >= len(ds):
        return ds
    return torch.utils.data.Subset(ds, subset_indices(len(ds), n, seed, class_labels(ds) if labels is None else labels))
