"""Device selection of the runner: ``--device cpu|0|0,1|cuda:1`` and the manual's ``--gpu N``.

    parse_devices("0,1", None, visible=2)  -> [cuda:0, cuda:1]   (one process per GPU: DistributedDataParallel)
    parse_devices(None, None, visible=2)   -> [cuda:0]           (no device named: one, the first GPU)
    parse_devices(None, None, visible=2, every=True) -> [cuda:0, cuda:1]   (torchrun: a GPU per process of the node)
    parse_devices(None, None, visible=0)   -> [cpu]
    parse_devices("3", None, visible=1)    -> SuiteError naming the GPUs there are and the fix

:func:`parse_devices` is a pure function of the flags and the number of visible GPUs, so the parsing and the errors
are tested without a GPU. :func:`select_devices` is what the runner calls: GPU indices given with ``--device`` first
become ``CUDA_VISIBLE_DEVICES``, as ultralytics' ``select_device`` does (``--device 1,2`` runs on the machine's GPUs 1
and 2, whatever ``CUDA_VISIBLE_DEVICES`` said), so the manual's
``CUDA_VISIBLE_DEVICES='1,2,3,4,5,6,7' python train_qat.py ... --device 1,2,3,4,5,6,7`` runs on those seven GPUs.
``--gpu N`` keeps pytorch/examples' meaning: the N-th visible GPU.
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


def _check_gpu_flag(device: str | None, gpu: int | None) -> None:
    if gpu is not None and device is not None and device.strip() not in (str(gpu), f"cuda:{gpu}"):
        raise SuiteError(f"--gpu {gpu} and --device {device} name different devices; give one of them")


def gpu_indices(device: str | None) -> list[int] | None:
    """The GPU indices ``--device`` names (``0``, ``0,1``, ``cuda:1``); None for no flag, ``cpu`` and ``cuda``."""
    spec = (device or "").strip().lower()
    if spec in ("", "cpu", "cuda"):
        return None
    indices = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(?:cuda:)?(\d+)\s*", part)
        if not m:
            raise SuiteError(f"--device {device!r} is not understood: give cpu, a GPU index (0), a list of GPU "
                             "indices (0,1), cuda or cuda:N")
        indices.append(int(m.group(1)))
    if len(set(indices)) != len(indices):
        raise SuiteError(f"--device {device!r} names a GPU twice; give each GPU once (e.g. --device 0,1)")
    return indices


def _missing(flag: str, missing: list[int], visible: int, named: int) -> SuiteError:
    fix = "use --device cpu" if visible == 0 else \
        f"give --device {','.join(map(str, range(min(visible, named))))} or --device cpu"
    return SuiteError(f"{flag}: GPU {', '.join(map(str, missing))} is not there ({_visible_note(visible)}); {fix}")


def parse_devices(device: str | None, gpu: int | None, visible: int, every: bool = False) -> list[torch.device]:
    """The devices a run uses, from ``--device`` (``cpu``, ``0``, ``0,1``, ``cuda``, ``cuda:1``) and ``--gpu N``;
    ``visible`` is ``torch.cuda.device_count()``. Neither flag: one device, the first GPU, else the CPU (``every``:
    every visible GPU, for torchrun's processes of a node, each taking the GPU of its local rank)."""
    _check_gpu_flag(device, gpu)
    if gpu is not None:
        device = str(gpu)
    if device is None:
        gpus = [torch.device("cuda", i) for i in range(visible)]
        return (gpus if every else gpus[:1]) or [torch.device("cpu")]
    spec = device.strip().lower()
    if spec == "cpu":
        return [torch.device("cpu")]
    if spec == "cuda":
        if visible == 0:
            raise SuiteError(f"--device cuda: {_visible_note(0)}; use --device cpu")
        return [torch.device("cuda", i) for i in range(visible)]
    indices = gpu_indices(device)
    missing = [i for i in indices if i >= visible]
    if missing:
        raise _missing(f"--gpu {gpu}" if gpu is not None else f"--device {device}", missing, visible, len(indices))
    return [torch.device("cuda", i) for i in indices]


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def select_devices(device: str | None, gpu: int | None, every: bool = False) -> list[torch.device]:
    """:func:`parse_devices` of the GPUs there are, after GPU indices of ``--device`` have become
    ``CUDA_VISIBLE_DEVICES`` (ultralytics' ``select_device``; before CUDA starts, which fixes the visible set: when
    CUDA has already started, the indices count within the GPUs visible to it). ``--device 1,2`` gives [cuda:0,
    cuda:1]: the machine's GPUs 1 and 2."""
    _check_gpu_flag(device, gpu)
    indices = gpu_indices(device)
    if indices is None or torch.cuda.is_initialized():
        return parse_devices(device, gpu, visible_gpus(), every)
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, indices))
    visible = visible_gpus()
    if visible < len(indices):  # CUDA counts the listed GPUs up to the first one that is not there
        error = _missing(f"--gpu {gpu}" if gpu is not None else f"--device {device}", indices[visible:], visible,
                         len(indices))
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
        raise error
    return [torch.device("cuda", i) for i in range(len(indices))]


def describe(devices: list[torch.device]) -> str:
    return ", ".join(str(d) for d in devices)
