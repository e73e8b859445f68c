"""Modules: ``nn.qat`` holds the QAT and fused layers that prepare_by_platform swaps in; ``ChannelScale`` is the
float per-channel multiply the float tools insert (SmoothQuant's exact restore of a shared LayerNorm output)."""
from . import qat  # noqa: F401
from .channel_scale import ChannelScale  # noqa: F401
