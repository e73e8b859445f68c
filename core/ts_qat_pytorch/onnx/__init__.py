"""QDQ ONNX export as small ordered passes: freeze -> export -> naming -> verify."""
from .freeze import freeze_for_export
from .naming import apply_canonical_names
from .qdq import QDQ
from .qparams import collect_qparams
from .verify import count_integer_kernels, optimized_op_counts

__all__ = ["freeze_for_export", "apply_canonical_names", "QDQ", "collect_qparams", "count_integer_kernels",
           "optimized_op_counts"]
