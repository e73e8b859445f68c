"""Modules: ``nn.qat`` holds the QAT and fused layers that prepare_by_platform swaps in."""
from . import qat  # noqa: F401
