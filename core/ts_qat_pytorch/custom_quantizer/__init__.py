"""Graph rewriting per backend. ``ModelQuantizer`` does the work; backends register subclasses."""
from .registry import DEFAULT_MODEL_QUANTIZER, register_model_quantizer
from .backends import ExperimentalQuantizer, TSQATQuantizer
from .model_quantizer import ModelQuantizer

__all__ = ["ModelQuantizer", "TSQATQuantizer", "ExperimentalQuantizer", "register_model_quantizer",
           "DEFAULT_MODEL_QUANTIZER"]
