"""ts_qat_pytorch: quantization-aware training for PyTorch with QDQ ONNX export that runs in onnxruntime.

The documented entry points:
    from ts_qat_pytorch.prepare_by_platform import prepare_by_platform, BackendType
    from ts_qat_pytorch.utils.state import enable_calibration, enable_quantization, ...
    from ts_qat_pytorch.utils.calibrate import calibrate
    from ts_qat_pytorch.utils.utils import save_checkpoint
    from ts_qat_pytorch.convert_export import convert_export
"""
import importlib.metadata as _metadata

try:  # one source of truth: the installed distribution's version (pyproject.toml)
    __version__ = _metadata.version("ts-qat-pytorch")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"
