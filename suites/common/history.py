"""The run's epochs, written after each one (rank 0), so that a run killed between epochs leaves what it did:

    <arch>_results.csv   one row an epoch: epoch, stage (qat / float), train_loss, the train meters (train_Acc@1,
                         train_box ...), the suite's metric on the validation set, lr, seconds
    <arch>_results.png   the training loss and the metric against the epoch (matplotlib's Agg canvas; without
                         matplotlib the CSV alone)

    h = EpochHistory(csv_path, png_path, "top1", keep_before=start_epoch)   # --resume: the earlier epochs' rows kept
    h.add({"epoch": 0, "stage": "qat", "train_loss": 0.41, "top1": 92.5, "lr": 5e-5, "seconds": 61.2})

The metrics JSON is rewritten beside it (RunMetrics.epoch_done).
"""
from __future__ import annotations

import csv
import io
import logging
import os

logger = logging.getLogger("suites")


class EpochHistory:
    def __init__(self, csv_path: str, png_path: str, metric: str, keep_before: int = 0):
        self.csv_path, self.png_path, self.metric = csv_path, png_path, metric
        self.rows: list[dict] = read_rows(csv_path, keep_before) if keep_before > 0 else []

    def add(self, row: dict) -> None:
        self.rows.append(dict(row))
        write_csv(self.rows, self.csv_path)
        plot(self.rows, self.png_path, self.metric)


def read_rows(path: str, before: int) -> list[dict]:
    """The rows of an earlier run's CSV for epochs below ``before`` (numbers read back as numbers); none without the
    file."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return [r for r in rows if isinstance(r.get("epoch"), (int, float)) and r["epoch"] < before]


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def write_csv(rows: list[dict], path: str) -> None:
    """All rows (the columns in order of first appearance), atomically."""
    from ts_qat_pytorch.utils.utils import atomic_write_bytes
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def plot(rows: list[dict], path: str, metric: str) -> bool:
    """The training loss and ``metric`` against the epoch, as a PNG (atomically); False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed: no %s (the CSV has the same numbers)", os.path.basename(path))
        return False
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    loss_ax, metric_ax = fig.subplots(1, 2)
    stages = list(dict.fromkeys(r.get("stage") for r in rows))
    for ax, key, label in ((loss_ax, "train_loss", "training loss"), (metric_ax, metric, f"{metric} (validation)")):
        for stage in stages:
            xy = [(r["epoch"], r[key]) for r in rows
                  if r.get("stage") == stage and isinstance(r.get(key), (int, float))]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=str(stage))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(stages) > 1:
            ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp"
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)
    return True


def epoch_row(stage: str, epoch: int, train: tuple[dict, float], scores: dict, lr: float, seconds: float) -> dict:
    """One row: ``train`` is train_epoch's (meter averages, loss), ``scores`` {the metric's name: its value}."""
    meters, loss = train
    return {"epoch": epoch, "stage": stage, "train_loss": loss, **{f"train_{k}": v for k, v in meters.items()},
            **scores, "lr": lr, "seconds": round(seconds, 2)}
