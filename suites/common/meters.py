"""Progress meters shared by the suites, written here. The printed lines keep the format of pytorch/examples'
imagenet script, which users and the manual know (a log format taken as given, not its code):

    AverageMeter("Loss", ":.4e")                  running value, sum, count and average of one quantity
    ProgressMeter(len(loader), [meters], prefix="Epoch: [0]", print_freq=100)
        .step(i)        once per batch: a tqdm bar when stderr is a TTY, otherwise every print_freq batches a line
                        ``Epoch: [0][  0/2503] Time 12.614 (12.614) ... Acc@1 71.48 (71.48)``
        .display_summary()                        `` * Time 12.614 Loss 1.163 Acc@1 71.480``
        .close()
    accuracy(output, target, topk=(1, 5))          top-k accuracy in percent, one 1-element tensor per k
    summary_line(top1, top5)                       `` * Acc@1 64.350 Acc@5 89.917``
"""
from __future__ import annotations

import logging
import sys
from enum import Enum

import torch

logger = logging.getLogger("suites")


class Summary(Enum):
    """Which statistic a meter reports in the summary line (``NONE``: it is left out)."""
    NONE = None
    AVERAGE = "avg"
    SUM = "sum"
    COUNT = "count"


class AverageMeter:
    """One quantity over a run: ``val`` (the latest), ``sum`` and ``count`` (weighted by ``n``) and ``avg``.
    ``str(meter)`` is ``name val (avg)`` in the meter's format spec (``":6.3f"``)."""

    def __init__(self, name: str, fmt: str = ":f", summary_type: Summary = Summary.AVERAGE):
        self.name, self.fmt, self.summary_type = name, fmt, summary_type
        self.reset()

    def reset(self) -> None:
        self.val = self.avg = self.sum = 0.0
        self.count = 0

    def update(self, val, n: int = 1) -> None:
        self.val = float(val)
        self.sum += self.val * n
        self.count += n
        self._refresh_avg()

    def _refresh_avg(self) -> None:
        self.avg = self.sum / self.count if self.count else 0.0

    def all_reduce(self) -> None:
        """Sum and count over the processes of a torch.distributed group (nothing without one)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return
        totals = torch.tensor([self.sum, self.count], dtype=torch.float64)
        dist.all_reduce(totals, dist.ReduceOp.SUM)
        self.sum, self.count = float(totals[0]), int(totals[1])
        self._refresh_avg()

    def _format(self, value) -> str:
        return format(value, self.fmt.lstrip(":"))

    def __str__(self) -> str:
        return f"{self.name} {self._format(self.val)} ({self._format(self.avg)})"

    def summary(self) -> str:
        """``name value`` of the summary statistic with 3 decimals, or "" for ``Summary.NONE``."""
        if self.summary_type.value is None:
            return ""
        return f"{self.name} {getattr(self, self.summary_type.value):.3f}"


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressMeter:
    """The periodic progress lines of a loop over ``num_batches`` batches, or a tqdm bar on an interactive
    terminal (the lines then go to the debug log)."""

    def __init__(self, num_batches: int, meters, prefix: str = "", print_freq: int = 100,
                 use_tqdm: bool | None = None, printer=None, enabled: bool = True):
        self.num_batches = num_batches
        self.meters = list(meters)
        self.prefix = prefix
        self.print_freq = max(1, int(print_freq))
        self.printer = printer or print
        self.enabled = enabled
        self.bar = None
        if enabled and (stderr_is_tty() if use_tqdm is None else use_tqdm):
            from tqdm import tqdm
            self.bar = tqdm(total=num_batches, desc=prefix.strip(), leave=False, dynamic_ncols=True)

    def position(self, batch: int) -> str:
        """``[  7/2503]``: the batch number right-aligned to the width of the total."""
        width = len(str(self.num_batches))
        return f"[{batch:>{width}d}/{self.num_batches}]"

    def line(self, batch: int) -> str:
        return " ".join([self.prefix + self.position(batch), *map(str, self.meters)])

    def display(self, batch: int) -> None:
        if self.enabled:
            self.printer(self.line(batch))

    def _due(self, batch: int) -> bool:
        return batch % self.print_freq == 0 or batch == self.num_batches - 1

    def step(self, batch: int) -> None:
        """Call after batch ``batch`` (0-based) has been processed."""
        if not self.enabled:
            return
        if self.bar is None:
            if self._due(batch):
                self.display(batch)
            return
        self.bar.update(1)
        shown = self.meters[2:] or self.meters  # the bar has its own timing: skip Time / Data when there is more
        self.bar.set_postfix_str(" ".join(map(str, shown)), refresh=False)
        if self._due(batch):
            logger.debug(self.line(batch))

    def display_summary(self) -> None:
        if self.enabled:
            self.printer(" * " + " ".join(filter(None, (m.summary() for m in self.meters))))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[torch.Tensor]:
    """For each k in ``topk``: the percentage of rows whose target class is among the k highest scores of
    ``output`` (B x classes), as a 1-element tensor; k larger than the number of classes counts as all of them."""
    with torch.no_grad():
        ranks = min(max(topk), output.shape[1])
        ranked = output.topk(ranks, dim=1, largest=True, sorted=True).indices
        found_at = ranked == target.reshape(-1, 1)  # B x ranks: where the target sits in the ranking, if anywhere
        per_cent = 100.0 / target.shape[0]
        return [found_at[:, :min(k, ranks)].float().sum().reshape(1) * per_cent for k in topk]


def summary_line(top1: float, top5: float) -> str:
    return f" * Acc@1 {top1:.3f} Acc@5 {top5:.3f}"
