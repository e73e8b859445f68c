"""ts_qat_pytorch: quantization-aware training for PyTorch with QDQ ONNX export that runs in onnxruntime.

The documented entry points:
    from ts_qat_pytorch.prepare_by_platform import prepare_by_platform, BackendType
    from ts_qat_pytorch.utils.state import enable_calibration, enable_quantization, ...
    from ts_qat_pytorch.utils.calibrate import calibrate
    from ts_qat_pytorch.utils.utils import save_checkpoint
    from ts_qat_pytorch.convert_export import convert_export

The same names flat, imported on first use (``import ts_qat_pytorch`` itself loads no torch):
    import ts_qat_pytorch as tq
    q = tq.prepare_by_platform(model, tq.BackendType.TSQAT); tq.calibrate(q, batches); tq.convert_export(q, ...)
"""
import importlib as _importlib
import importlib.metadata as _metadata
import sys as _sys
import types as _types

try:  # one source of truth: the installed distribution's version (pyproject.toml)
    __version__ = _metadata.version("ts-qat-pytorch")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

# flat name -> the module that defines it (the manual's path, relative to this package)
_FLAT = {
    "prepare_by_platform": "prepare_by_platform",
    "BackendType": "prepare_by_platform",
    "enable_calibration": "utils.state",
    "enable_quantization": "utils.state",
    "enable_calibration_woquantization": "utils.state",
    "enable_calibration_quantization": "utils.state",
    "disable_all": "utils.state",
    "freeze_bn_stats": "utils.state",
    "calibrate": "utils.calibrate",
    "save_checkpoint": "utils.utils",
    "save_qat_checkpoint": "utils.utils",
    "load_qat_checkpoint": "utils.utils",
    "convert_export": "convert_export",
}

__all__ = ["__version__", *_FLAT]


def __getattr__(name: str):
    if name not in _FLAT:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{_FLAT[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_FLAT})


class _Package(_types.ModuleType):
    """``prepare_by_platform`` and ``convert_export`` are modules and the functions they define. Python binds a
    submodule to its package's attribute when first imported, which would make ``tq.prepare_by_platform`` a module
    after ``from ts_qat_pytorch.prepare_by_platform import ...``; the flat name keeps the function instead (the
    module stays in ``sys.modules``, so every ``from ts_qat_pytorch.<module> import ...`` works as before)."""

    def __setattr__(self, name, value):
        if name in _FLAT and isinstance(value, _types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
