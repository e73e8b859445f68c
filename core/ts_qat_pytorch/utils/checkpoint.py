"""Checkpoints: the float model + quantization JSON (``save_checkpoint``), full QAT checkpoints for resuming
(``save_qat_checkpoint`` / ``load_qat_checkpoint``, which record and check the quantization scheme), and safe
loading (``weights_only=True`` always). Every write is atomic (``atomic_io``)."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import fx, nn

from ..fake_quantize import QuantizeBase
from ..nn.qat import FusedQATModule
from ..onnx.qparams import collect_qparams, write_qparams_json
from .atomic_io import atomic_torch_save
from .scheme_record import check_scheme_record, scheme_record

logger = logging.getLogger(__name__)

__all__ = ["strip_module_prefix", "load_checkpoint", "float_state_dict", "save_checkpoint", "save_qat_checkpoint",
           "load_qat_checkpoint"]


def strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop the 'module.' prefix that DataParallel / DistributedDataParallel add."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> Any:
    """Load a checkpoint safely (no pickled code). Clear errors for missing, truncated or foreign files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint '{path}' is empty (0 bytes): it was not written completely")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint '{path}' could not be read ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                         "it is truncated, corrupt, or pickles objects other than tensors and plain "
                         "containers") from exc


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The float model's state_dict, without fake quantizers, in the original architecture's key names
    (a fused layer's BatchNorm goes back to where it was)."""
    skip = tuple(name + "." for name, m in model.named_modules() if isinstance(m, QuantizeBase))
    # the weight-1 depthwise conv a lone BatchNorm folds into (model_quantizer: batch_norms_as_convs) is not the float
    # model's: only its BatchNorm goes back
    synthetic = {name + ".weight" for name, m in model.named_modules() if getattr(m, "stands_for_batch_norm", False)}
    renames = {name + ".bn.": m.bn_name + "." for name, m in model.named_modules()
               if isinstance(m, FusedQATModule) and m.bn is not None and m.bn_name}
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith(skip) or key.endswith("._extra_state") or key in synthetic:
            continue
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value.detach().clone()
    return out


def save_checkpoint(model: nn.Module, file_path: str, file_path_json: str | None = None) -> dict[str, Any]:
    """Save the float weights (loadable into the original architecture) and, for a prepared model, the
    quantization-parameter JSON. Returns the qparams dict (or {}).

    The qparams are collected before anything is written, so an uncalibrated model raises and leaves no
    float file without its JSON; both writes are atomic."""
    model = getattr(model, "module", model)  # DDP / DataParallel
    qparams: dict[str, Any] = {}
    if file_path_json is not None:
        if not isinstance(model, fx.GraphModule):
            raise TypeError("file_path_json needs a prepared model (prepare_by_platform); got "
                            f"{type(model).__name__}")
        qparams = collect_qparams(model)
    atomic_torch_save(float_state_dict(model), file_path)
    if file_path_json is not None:
        write_qparams_json(qparams, file_path_json)
    logger.info("saved float weights to %s%s", file_path, f" and qparams to {file_path_json}" if file_path_json else "")
    return qparams


def save_qat_checkpoint(path: str, model: nn.Module, optimizer=None, scheduler=None, **extra: Any) -> None:
    """Everything needed to resume QAT exactly: weights, fake-quant state (scales, observer statistics,
    switches), optimizer and scheduler state, plus ``extra`` (epoch, best accuracy, RNG state...), and the
    quantization scheme (``quant_scheme``: backend, each quantizer's class, bits, range, per-channel, symmetry,
    the ts_qat_pytorch version) that ``load_qat_checkpoint`` checks."""
    model = getattr(model, "module", model)
    ckpt = {"state_dict": model.state_dict(), "qat": True, "backend": getattr(model, "qat_backend", None),
            "quant_scheme": scheme_record(model), **extra}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    atomic_torch_save(ckpt, path)


def load_qat_checkpoint(path: str, model: nn.Module, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_qat_checkpoint` into a model prepared the same way.

    A model quantized differently from the checkpoint (backend, quantizer class, bits, range, per-channel,
    symmetry) is refused with both sides named; a checkpoint without a scheme record loads with a warning."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"'{path}' is not a QAT checkpoint (no 'state_dict' key)")
    target = getattr(model, "module", model)
    check_scheme_record(ckpt.get("quant_scheme"), target, source=f"checkpoint '{path}'")
    target.load_state_dict(strip_module_prefix(ckpt["state_dict"]))
    if optimizer is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and "scheduler" in ckpt:
        scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt
