"""Device selection of the runner: ``--device cpu|0|0,1|cuda:1`` and the manual's ``--gpu N``.

    parse_devices("0,1", None, visible=2)  -> [cuda:0, cuda:1]   (one process per GPU: DistributedDataParallel)
    parse_devices(None, None, visible=2)   -> [cuda:0, cuda:1]   (no device named: every visible GPU)
    parse_devices(None, None, visible=0)   -> [cpu]
    parse_devices("3", None, visible=1)    -> SuiteError naming the GPUs there are and the fix

Pure functions of the flags and the number of visible GPUs, so the parsing and the errors are tested without a GPU.
"""
from __future__ import annotations

import os
import re

import torch

from suites.common.suite import SuiteError


def _visible_note(visible: int) -> str:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={env!r})" if env is not None else ""
    if visible == 0:
        return f"no CUDA GPU is visible{where}"
    return f"{visible} CUDA GPU{'s' if visible > 1 else ''} visible{where}: {', '.join(map(str, range(visible)))}"


def parse_devices(device: str | None, gpu: int | None, visible: int) -> list[torch.device]:
    """The devices a run uses, from ``--device`` (``cpu``, ``0``, ``0,1``, ``cuda``, ``cuda:1``) and ``--gpu N``;
    ``visible`` is ``torch.cuda.device_count()``. Neither flag: every visible GPU, else the CPU."""
    if gpu is not None:
        if device is not None and device.strip() not in (str(gpu), f"cuda:{gpu}"):
            raise SuiteError(f"--gpu {gpu} and --device {device} name different devices; give one of them")
        device = str(gpu)
    if device is None:
        return [torch.device("cuda", i) for i in range(visible)] or [torch.device("cpu")]
    spec = device.strip().lower()
    if spec == "cpu":
        return [torch.device("cpu")]
    if spec == "cuda":
        if visible == 0:
            raise SuiteError(f"--device cuda: {_visible_note(0)}; use --device cpu")
        return [torch.device("cuda", i) for i in range(visible)]
    indices = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(?:cuda:)?(\d+)\s*", part)
        if not m:
            raise SuiteError(f"--device {device!r} is not understood: give cpu, a GPU index (0), a list of GPU "
                             "indices (0,1), cuda or cuda:N")
        indices.append(int(m.group(1)))
    if len(set(indices)) != len(indices):
        raise SuiteError(f"--device {device!r} names a GPU twice; give each GPU once (e.g. --device 0,1)")
    missing = [i for i in indices if i >= visible]
    if missing:
        fix = "use --device cpu" if visible == 0 else \
            f"give --device {','.join(map(str, range(min(visible, len(indices)))))} or --device cpu"
        flag = f"--gpu {gpu}" if gpu is not None else f"--device {device}"
        raise SuiteError(f"{flag}: GPU {', '.join(map(str, missing))} is not there ({_visible_note(visible)}); {fix}")
    return [torch.device("cuda", i) for i in indices]


def describe(devices: list[torch.device]) -> str:
    return ", ".join(str(d) for d in devices)
