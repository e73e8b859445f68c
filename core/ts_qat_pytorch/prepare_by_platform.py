"""``prepare_by_platform``: trace a float model and return its QAT GraphModule."""
from __future__ import annotations

import copy
import logging
from enum import Enum
from typing import Any, Mapping

from torch import fx, nn

from . import custom_quantizer  # noqa: F401  (registers the built-in backends)
from .fake_quantize import FAKE_QUANTIZERS, QuantizeBase
from .observer import OBSERVERS
from .quantization.overrides import module_qconfigs
from .quantization.canonical import canonicalize
from .quantization.qconfig import QConfig, dotted_name
from .quantization.shape_trace import shape_tracer_for
from .quantization.tracer import QuantTracer, check_leaf_modules, trace_model
from .custom_quantizer.registry import lookup_backend

logger = logging.getLogger(__name__)

__all__ = ["prepare_by_platform", "BackendType", "PREPARE_CUSTOM_CONFIG_KEYS"]


class BackendType(Enum):
    """The built-in backends. Any name registered with ``register_model_quantizer`` works too."""

    TSQAT = "TSQAT"
    Experimental = "Experimental"
    ONNXRuntime = "ONNXRuntime"


PREPARE_CUSTOM_CONFIG_KEYS = ("extra_qconfig_dict", "extra_quantizer_dict", "extra_fuse_dict", "leaf_module",
                              "preserve_attr", "concrete_args", "module_qconfig", "example_inputs")
# The keys that decide the quantizers: recorded on the model (qat_prepare_config) and in QAT checkpoints, so a
# tool can prepare the same model again (tools/qat_checkpoint.py to-float).
RECORDED_CONFIG_KEYS = ("extra_qconfig_dict", "extra_quantizer_dict", "module_qconfig")
# Attributes prepare_by_platform sets on the GraphModule; they survive copy.deepcopy (torch.fx keeps the attributes
# named in meta[_USER_PRESERVED_ATTRIBUTES_KEY]).
_MODEL_ATTRIBUTES = ("qat_backend", "qat_qconfig", "qat_prepare_config")
_NAMES = {cls: name for table in (OBSERVERS, FAKE_QUANTIZERS) for name, cls in reversed(list(table.items()))}


def prepare_by_platform(model: nn.Module, backend: BackendType | str = BackendType.TSQAT,
                        prepare_custom_config_dict: dict[str, Any] | None = None,
                        custom_tracer: fx.Tracer | None = None) -> fx.GraphModule:
    """Trace ``model`` with torch.fx, fuse conv/linear+BN(+ReLU), swap in QAT layers and insert
    activation fake quantizers according to ``backend``. The input model is not modified.

    prepare_custom_config_dict keys (all optional):
        extra_qconfig_dict:   w_observer, a_observer, w_fakequantize, a_fakequantize, w_qscheme, a_qscheme
                              (dicts of bit, symmetry, per_channel, pot_scale), *_params.
        extra_quantizer_dict: exclude_module_name, exclude_node_name (stay float), additional_function_type,
                              additional_module_type (also quantized), float_outputs, shared_concat_scales
                              (True / False over the backend's default).
        extra_fuse_dict:      {"additional_fuser_method_mapping": {(layer type, norm type[, activation type]):
                              fused QAT class or fuser(layer, bn, act, weight_qconfig, bn_name)}}: extra fusion
                              patterns (fuser_method_mappings.fusion_table).
        leaf_module:          module types or qualified names not traced into (they stay float); an unknown name
                              is an error.
        preserve_attr:        {submodule path: [attribute names]} (or a list for the root) copied to the result.
        concrete_args:        fixed values for forward arguments (flags that drive control flow).
        example_inputs:       a tensor (or tuple of tensors) shaped like the model's input. Used only when torch.fx
                              cannot trace Python code that reads a shape: the model is then traced with these shapes
                              and specialised to them, batch size excepted (quantization/shape_trace.py). A timm
                              model's pretrained_cfg input_size serves when it is not given.
        module_qconfig:       {layer name: extra_qconfig_dict-style dict}: per-layer settings laid over the
                              model-wide ones (mixed precision, e.g. W4A4 with 8-bit first and last layers);
                              the layer's weight, input and output quantizers follow them. A block's name
                              (e.g. "features.3") applies to each layer in it; TSQAT takes a_qscheme bit 16
                              (W8A16, exported at opset_version=21).
    """
    cfg = dict(prepare_custom_config_dict or {})
    unknown = sorted(set(cfg) - set(PREPARE_CUSTOM_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown prepare_custom_config_dict keys {unknown}; valid keys: "
                         f"{list(PREPARE_CUSTOM_CONFIG_KEYS)}")
    quantizer_cls, backend_qconfig = lookup_backend(backend)
    qconfig = QConfig.from_dict(backend_qconfig, cfg.get("extra_qconfig_dict"))
    if cfg.get("extra_fuse_dict"):  # only then: a registered quantizer's own __init__ may take one argument
        quantizer = quantizer_cls(cfg.get("extra_quantizer_dict"), extra_fuse_dict=cfg["extra_fuse_dict"])
    else:
        quantizer = quantizer_cls(cfg.get("extra_quantizer_dict"))
    check_leaf_modules(model, cfg.get("leaf_module", ()))
    layer_qconfigs = None
    if cfg.get("module_qconfig"):
        layer_qconfigs = module_qconfigs(backend_qconfig, cfg.get("extra_qconfig_dict"), cfg["module_qconfig"],
                                         quantizer.allowed_bits, getattr(quantizer, "wide_activation_bits", ()))

    model = copy.deepcopy(model)
    # the modules of an extra fusion pattern must stay modules in the graph to be matched: a BatchNorm subclass
    # written outside torch would otherwise be traced into (torch.nn's own modules are leaves already)
    added = set(quantizer.fusion_patterns) - set(type(quantizer).fusion_patterns)
    pattern_types = {t for key in added for t in key[:2] if t is not None and not t.__module__.startswith("torch.")}
    tracer = custom_tracer or QuantTracer([*cfg.get("leaf_module", ()), *pattern_types])
    gm = trace_model(model, concrete_args=cfg.get("concrete_args"), preserve_attr=cfg.get("preserve_attr"),
                     tracer=tracer, fallback=lambda t: shape_tracer_for(model, cfg.get("example_inputs"), t))
    gm.train(model.training)
    canonicalize(gm)  # library building blocks (timm norm-act layers, same-padding convs, fused attention)
    # only when given: a registered quantizer's own prepare may take (gm, qconfig) alone
    gm = quantizer.prepare(gm, qconfig, layer_qconfigs) if layer_qconfigs else quantizer.prepare(gm, qconfig)
    gm.qat_backend = getattr(backend, "value", backend)
    gm.qat_qconfig = qconfig
    gm.qat_prepare_config = recordable_config(cfg)
    _keep_on_deepcopy(gm, _MODEL_ATTRIBUTES)
    logger.info("prepared %s for backend %s: %d fake quantizers", type(model).__name__, gm.qat_backend,
                sum(1 for m in gm.modules() if isinstance(m, QuantizeBase)))
    return gm


class _NotData(Exception):
    pass


def _as_data(value: Any) -> Any:
    """``value`` as plain data: classes and functions by their registered or dotted names."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _as_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_as_data(v) for v in value]
    if callable(value):
        name = _NAMES.get(value) or dotted_name(value)
        if name is not None:
            return name
    raise _NotData(repr(value))


def recordable_config(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The part of prepare_custom_config_dict that decides the quantizers, as plain data that prepare_by_platform
    accepts again; None when some value has no name to write it by (a local class, a lambda)."""
    try:
        return {k: _as_data(cfg[k]) for k in RECORDED_CONFIG_KEYS if cfg.get(k)}
    except _NotData as exc:
        logger.debug("prepare_custom_config_dict not recorded: %s cannot be written as data", exc)
        return None


def _keep_on_deepcopy(gm: fx.GraphModule, names) -> None:
    from torch.fx import graph_module
    key = getattr(graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", None)
    if key is not None:
        gm.meta.setdefault(key, {}).update({n: getattr(gm, n) for n in names})
