"""The float tools' self-check: the model's outputs on the caller's example before and after a step.

A step that should leave the model's function unchanged (BatchNorm folding, cross-layer equalization, SmoothQuant)
is measured on the example; the report records the relative change, and a change beyond float error is logged as
a warning naming the step (a pattern the tools mistook would otherwise give a wrong model silently).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# float32 rounding through a few dozen layers stays far below this; a mistaken pattern is far above it
EXACT_TOLERANCE = 1e-3


def as_args(example_inputs) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def flat(value) -> list[torch.Tensor]:
    """The floating-point tensors in a model's output (a tensor, a tuple, a dict ...), copied."""
    return [t.detach().float().clone() for t in torch.utils._pytree.tree_leaves(value)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


@torch.no_grad()
def outputs(model: nn.Module, example_inputs) -> list[torch.Tensor]:
    """The floating-point tensors the model returns for ``example_inputs`` (a tensor or a tuple of inputs)."""
    return flat(model(*as_args(example_inputs)))


def relative_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """max |after - before| / max |before| over the outputs."""
    diff = max((float((a - b).abs().max()) for a, b in zip(after, before) if a.numel()), default=0.0)
    ref = max((float(b.abs().max()) for b in before if b.numel()), default=0.0)
    return diff / max(ref, 1e-12)


def check_exact(step: str, change: float) -> None:
    if change > EXACT_TOLERANCE:
        logger.warning("%s changed the float model's outputs by %.3g (relative) on the example input; it should "
                       "leave them unchanged. Exclude the layers concerned (leaf_module) and report the model to "
                       "the maintainers", step, change)
