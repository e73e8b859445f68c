"""Stage timing and the one metrics JSON each suite run writes (results + wall time per stage)."""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Callable

import torch.distributed as dist


def is_main() -> bool:
    """True outside distributed runs and on rank 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Stages:
    """``with stages.timed("qat_train"): ...`` adds the stage's wall time to ``metrics["times_s"]`` (a stage run
    twice accumulates); results go into ``metrics``; :meth:`write` stores them atomically (rank 0 only)."""

    def __init__(self, path: str, suite: str, log: Callable[[str], None] = print, **info):
        self.path, self.log, self.t0 = path, log, time.time()
        self.metrics: dict = {"suite": suite, **info, "times_s": {}}

    @contextlib.contextmanager
    def timed(self, name: str):
        t, ok = time.time(), False
        self.log(f"==> stage {name}")
        try:
            yield self
            ok = True
        finally:
            dt = time.time() - t
            self.metrics["times_s"][name] = round(dt + self.metrics["times_s"].get(name, 0.0), 2)
            if ok:
                self.log(f"==> stage {name} done in {dt:.1f} s")

    def write(self) -> None:
        self.metrics["times_s"]["total"] = round(time.time() - self.t0, 2)
        if not is_main():
            return
        from ts_qat_pytorch.utils.utils import atomic_write_bytes
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        atomic_write_bytes(self.path, (json.dumps(self.metrics, indent=2, default=str) + "\n").encode())
