"""Training / evaluation meters shared by the example suites (descended from pytorch/examples imagenet).

    AverageMeter("Loss", ":.4e")                  running value + average
    ProgressMeter(len(loader), [meters], prefix="Epoch: [0]", print_freq=100)
        .step(i)        call once per batch: updates a tqdm bar when stderr is a TTY, otherwise prints
                        ``Epoch: [0][  0/2503] Time 12.614 (12.614) ... Acc@1 71.48 (71.48)`` every print_freq
        .close()
    accuracy(output, target, topk=(1, 5))          top-k precision in percent
    summary_line(top1, top5)                       `` * Acc@1 64.350 Acc@5 89.917``
"""
from __future__ import annotations

import logging
import sys
from enum import Enum

import torch

logger = logging.getLogger("suites")


class Summary(Enum):
    NONE = 0
    AVERAGE = 1
    SUM = 2
    COUNT = 3


class AverageMeter:
    """Computes and stores the average and current value."""

    def __init__(self, name: str, fmt: str = ":f", summary_type: Summary = Summary.AVERAGE):
        self.name = name
        self.fmt = fmt
        self.summary_type = summary_type
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.avg = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val, n: int = 1) -> None:
        val = float(val)
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count if self.count else 0.0

    def all_reduce(self) -> None:
        """Sum over the processes of a torch.distributed group (no-op when not initialised)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return
        t = torch.tensor([self.sum, self.count], dtype=torch.float64)
        dist.all_reduce(t, dist.ReduceOp.SUM)
        self.sum, self.count = float(t[0]), int(t[1])
        self.avg = self.sum / self.count if self.count else 0.0

    def __str__(self) -> str:
        fmtstr = "{name} {val" + self.fmt + "} ({avg" + self.fmt + "})"
        return fmtstr.format(**self.__dict__)

    def summary(self) -> str:
        if self.summary_type is Summary.NONE:
            return ""
        key = {Summary.AVERAGE: "avg", Summary.SUM: "sum", Summary.COUNT: "count"}[self.summary_type]
        return ("{name} {" + key + ":.3f}").format(name=self.name, **{key: getattr(self, key)})


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressMeter:
    """Periodic log lines in the manual's format, or a tqdm bar on an interactive terminal."""

    def __init__(self, num_batches: int, meters, prefix: str = "", print_freq: int = 100,
                 use_tqdm: bool | None = None, printer=None, enabled: bool = True):
        self.num_batches = num_batches
        self.batch_fmtstr = self._get_batch_fmtstr(num_batches)
        self.meters = list(meters)
        self.prefix = prefix
        self.print_freq = max(1, int(print_freq))
        self.printer = printer or print
        self.enabled = enabled
        self.bar = None
        if enabled and (stderr_is_tty() if use_tqdm is None else use_tqdm):
            from tqdm import tqdm
            self.bar = tqdm(total=num_batches, desc=prefix.strip(), leave=False, dynamic_ncols=True)

    def line(self, batch: int) -> str:
        entries = [self.prefix + self.batch_fmtstr.format(batch)]
        entries += [str(meter) for meter in self.meters]
        return " ".join(entries)

    def display(self, batch: int) -> None:
        if self.enabled:
            self.printer(self.line(batch))

    def step(self, batch: int) -> None:
        """Call after batch ``batch`` (0-based) has been processed."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(" ".join(str(m) for m in self.meters[2:] or self.meters), refresh=False)
            if batch % self.print_freq == 0 or batch == self.num_batches - 1:
                logger.debug(self.line(batch))
        elif batch % self.print_freq == 0 or batch == self.num_batches - 1:
            self.display(batch)

    def display_summary(self) -> None:
        if self.enabled:
            self.printer(" * " + " ".join(m.summary() for m in self.meters if m.summary()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @staticmethod
    def _get_batch_fmtstr(num_batches: int) -> str:
        num_digits = len(str(num_batches // 1))
        fmt = "{:" + str(num_digits) + "d}"
        return "[" + fmt + "/" + fmt.format(num_batches) + "]"


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[torch.Tensor]:
    """Precision@k (percent) for each k in topk."""
    with torch.no_grad():
        maxk = min(max(topk), output.shape[1])
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        res = []
        for k in topk:
            k = min(k, maxk)
            correct_k = correct[:k].reshape(-1).float().sum(0, keepdim=True)
            res.append(correct_k.mul_(100.0 / batch_size))
        return res


def summary_line(top1: float, top5: float) -> str:
    return f" * Acc@1 {top1:.3f} Acc@5 {top5:.3f}"
