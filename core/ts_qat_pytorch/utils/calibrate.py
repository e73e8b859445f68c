"""``calibrate``: the calibration step of the documented flow as one call.

    calibrate(model, loader, num_batches=32)

is ``model.eval(); enable_calibration(model)``, forward passes under ``torch.no_grad()`` on the model's device,
then the previous training mode and ``enable_quantization(model)``.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .state import enable_calibration, enable_quantization

logger = logging.getLogger(__name__)

__all__ = ["calibrate"]


def _device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _default_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor is the input; of a tuple / list (a DataLoader's (input, target)) the first element is; a dict holds
    keyword arguments."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)) and batch:
        return model(batch[0])
    raise TypeError(f"calibrate: cannot feed a batch of type {type(batch).__name__} to the model; pass "
                    "forward=lambda model, batch: model(...) to say how")


def calibrate(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None,
              forward: Callable[[nn.Module, Any], Any] | None = None) -> int:
    """Calibrate a prepared model's quantizers on ``batches`` and switch it to quantization. Returns the number
    of batches used.

    batches      an iterable of batches (a DataLoader, a list): each a tensor, a tuple / list whose first element
                 is the input (e.g. (images, targets)), or a dict of keyword arguments; tensors are moved to the
                 model's device.
    num_batches  stop after this many (default: all).
    forward      ``forward(model, batch)`` for anything else (several inputs, preprocessing), e.g.
                 ``lambda m, b: m(b["ids"], b["mask"])``.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"calibrate: num_batches must be at least 1, got {num_batches}")
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ValueError("calibrate: batches is empty, so nothing would be calibrated; pass a DataLoader or a list "
                         "with at least one batch of representative inputs")
    forward = forward or _default_forward
    device = _device(model)
    try:
        total = min(len(batches), num_batches or len(batches))  # type: ignore[arg-type]
    except TypeError:  # a generator: length unknown
        total = num_batches
    every = max(1, (total or 100) // 10)
    was_training = model.training
    model.eval()
    enable_calibration(model)
    n = 0
    try:
        with torch.no_grad():
            for batch in itertools.chain([first], it):
                forward(model, _to(batch, device))
                n += 1
                if n % every == 0 or n == total:
                    logger.info("calibration: %d%s batches", n, f"/{total}" if total else "")
                if num_batches is not None and n >= num_batches:
                    break
    finally:
        model.train(was_training)
    enable_quantization(model)
    logger.info("calibrated on %d batches; quantization on", n)
    return n
