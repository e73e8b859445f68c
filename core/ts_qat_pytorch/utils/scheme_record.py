"""The quantization scheme a QAT checkpoint was trained with: recorded when it is saved, checked when it is loaded.

A record is plain data (it loads with ``weights_only=True``)::

    {"format": "ts_qat_pytorch.quant_scheme", "version": 1, "ts_qat_pytorch": "0.1.0",
     "backend": "Experimental",
     "prepare_config": {"extra_qconfig_dict": {"w_qscheme": {"bit": 4}, ...}} or None,
     "quantizers": {"conv1.weight_fake_quant": {"kind": "weight", "type": "LearnableFakeQuantize", "bit": 4,
                                                "quant_min": -8, "quant_max": 7, "per_channel": True,
                                                "symmetry": True, "pot_scale": False}, ...}}

``prepare_config`` is the part of ``prepare_custom_config_dict`` that decides the quantizers, as data (classes by
their registered or dotted names), so a tool can prepare the model again the same way; None when it could not be
written as data.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .. import __version__
from ..fake_quantize import QuantizeBase

logger = logging.getLogger(__name__)

FORMAT = "ts_qat_pytorch.quant_scheme"
VERSION = 1
# what makes two quantizers the same: the integers they produce and how their scale is found
COMPARED = ("type", "bit", "quant_min", "quant_max", "per_channel", "symmetry", "pot_scale")

__all__ = ["scheme_record", "check_scheme_record", "describe"]


def _quantizer_record(fq: QuantizeBase) -> dict[str, Any]:
    s = fq.scheme
    return {"kind": "weight" if fq.is_weight else "activation", "type": type(fq).__name__, "bit": int(s.bit),
            "quant_min": int(fq.quant_min), "quant_max": int(fq.quant_max), "per_channel": bool(s.per_channel),
            "symmetry": bool(s.symmetry), "pot_scale": bool(s.pot_scale)}


def scheme_record(model: nn.Module) -> dict[str, Any]:
    """The record of a prepared model (DDP wrappers unwrapped)."""
    model = getattr(model, "module", model)
    return {"format": FORMAT, "version": VERSION, "ts_qat_pytorch": __version__,
            "backend": getattr(model, "qat_backend", None),
            "prepare_config": getattr(model, "qat_prepare_config", None),
            "quantizers": {name: _quantizer_record(m) for name, m in model.named_modules()
                           if isinstance(m, QuantizeBase)}}


def describe(q: dict[str, Any]) -> str:
    """'LearnableFakeQuantize 4-bit [-8,7] per-channel symmetric'."""
    return (f"{q['type']} {q['bit']}-bit [{q['quant_min']},{q['quant_max']}] "
            f"{'per-channel' if q['per_channel'] else 'per-tensor'} "
            f"{'symmetric' if q['symmetry'] else 'asymmetric'}{' power-of-two scale' if q['pot_scale'] else ''}")


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    if saved.get("backend") and current.get("backend") and saved["backend"] != current["backend"]:
        out.append(f"checkpoint: backend {saved['backend']}; model: backend {current['backend']}")
    a, b = saved.get("quantizers") or {}, current["quantizers"]
    for name in [n for n in a if n in b]:
        if any(a[name].get(k) != b[name].get(k) for k in COMPARED):
            out.append(f"checkpoint: {name} {describe(a[name])}; model: {describe(b[name])}")
    only_saved, only_model = [n for n in a if n not in b], [n for n in b if n not in a]
    for what, names in (("checkpoint", only_saved), ("model", only_model)):
        if names:
            out.append(f"{len(names)} quantizer(s) only in the {what}: {', '.join(names[:4])}"
                       + (" ..." if len(names) > 4 else ""))
    return out


def check_scheme_record(record: Any, model: nn.Module, source: str = "checkpoint") -> None:
    """Raise ValueError when ``model`` is not quantized the way ``record`` says; log a warning when there is no
    record (a checkpoint written before records existed)."""
    if record is None:
        logger.warning("%s has no record of its quantization scheme (written by an older ts_qat_pytorch): it "
                       "cannot be checked against the model; make sure the model is prepared with the backend and "
                       "extra_qconfig_dict it was trained with", source)
        return
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{source}: 'quant_scheme' is not a {FORMAT} record")
    if int(record.get("version", 0)) > VERSION:
        raise ValueError(f"{source}: its scheme record has version {record['version']}, newer than this "
                         f"ts_qat_pytorch understands ({VERSION}): upgrade ts_qat_pytorch (it was written by "
                         f"{record.get('ts_qat_pytorch')})")
    current = scheme_record(model)
    problems = _differences(record, current)
    if not problems:
        if record.get("ts_qat_pytorch") != current["ts_qat_pytorch"]:
            logger.info("%s was written by ts_qat_pytorch %s (this is %s); same quantization scheme", source,
                        record.get("ts_qat_pytorch"), current["ts_qat_pytorch"])
        return
    config = record.get("prepare_config")
    how = (f"prepare_by_platform(model, {record.get('backend')!r}, {config!r})" if config is not None else
           f"prepare_by_platform(model, {record.get('backend')!r}, <the prepare_custom_config_dict used for "
           "training>)")
    shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
    if any(n not in current["quantizers"] for n in record.get("quantizers") or {}) and any(
            getattr(m, "shared_sites", 1) > 1 for m in model.modules()):
        # the model shares one quantizer per concat; a checkpoint from before that has one per tensor
        shown.append("the model's concatenations share one quantizer each: for a checkpoint trained with one per "
                     "tensor, prepare with extra_quantizer_dict={'shared_concat_scales': False}")
    raise ValueError(
        f"{source} was trained with another quantization scheme than the model it is loaded into:\n  "
        + "\n  ".join(shown)
        + f"\nFix: prepare the model the way it was trained, {how}; or, to change the scheme, start from the float "
          "weights (utils.utils.save_checkpoint, or tools/qat_checkpoint.py to-float) and calibrate again.")
