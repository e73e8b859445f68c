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

from suites.common.distributed import is_main, say
from suites.common.suite import SuiteError

logger = logging.getLogger("suites")


def output_paths(args) -> dict[str, str]:
    d, a = args.out_dir, args.arch
    return dict(ckpt=os.path.join(d, f"{a}_checkpoint.pth"), best=os.path.join(d, f"{a}_model_best.pth"),
                float=os.path.join(d, f"{a}_checkpoint_float.pth"), qparams=os.path.join(d, f"{a}_qparams.json"),
                onnx=os.path.join(d, f"{a}_onnx_quantization.onnx"),
                bestonnx=os.path.join(d, f"{a}_bestonnx_quantization.onnx"),
                best_float=os.path.join(d, f"{a}_model_best_float.pth"),
                results_csv=os.path.join(d, f"{a}_results.csv"), results_png=os.path.join(d, f"{a}_results.png"))


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


def check_shapes(model: nn.Module, sd: dict, path: str, args, what: str, partial: bool = False) -> None:
    """Clear errors for a checkpoint that does not fit the model (for classifiers: the number of classes first)."""
    own = model.state_dict()
    nc = getattr(args, "num_classes", None)
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


def load_float_weights(model: nn.Module, path: str, args, what: str) -> None:
    sd = read_state_dict(path, what)
    if any(".weight_fake_quant." in k or k.endswith("_fake_quant.scale") for k in sd):
        raise SuiteError(f"{what} '{path}' is a QAT checkpoint; resume it with --resume")
    check_shapes(model, sd, path, args, what)
    model.load_state_dict(sd, strict=False)


def check_resume(args) -> None:
    """--resume before long work: readable, a QAT checkpoint, and a --lr that differs from the one its optimizer and
    LR schedule restore is reported (the checkpoint's is used)."""
    from suites.common.resume import lr_change_message
    ck = read_checkpoint(args.resume, "--resume")
    sd = read_state_dict(args.resume, "--resume", ck)
    if not any("fake_quant" in k for k in sd):
        raise SuiteError(f"--resume '{args.resume}' is not a QAT checkpoint (no fake-quant state); give float "
                         "weights with --model-path")
    check_float_tools(ck if isinstance(ck, dict) else {}, args)
    if not args.evaluate and isinstance(ck, dict) and "optimizer" in ck:
        msg = lr_change_message(ck, args.lr, args.resume, args.lr_given)
        if msg and is_main():
            logger.warning(msg)


def restore(q: nn.Module, optimizer, scheduler, args) -> dict:
    """Load --resume into the prepared model, the optimizer and the LR schedule; the checkpoint's other entries."""
    from ts_qat_pytorch.utils.utils import load_qat_checkpoint
    sd = read_state_dict(args.resume, "--resume")  # a QAT checkpoint: checked before long work (check_resume)
    # the layers' shapes (quantizer buffers may be shaped lazily: load_qat_checkpoint handles them)
    check_shapes(q, {k: v for k, v in sd.items() if "fake_quant" not in k and "post_process" not in k},
                 args.resume, args, "--resume", partial=True)
    try:
        return load_qat_checkpoint(args.resume, q, optimizer, scheduler)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise SuiteError(f"--resume '{args.resume}': {exc}") from exc


FLOAT_TOOLS = (("--cle", "cle"), ("--smoothquant", "smoothquant"))


def float_tools_record(args) -> dict:
    """--cle / --smoothquant as a checkpoint entry: they change the float model's structure before prepare (BatchNorms
    folded, restoring ChannelScales), so a --resume must process it the same way."""
    used = {key: getattr(args, key, None) for _, key in FLOAT_TOOLS if getattr(args, key, None) not in (None, False)}
    return {"float_tools": used} if used else {}


def check_float_tools(ck: dict, args) -> None:
    """A --resume checkpoint's --cle / --smoothquant against the flags: the float model must be prepared as it was."""
    made = ck.get("float_tools") or {}
    for flag, key in FLOAT_TOOLS:
        given = getattr(args, key, None) not in (None, False)
        if key in made and not given:
            raise SuiteError(f"--resume '{args.resume}' was made with {flag}: add {flag} (the float model is processed "
                             "the same way, then the checkpoint's weights replace it)")
        if given and key not in made:
            raise SuiteError(f"{flag} with --resume '{args.resume}', a checkpoint made without it: {flag} changes the "
                             "float model before prepare and calibration, which the checkpoint is past; drop "
                             f"{flag} (or start from float weights with --model-path)")


def layer_config_record(args) -> dict:
    """The run's per-layer quantization (a mixed-precision allocation, accuracy control's changes) as a checkpoint
    entry: --resume prepares the model the same way from it."""
    layers = getattr(args, "layer_config", None)
    return {"layer_config": {"backend": args.backend, "prepare": layers}} if layers else {}


def atomic_copy(src: str, dst: str) -> None:
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_all(suite, q, optimizer, scheduler, epoch: int, best, is_best: bool, paths: dict, args, m) -> None:
    """After an epoch (rank 0): the QAT checkpoint, the float weights + qparams JSON, the ONNX export, and copies of
    the checkpoint and the ONNX as the best ones when this epoch is."""
    from suites.common.stages import export_stage
    from suites.common.training import rng_state, set_rng_state
    from ts_qat_pytorch.utils.utils import save_checkpoint, save_qat_checkpoint
    rng = rng_state()
    save_qat_checkpoint(paths["ckpt"], q, optimizer, scheduler, epoch=epoch, best_metric=best,
                        metric=suite.metric.name, arch=args.arch, backend=args.backend, rng=rng,
                        **layer_config_record(args), **float_tools_record(args), **suite.checkpoint_extras(args))
    save_checkpoint(q, paths["float"], paths["qparams"])
    m.files.update(checkpoint=paths["ckpt"], float_checkpoint=paths["float"], qparams_json=paths["qparams"])
    if not args.no_export:
        with m.timed("export"):
            export_stage(suite, q, args, m)
        set_rng_state(rng)  # export draws random numbers; training continues exactly as a resumed run would
    if is_best:
        atomic_copy(paths["ckpt"], paths["best"])
        m.files["best_checkpoint"] = paths["best"]
        if not args.no_export:
            atomic_copy(paths["onnx"], paths["bestonnx"])
            m.files["best_onnx"] = paths["bestonnx"]
    say(f"=> saved {paths['ckpt']}{' (best)' if is_best else ''}, {paths['float']}, {paths['qparams']}")
