"""The backend registry: backend name -> (model quantizer class, default qconfig).

The built-in backends are registered when this package is imported (``backends.py``), which Python does before
this module runs, so a lookup always sees them."""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["DEFAULT_MODEL_QUANTIZER", "BACKEND_DEFAULT_QCONFIG", "register_model_quantizer", "lookup_backend"]

# backend name -> model quantizer class
DEFAULT_MODEL_QUANTIZER: dict[str, type] = {}
# backend name -> its default qconfig dict (the ancestor's extra_qconfig_dict keys)
BACKEND_DEFAULT_QCONFIG: dict[str, dict[str, Any]] = {}


def _key(backend) -> str:
    return getattr(backend, "value", backend)


def register_model_quantizer(backend, default_qconfig: dict[str, Any]) -> Callable[[type], type]:
    """Register a backend: its default qconfig (scheme, fake quantizers, observers) and its quantizer class.

    >>> @register_model_quantizer("MyNPU", {"w_qscheme": {...}, ...})
    ... class MyNPUQuantizer(ModelQuantizer): ...
    """
    def deco(cls: type) -> type:
        DEFAULT_MODEL_QUANTIZER[_key(backend)] = cls
        BACKEND_DEFAULT_QCONFIG[_key(backend)] = dict(default_qconfig)
        return cls
    return deco


def lookup_backend(backend) -> tuple[type, dict[str, Any]]:
    """The quantizer class and default qconfig of a registered backend (a name or a ``BackendType``)."""
    key = _key(backend)
    if key not in DEFAULT_MODEL_QUANTIZER:
        raise ValueError(f"unknown backend {backend!r}; registered backends: {sorted(DEFAULT_MODEL_QUANTIZER)}. "
                         "Register a new one with custom_quantizer.register_model_quantizer.")
    return DEFAULT_MODEL_QUANTIZER[key], BACKEND_DEFAULT_QCONFIG[key]
