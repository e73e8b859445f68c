"""``prepare_by_platform``: trace a float model and return its QAT GraphModule."""
from __future__ import annotations

import copy
import logging
from enum import Enum
from typing import Any

from torch import fx, nn

from . import custom_quantizer  # noqa: F401  (registers the built-in backends)
from .fake_quantize import QuantizeBase
from .quantization.overrides import apply_module_qconfig
from .quantization.qconfig import QConfig
from .quantization.tracer import QuantTracer, trace_model
from .utils.registry import lookup_backend

logger = logging.getLogger(__name__)

__all__ = ["prepare_by_platform", "BackendType", "PREPARE_CUSTOM_CONFIG_KEYS"]


class BackendType(Enum):
    """The built-in backends. Any name registered with ``register_model_quantizer`` works too."""

    TSQAT = "TSQAT"
    Experimental = "Experimental"
    ONNXRuntime = "ONNXRuntime"


PREPARE_CUSTOM_CONFIG_KEYS = ("extra_qconfig_dict", "extra_quantizer_dict", "leaf_module", "preserve_attr",
                              "concrete_args", "module_qconfig")


def prepare_by_platform(model: nn.Module, backend: BackendType | str = BackendType.TSQAT,
                        prepare_custom_config_dict: dict[str, Any] | None = None,
                        custom_tracer: fx.Tracer | None = None) -> fx.GraphModule:
    """Trace ``model`` with torch.fx, fuse conv/linear+BN(+ReLU), swap in QAT layers and insert
    activation fake quantizers according to ``backend``. The input model is not modified.

    prepare_custom_config_dict keys (all optional):
        extra_qconfig_dict:   w_observer, a_observer, w_fakequantize, a_fakequantize, w_qscheme, a_qscheme
                              (dicts of bit, symmetry, per_channel, pot_scale), *_params.
        extra_quantizer_dict: exclude_module_name, exclude_node_name (stay float), additional_function_type,
                              additional_module_type (also quantized).
        leaf_module:          module types or qualified names not traced into (they stay float).
        preserve_attr:        {submodule path: [attribute names]} (or a list for the root) copied to the result.
        concrete_args:        fixed values for forward arguments (flags that drive control flow).
        module_qconfig:       {layer name: extra_qconfig_dict-style dict}: per-layer settings laid over the
                              model-wide ones (mixed precision, e.g. W4A4 with 8-bit first and last layers);
                              the layer's weight, input and output quantizers follow them.
    """
    cfg = dict(prepare_custom_config_dict or {})
    unknown = sorted(set(cfg) - set(PREPARE_CUSTOM_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown prepare_custom_config_dict keys {unknown}; valid keys: "
                         f"{list(PREPARE_CUSTOM_CONFIG_KEYS)}")
    quantizer_cls, backend_qconfig = lookup_backend(backend)
    qconfig = QConfig.from_dict(backend_qconfig, cfg.get("extra_qconfig_dict"))
    quantizer = quantizer_cls(cfg.get("extra_quantizer_dict"))

    model = copy.deepcopy(model)
    tracer = custom_tracer or QuantTracer(cfg.get("leaf_module", ()))
    gm = trace_model(model, concrete_args=cfg.get("concrete_args"), preserve_attr=cfg.get("preserve_attr"),
                     tracer=tracer)
    gm.train(model.training)
    gm = quantizer.prepare(gm, qconfig)
    if cfg.get("module_qconfig"):
        apply_module_qconfig(gm, backend_qconfig, cfg.get("extra_qconfig_dict"), cfg["module_qconfig"],
                             quantizer.allowed_bits)
    gm.qat_backend = getattr(backend, "value", backend)
    gm.qat_qconfig = qconfig
    logger.info("prepared %s for backend %s: %d fake quantizers", type(model).__name__, gm.qat_backend,
                sum(1 for m in gm.modules() if isinstance(m, QuantizeBase)))
    return gm
