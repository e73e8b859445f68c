"""The quantization-parameter JSON: one entry per quantized tensor, keyed by its ONNX tensor name.

Activations are named after the traced node whose output is quantized (graph inputs keep their
input names); weights after their parameter (``<layer>.weight``). ``convert_export`` renames the
exported ONNX tensors to exactly these names, so the JSON and the ONNX file agree.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from torch import fx

from ..fake_quantize import QuantizeBase
from ..nn.qat import QATMixin
from ..utils.atomic_io import atomic_write_bytes

FORMAT = "ts_qat_pytorch.qparams"
VERSION = 1


def quantizer_call_sites(gm: fx.GraphModule):
    """(fx node calling a quantizer, the quantizer, canonical name of the tensor it quantizes)."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, QuantizeBase):
                yield node, mod, node.args[0].name


def weight_quantizers(gm: fx.GraphModule):
    """(layer name, layer) for every QAT layer with a weight quantizer."""
    for name, mod in gm.named_modules():
        if isinstance(mod, QATMixin) and isinstance(getattr(mod, "weight_fake_quant", None), QuantizeBase):
            yield name, mod


def entry(fq: QuantizeBase, kind: str) -> dict[str, Any]:
    scale, zp = fq.qparams()
    s = fq.scheme
    return {
        "kind": kind, "quantizer": fq.qualname, "type": type(fq).__name__,
        "scale": [float(v) for v in scale], "zero_point": [int(v) for v in zp],
        "bit": s.bit, "quant_min": fq.quant_min, "quant_max": fq.quant_max,
        "per_channel": s.per_channel, "axis": fq.ch_axis if s.per_channel else None,
        "symmetric": s.symmetry, "signed": s.signed, "pot_scale": s.pot_scale,

    }


def non_finite(fq: QuantizeBase) -> str | None:
    """What is not finite in a quantizer's scale / zero point (a diverged learned scale), or None."""
    scale, _ = fq.qparams()
    zero_point = getattr(fq, "zero_point", None)  # before qparams() rounds it to an int (NaN becomes garbage)
    bad = [what for what, t in (("scale", scale), ("zero point", zero_point))
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]
    return " and ".join(bad) or None


def _check_finite(named: dict[str, QuantizeBase]) -> None:
    bad = [f"{name} ({what})" for name, fq in named.items() if (what := non_finite(fq))]
    if bad:
        raise ValueError(
            f"{len(bad)} quantizer(s) have a non-finite scale or zero point: {', '.join(bad)}. The learned "
            "quantization parameters diverged and cannot be exported or saved. Lower the learning rate (or weight "
            "decay) of the quantizer parameters, re-calibrate (model.eval(); enable_calibration(model); a few batches; "
            "enable_quantization(model)), or resume from an earlier checkpoint.")


@torch.no_grad()
def collect_qparams(gm: fx.GraphModule) -> dict[str, Any]:
    """All quantized tensors of a prepared model. Raises if an activation quantizer was never calibrated
    (RuntimeError) or a scale / zero point is NaN or infinite (ValueError)."""
    tensors: dict[str, Any] = {}
    missing = []
    used: dict[str, QuantizeBase] = {}  # quantizer name -> quantizer, for the finiteness check
    for node, fq, tensor in quantizer_call_sites(gm):
        if fq.non_float and not fq.initialized:
            continue  # only ever saw integer tensors (token ids, masks): nothing to quantize
        if not fq.initialized:
            if fq.is_weight and node.args[0].op == "get_attr":
                fq.init_from_weight(gm.get_parameter(node.args[0].target))
            else:
                missing.append(fq)
                continue
        used[fq.qualname or str(node.target)] = fq
        tensors[tensor] = entry(fq, "weight" if fq.is_weight else "activation")
    for name, layer in weight_quantizers(gm):
        fq = layer.weight_fake_quant
        if not fq.initialized:
            fq.init_from_weight(layer.quantized_weight_source()[0])
        used[fq.qualname or f"{name}.weight_fake_quant"] = fq
        tensors[f"{name}.weight"] = entry(fq, "weight")
    if missing:
        nonfinite = {fq.qualname for fq in missing if fq.nonfinite_batches}
        names = sorted({fq.qualname for fq in missing} - nonfinite)
        if nonfinite:  # calibration ran, but every batch these quantizers saw was NaN/inf
            raise RuntimeError(
                f"{len(nonfinite)} activation quantizer(s) have no scale ({', '.join(sorted(nonfinite)[:8])}"
                f"{' ...' if len(nonfinite) > 8 else ''}): {next(fq for fq in missing if fq.nonfinite_batches).calibration_problem()}.")
        shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise RuntimeError(
            f"{len(names)} activation quantizer(s) were never calibrated ({shown}): the model would be "
            "exported with meaningless scales. Calibrate first: model.eval(); enable_calibration(model); "
            "run a few batches; then enable_quantization(model).")
    _check_finite(used)
    return {"format": FORMAT, "version": VERSION, "backend": getattr(gm, "qat_backend", None),
            "tensors": tensors}


def write_qparams_json(qparams: dict[str, Any], path: str) -> None:
    try:  # NaN / Infinity are not JSON: refuse them rather than write a file other tools cannot read
        text = json.dumps(qparams, indent=1, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"the quantization parameters for {path} hold NaN or infinity ({exc}): nothing was "
                         "written; re-calibrate or resume from an earlier checkpoint") from exc
    atomic_write_bytes(path, (text + "\n").encode())
