"""Weights in and out of a run: reading float weights and QAT checkpoints with errors that name the flag, the
manual's output files, and the atomic writes after each epoch.

Output files (``<output-dir>/<suite>/``, ``<arch>`` = the suite's model name):

    <arch>_checkpoint.pth              full QAT state (save_qat_checkpoint): --resume continues from it
    <arch>_model_best.pth              the same for the best epoch
    <arch>_checkpoint_float.pth        float weights loadable into the architecture + <arch>_qparams.json
    <arch>_onnx_quantization.onnx      QDQ int8 ONNX of the last epoch (+ _qparams.json)
    <arch>_bestonnx_quantization.onnx  the same for the best epoch
    <arch>_metrics.json                the metrics (suites/common/metrics.py), rewritten after each epoch
    <arch>_results.csv / .png          one row an epoch: losses, the metric, lr, seconds; the curves
"""
from __future__ import annotations

import logging
import os
import shutil

import torch
from torch import nn

from suites.common.distributed import is_main
from suites.common.suite import SuiteError

logger = logging.getLogger("suites")


def read_checkpoint(path: str, what: str):
    """The checkpoint as saved (torch.load(weights_only=True) through the core's load_checkpoint), or a
    SuiteError naming the flag for a missing, empty, truncated or foreign file."""
    from ts_qat_pytorch.utils.utils import load_checkpoint
    try:
        return load_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        raise SuiteError(f"{what}: {exc}") from exc


def read_qat_checkpoint(path: str, what: str, error: type[Exception] = SuiteError, hint: str = "") -> dict:
    """A QAT checkpoint (a dict whose 'state_dict' holds fake-quant state), read safely, or ``error`` naming the flag,
    the file and what is wrong; ``hint`` says where the right file comes from."""
    from ts_qat_pytorch.utils.utils import load_checkpoint
    try:
        ck = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        raise error(f"{what}: {exc}") from exc
    sd = ck.get("state_dict") if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or not any("fake_quant" in k for k in sd):
        raise error(f"{what} '{path}' is not a QAT checkpoint (no 'state_dict' with fake-quant state)"
                    + (f"; {hint}" if hint else ""))
    return ck


def read_state_dict(path: str, what: str, ckpt=None) -> dict:
    from ts_qat_pytorch.utils.utils import strip_module_prefix
    if ckpt is None:
        ckpt = read_checkpoint(path, what)
    if isinstance(ckpt, dict) and "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) or k.endswith("_extra_state")
                                             for k, v in ckpt.items()):
        raise SuiteError(f"{what}: '{path}' is not a state_dict (a dict of tensors)")
    return strip_module_prefix(ckpt)


def check_shapes(model: nn.Module, sd: dict, path: str, what: str, nc: int | None = None,
                 partial: bool = False) -> None:
    """Clear errors for a checkpoint that does not fit the model (for classifiers, ``nc`` classes: the number of
    classes first)."""
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            if nc and own[k].dim() >= 1 and own[k].shape[0] == nc and v.shape[0] != nc and \
                    own[k].shape[1:] == v.shape[1:]:
                raise SuiteError(f"{what} '{path}' has {v.shape[0]} classes but -nc/--num-classes is "
                                 f"{nc} (tensor '{k}': {tuple(v.shape)} vs {tuple(own[k].shape)})")
            raise SuiteError(f"{what} '{path}' does not fit the model: '{k}' is {tuple(v.shape)} in the file "
                             f"and {tuple(own[k].shape)} in the model")
    if partial:
        return
    missing = [k for k in own if k not in sd and not k.endswith(("._extra_state", "num_batches_tracked"))]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise SuiteError(f"{what} '{path}' does not match the architecture: {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")


def load_float_weights(model: nn.Module, path: str, what: str, nc: int | None = None) -> None:
    sd = read_state_dict(path, what)
    if any(".weight_fake_quant." in k or k.endswith("_fake_quant.scale") for k in sd):
        raise SuiteError(f"{what} '{path}' is a QAT checkpoint; resume it with --resume")
    check_shapes(model, sd, path, what, nc)
    model.load_state_dict(sd, strict=False)


def check_resume(cfg) -> None:
    """--resume before long work: readable, a QAT checkpoint, and a --lr that differs from the one its optimizer and
    LR schedule restore is reported (the checkpoint's is used)."""
    from suites.common.resume import lr_change_message
    ck = read_checkpoint(cfg.resume, "--resume")
    sd = read_state_dict(cfg.resume, "--resume", ck)
    if not any("fake_quant" in k for k in sd):
        raise SuiteError(f"--resume '{cfg.resume}' is not a QAT checkpoint (no fake-quant state); give float "
                         "weights with --model-path")
    check_float_tools(ck if isinstance(ck, dict) else {}, cfg)
    if not cfg.evaluate and isinstance(ck, dict) and "optimizer" in ck:
        msg = lr_change_message(ck, cfg.lr, cfg.resume, cfg.lr_given)
        if msg and is_main():
            logger.warning(msg)


def restore(q: nn.Module, optimizer, scheduler, cfg) -> dict:
    """Load --resume into the prepared model, the optimizer and the LR schedule; the checkpoint's other entries."""
    from ts_qat_pytorch.utils.utils import load_qat_checkpoint
    sd = read_state_dict(cfg.resume, "--resume")  # a QAT checkpoint: checked before long work (check_resume)
    # the layers' shapes (quantizer buffers may be shaped lazily: load_qat_checkpoint handles them)
    check_shapes(q, {k: v for k, v in sd.items() if "fake_quant" not in k and "post_process" not in k},
                 cfg.resume, "--resume", cfg.num_classes, partial=True)
    try:
        return load_qat_checkpoint(cfg.resume, q, optimizer, scheduler)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise SuiteError(f"--resume '{cfg.resume}': {exc}") from exc


FLOAT_TOOLS = (("--cle", "cle"), ("--smoothquant", "smoothquant"))


def check_float_tools(ck: dict, cfg) -> None:
    """A --resume checkpoint's --cle / --smoothquant against the flags: the float model must be prepared as it was."""
    made = ck.get("float_tools") or {}
    for flag, key in FLOAT_TOOLS:
        given = {"cle": cfg.cle, "smoothquant": cfg.smoothquant}[key] not in (None, False)
        if key in made and not given:
            raise SuiteError(f"--resume '{cfg.resume}' was made with {flag}: add {flag} (the float model is processed "
                             "the same way, then the checkpoint's weights replace it)")
        if given and key not in made:
            raise SuiteError(f"{flag} with --resume '{cfg.resume}', a checkpoint made without it: {flag} changes the "
                             "float model before prepare and calibration, which the checkpoint is past; drop "
                             f"{flag} (or start from float weights with --model-path)")


def atomic_copy(src: str, dst: str) -> None:
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
