"""The segmentation metric: a confusion matrix over every scored pixel (ignore index 255 excluded), then per-class
IoU = TP / (TP + FP + FN), mIoU (the mean over the classes present in the labels or the predictions; background
included) and pixel accuracy. mIoU and pixel accuracy are in percent, like the imagenet suite's top-1."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = 255  # "ignore": never scored (metric.py) nor trained on


def upsampled(logits: torch.Tensor, size) -> torch.Tensor:
    """Logits at the label's resolution (the LR-ASPP models return them at 1/8): bilinear, as torchvision does."""
    if logits.shape[-2:] != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits


class ConfusionMatrix:
    """``mat[t, p]``: pixels of true class t predicted as p."""

    def __init__(self, num_classes: int):
        self.n = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        t, p = target.reshape(-1).cpu(), pred.reshape(-1).cpu()
        keep = t != IGNORE
        t, p = t[keep].long(), p[keep].long()
        self.mat += torch.bincount(t * self.n + p, minlength=self.n * self.n).reshape(self.n, self.n)

    def iou(self) -> np.ndarray:
        """Per-class IoU (0..1); NaN for a class neither labelled nor predicted."""
        m = self.mat.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan"))).numpy()

    def scores(self) -> dict:
        iou = self.iou()
        total = int(self.mat.sum())
        return {"miou": round(100 * float(np.nanmean(iou)), 3) if not np.isnan(iou).all() else 0.0,
                "pixel_acc": round(100 * float(self.mat.diag().sum()) / max(1, total), 3),
                "pixels": total, "iou": [None if np.isnan(v) else round(100 * float(v), 3) for v in iou]}


def plot_iou(per_stage: dict, classes: list[str], path: str, title: str) -> None:
    """Grouped bar chart of per-class IoU (%), one bar per stage (float, qat, ort), written to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stages = [s for s in ("float", "qat", "ort") if s in per_stage]
    x = np.arange(len(classes))
    w = 0.8 / max(1, len(stages))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(classes)), 4.0))
    for i, s in enumerate(stages):
        vals = [np.nan if v is None else v for v in per_stage[s]["iou"]]
        ax.bar(x + (i - (len(stages) - 1) / 2) * w, vals, w, label=f"{s} (mIoU {per_stage[s]['miou']:.2f})")
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
