"""Checkpoints and file writes, the documented import path (``ts_qat_pytorch.utils.utils``).

The code lives in one module per job: ``atomic_io`` (atomic writes), ``checkpoint`` (float / QAT checkpoints,
safe loading), ``scheme_record`` (the quantization scheme a QAT checkpoint records and checks).
"""
from .atomic_io import atomic_torch_save, atomic_write_bytes
from .checkpoint import (float_state_dict, load_checkpoint, load_qat_checkpoint, save_checkpoint, save_qat_checkpoint,
                         strip_module_prefix)
from .scheme_record import check_scheme_record, scheme_record

__all__ = ["atomic_write_bytes", "atomic_torch_save", "strip_module_prefix", "load_checkpoint", "float_state_dict",
           "save_checkpoint", "save_qat_checkpoint", "load_qat_checkpoint", "scheme_record", "check_scheme_record"]
