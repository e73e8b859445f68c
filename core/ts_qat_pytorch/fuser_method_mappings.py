"""Which float layer sequences fuse into which QAT layer.

Keys are (layer type, BatchNorm type or None, has activation); the activation may be a ReLU module,
``F.relu`` / ``torch.relu`` / ``Tensor.relu``. ``prepare_by_platform`` looks patterns up here; a
backend may pass its own table, and ``prepare_custom_config_dict['extra_fuse_dict']`` adds patterns
(:func:`fusion_table`).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Mapping

from torch import nn

from .nn import qat

logger = logging.getLogger(__name__)

FUSION_PATTERNS: dict[tuple[type, type | None, bool], type] = {
    (nn.Conv1d, nn.BatchNorm1d, False): qat.ConvBn1d,
    (nn.Conv1d, nn.BatchNorm1d, True): qat.ConvBnReLU1d,
    (nn.Conv1d, None, True): qat.ConvReLU1d,
    (nn.Conv2d, nn.BatchNorm2d, False): qat.ConvBn2d,
    (nn.Conv2d, nn.BatchNorm2d, True): qat.ConvBnReLU2d,
    (nn.Conv2d, None, True): qat.ConvReLU2d,
    (nn.ConvTranspose1d, nn.BatchNorm1d, False): qat.ConvTransposeBn1d,
    (nn.ConvTranspose1d, nn.BatchNorm1d, True): qat.ConvTransposeBnReLU1d,
    (nn.ConvTranspose1d, None, True): qat.ConvTransposeReLU1d,
    (nn.ConvTranspose2d, nn.BatchNorm2d, False): qat.ConvTransposeBn2d,
    (nn.ConvTranspose2d, nn.BatchNorm2d, True): qat.ConvTransposeBnReLU2d,
    (nn.ConvTranspose2d, None, True): qat.ConvTransposeReLU2d,
    (nn.Linear, nn.BatchNorm1d, False): qat.LinearBn1d,
    (nn.Linear, nn.BatchNorm1d, True): qat.LinearBnReLU1d,
    (nn.Linear, None, True): qat.LinearReLU,
}

# Activations folded into the preceding layer (a deployed Conv+Relu / Conv+Clip is one kernel).
FUSABLE_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6)

# extra_fuse_dict keys (the ancestor's). Only the fuser mapping does anything here: its keys are the patterns
# and its values build the QAT layer directly, which the ancestor spread over the other two.
EXTRA_FUSE_KEYS = ("additional_fuser_method_mapping", "additional_fusion_pattern", "additional_qat_module_mapping")

_FUSER_HELP = ("map a pattern (layer type, norm type[, activation type]) or (layer type, activation type), in "
               "forward order, to a fused QAT class (e.g. ts_qat_pytorch.nn.qat.ConvBnReLU2d) or to a function "
               "fuser(layer, bn, act, weight_qconfig, bn_name) returning a QAT layer")


def build_fused(maker: Any, layer: nn.Module, bn: nn.Module | None, act: nn.Module | None,
         weight_qconfig: Callable, bn_name: str | None) -> nn.Module:
    """Build the fused QAT layer for one matched pattern with a table value (class or function)."""
    build = maker.from_modules if hasattr(maker, "from_modules") else maker
    fused = build(layer, bn, act, weight_qconfig, bn_name)
    if not hasattr(fused, "weight_fake_quant"):
        raise ValueError(f"extra_fuse_dict: the fuser for ({type(layer).__name__}, "
                         f"{type(bn).__name__ if bn is not None else None}, {type(act).__name__ if act else None}) "
                         f"returned {type(fused).__name__}, which has no weight fake quantizer: {_FUSER_HELP}")
    return fused


def _pattern_key(pattern: Any) -> tuple[type, type | None, bool]:
    if not (isinstance(pattern, tuple) and 2 <= len(pattern) <= 3
            and all(isinstance(t, type) and issubclass(t, nn.Module) for t in pattern)):
        raise ValueError(f"extra_fuse_dict: pattern {pattern!r} is not a tuple of 2 or 3 nn.Module classes; "
                         + _FUSER_HELP)
    layer, *rest = pattern
    acts = [t for t in rest if issubclass(t, FUSABLE_ACTIVATION_MODULES)]
    norms = [t for t in rest if t not in acts]
    if len(norms) > 1 or (len(rest) == 2 and (len(acts) != 1 or rest[-1] is not acts[0])):
        names = ", ".join(t.__name__ for t in rest)
        raise ValueError(f"extra_fuse_dict: pattern {tuple(t.__name__ for t in pattern)}: after the layer comes a "
                         f"norm, then an activation; only {[t.__name__ for t in FUSABLE_ACTIVATION_MODULES]} "
                         f"fold into a layer as activations (got {names})")
    return layer, (norms[0] if norms else None), bool(acts)


def _check_fuser(pattern: Any, key: tuple, maker: Any) -> None:
    if hasattr(maker, "from_modules"):
        if key[1] is not None and not issubclass(key[1], nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"extra_fuse_dict: {maker.__name__} folds a BatchNorm (running mean / variance), "
                             f"not a {key[1].__name__}; for another module write a function fuser(layer, bn, act, "
                             "weight_qconfig, bn_name) that returns the QAT layer")
        return
    if not callable(maker) or isinstance(maker, type):
        raise ValueError(f"extra_fuse_dict: pattern {pattern!r} maps to {maker!r}, which is neither a fused QAT "
                         f"class nor a function; {_FUSER_HELP}")
    params = list(inspect.signature(maker).parameters)
    if params and params[0] == "is_qat":
        raise ValueError(f"extra_fuse_dict: {maker.__name__}(is_qat, ...) is an MQBench / torch.ao fuser that builds "
                         f"a torch.ao intrinsic module; {_FUSER_HELP}")


def fusion_table(extra_fuse_dict: Mapping[str, Any] | None,
                 base: Mapping[tuple[type, type | None, bool], Any] = FUSION_PATTERNS) -> dict:
    """``base`` with ``extra_fuse_dict['additional_fuser_method_mapping']`` merged in (extra patterns win)."""
    extra = dict(extra_fuse_dict or {})
    unknown = sorted(set(extra) - set(EXTRA_FUSE_KEYS))
    if unknown:
        raise ValueError(f"unknown extra_fuse_dict keys {unknown}; valid keys: {list(EXTRA_FUSE_KEYS)}")
    ignored = [k for k in EXTRA_FUSE_KEYS[1:] if extra.get(k)]
    if ignored:
        logger.info("extra_fuse_dict: %s not needed here (the patterns are additional_fuser_method_mapping's keys, "
                    "its values build the QAT layer); ignored", ignored)
    mapping = extra.get("additional_fuser_method_mapping") or {}
    if not isinstance(mapping, Mapping):
        raise ValueError("extra_fuse_dict['additional_fuser_method_mapping'] must be a dict; " + _FUSER_HELP)
    table = dict(base)
    for pattern, maker in mapping.items():
        key = _pattern_key(pattern)
        _check_fuser(pattern, key, maker)
        table[key] = maker
    return table
