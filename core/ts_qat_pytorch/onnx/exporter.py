"""Pass 2 of export: run torch's ONNX exporter.

torch's current exporter (``dynamo=True``, via torch.export) is used by default. The legacy
TorchScript exporter is used when asked for (``exporter="legacy"``), for a dynamic batch dimension
(the current exporter fails on fake-quantize ops with a symbolic batch), or as a fallback when the
current exporter fails or silently leaves the graph at another opset; the fallback is logged with the
reason. Either way the result is checked afterwards (onnx.checker, onnxruntime).
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from contextlib import redirect_stdout

import onnx
import torch

logger = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "legacy")


def _export_dynamo(module, args, path, opset, input_names, output_names):
    # the exporter's own progress lines and pass-by-pass INFO logs are noise for users
    noisy = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir")]
    levels = [lg.level for lg in noisy]
    try:
        for lg in noisy:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                        output_names=output_names, verbose=False, optimize=False)
            clean_up_keeping_quantizers(program.model)
            program.save(path, external_data=False)
    finally:
        for lg, lv in zip(noisy, levels):
            lg.setLevel(lv)


def _not_a_quantizer(node) -> bool | None:
    return False if node.op_type in ("QuantizeLinear", "DequantizeLinear") else None


def clean_up_keeping_quantizers(model) -> None:
    """The exporter's own clean-up of its raw graph (onnxscript's optimizer: constant folding, rewrite rules, dead
    nodes, constants as initializers) less two steps that erase quantizers: folding the QuantizeLinear of a constant
    (an attention bias, a quantized buffer) into a plain number, and merging identical subexpressions, which joins
    two quantizers of one tensor with equal parameters (two heads of a freshly initialised model) into one node.
    Every quantizer keeps its node, so the file names each tensor the JSON names (onnx/naming.py)."""
    import onnx_ir.passes.common as common
    from onnx_ir.passes import PassManager, Sequential
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding as folding

    loop = PassManager([
        folding.FoldConstantsPass(shape_inference=True, input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                  output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                                  should_fold=_not_a_quantizer),
        rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
        common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
    ], steps=2, early_stop=True)
    Sequential(common.InlinePass(), loop, common.RemoveUnusedNodesPass(),
               common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
               common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
               common.OutputFixPass(), common.NameFixPass())(model)


def _export_legacy(module, args, path, opset, input_names, output_names, dynamic_batch):
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in list(input_names) + list(output_names)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, path, dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export(module: torch.nn.Module, args: tuple, path: str, opset: int, input_names: list[str],
           output_names: list[str], exporter: str = "dynamo", dynamic_batch: bool = False) -> tuple[onnx.ModelProto, str]:
    """Export and return (loaded ONNX model, exporter actually used)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if not 13 <= opset <= 21:
        raise ValueError(f"opset_version must be within 13..21 (per-channel QDQ needs 13), got {opset}")
    if args and isinstance(args[-1], dict):  # torch.onnx reads a trailing dict as keyword arguments, not as one
        args = (*args, {})
    if exporter == "dynamo" and dynamic_batch:
        logger.info("dynamic batch requested: using the legacy exporter (the current one fails on "
                    "fake-quantize ops with a symbolic batch dimension)")
        exporter = "legacy"
    if exporter == "dynamo":
        try:
            _export_dynamo(module, args, path, opset, input_names, output_names)
            model = onnx.load(path)
            if _opset(model) == opset:
                return model, "dynamo"
            reason = f"it produced opset {_opset(model)} instead of {opset} (down-conversion failed)"
        except Exception as exc:  # noqa: BLE001 - any exporter failure: fall back, say why
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        logger.warning("torch.onnx dynamo exporter failed (%s); falling back to the legacy exporter", reason)
        if os.path.exists(path):
            os.unlink(path)
    _export_legacy(module, args, path, opset, input_names, output_names, dynamic_batch)
    return onnx.load(path), "legacy"
