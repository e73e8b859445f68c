"""Stage 7 of the pipeline: prepare_by_platform with the run's quantization plan: the backend and bit widths of the
flags, laid over the suite's configuration, then the run's per-layer settings."""
from __future__ import annotations

import copy

from torch import nn


def prepare(run, suite, model: nn.Module, changes: dict | None = None):
    """prepare_by_platform with :func:`prepare_config`."""
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    cfg = prepare_config(run, suite, model, changes)
    return prepare_by_platform(model, BackendType(run.backend), cfg or None)


def prepare_config(run, suite, model: nn.Module, changes: dict | None = None) -> dict:
    """The suite's prepare_custom_config_dict, --qconfig's extra_qconfig_dict keys, the flags' bit widths (below 8
    bits the first and the last conv / linear layer keep --first-last-bit (8) bits, as in the low-bit QAT
    literature: the image and the logits keep their precision), then the per-layer settings of the run
    (``run.layer_config``: a mixed-precision allocation, accuracy control's changes, or those a --resume checkpoint
    recorded; each layer's entry laid over), then ``changes`` ({layer: bits, or None for float}:
    mix_precision.with_layer_changes)."""
    flags = run.config
    cfg = copy.deepcopy(dict(suite.prepare_custom))
    if flags.qconfig:  # --qconfig: laid over the suite's, each scheme key by key
        eq = cfg.setdefault("extra_qconfig_dict", {})
        for key, value in copy.deepcopy(flags.qconfig).items():
            eq[key] = {**eq[key], **value} if isinstance(value, dict) and isinstance(eq.get(key), dict) else value
    if run.backend == "Experimental":
        bit_widths(cfg, flags, model)
    layers = run.layer_config or {}
    if layers.get("module_qconfig"):
        mq = cfg.setdefault("module_qconfig", {})
        for name, entry in layers["module_qconfig"].items():
            mq[name] = {**mq.get(name, {}), **copy.deepcopy(entry)}
    excluded = (layers.get("extra_quantizer_dict") or {}).get("exclude_module_name")
    if excluded:
        extra = cfg.setdefault("extra_quantizer_dict", {})
        extra["exclude_module_name"] = list(dict.fromkeys([*extra.get("exclude_module_name", []), *excluded]))
        for name in excluded:
            cfg.get("module_qconfig", {}).pop(name, None)
    if changes:
        from ts_qat_pytorch.mix_precision import with_layer_changes
        cfg = with_layer_changes(cfg, changes)
    return cfg


def bit_widths(cfg: dict, flags, model: nn.Module) -> None:
    """--w-bit / --a-bit into the Experimental backend's schemes; the first and the last layer at --first-last-bit."""
    eq = cfg.setdefault("extra_qconfig_dict", {})
    w = flags.w_bit or (eq.get("w_qscheme") or {}).get("bit") or 8
    a = flags.a_bit or (eq.get("a_qscheme") or {}).get("bit") or 8
    eq.update({"w_qscheme": {**(eq.get("w_qscheme") or {}), "bit": w},
               "a_qscheme": {**(eq.get("a_qscheme") or {}), "bit": a}})
    keep = 8 if flags.first_last_bit is None else flags.first_last_bit
    if keep and min(w, a) < keep:
        cfg.setdefault("module_qconfig", {}).update(
            {n: {"w_qscheme": {"bit": keep}, "a_qscheme": {"bit": keep}} for n in first_last_layers(model)})


def first_last_layers(model: nn.Module) -> list[str]:
    """Names of the first and the last conv / linear layer, in module order (execution order for the zoos'
    classifiers)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return list(dict.fromkeys([names[0], names[-1]])) if names else []


def layer_bits(q, cfg: dict) -> dict[str, tuple[int, int]]:
    """Each quantized layer's (weight bits, activation bits) in the prepared model ``q`` made from ``cfg`` (its
    prepare_custom_config_dict)."""
    from ts_qat_pytorch.mix_precision import quantized_layers
    a_all = ((cfg.get("extra_qconfig_dict") or {}).get("a_qscheme") or {}).get("bit", 8)
    mq = cfg.get("module_qconfig") or {}
    q = getattr(q, "module", q)
    return {n: (int(q.get_submodule(n).weight_fake_quant.scheme.bit),
                int((mq.get(n, {}).get("a_qscheme") or {}).get("bit", a_all))) for n in quantized_layers(q)}
