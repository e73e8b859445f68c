"""The backend registry's former import path; it lives in ``custom_quantizer.registry`` beside the backends."""
from ..custom_quantizer.registry import (BACKEND_DEFAULT_QCONFIG, DEFAULT_MODEL_QUANTIZER, lookup_backend,
                                         register_model_quantizer)

__all__ = ["DEFAULT_MODEL_QUANTIZER", "BACKEND_DEFAULT_QCONFIG", "register_model_quantizer", "lookup_backend"]
