"""Quantization analysis of a prepared model: where the error comes from, and which layers to leave float.

    from ts_qat_pytorch.analysis import profile_layers, float_fallback_ranking, recovery_exclude_list
    rows = profile_layers(q, batches)                  # per layer: float vs fake-quant cosine, SQNR, scale, clipping
    ranking = float_fallback_ranking(q, evaluate)      # the metric with each layer alone left float
    exclude = recovery_exclude_list(q, evaluate, ranking)  # the fewest float layers winning back most of the loss

``profile`` (the per-layer error profile) and ``fallback`` (the float-fallback ranking). Choosing bit widths from
each layer's sensitivity to quantization is ``mix_precision``'s job (``mix_precision.layer_sensitivity``).
"""
from .fallback import (float_fallback_ranking, format_ranking, layer_quantizers, plot_ranking, recovery_exclude_list,
                       write_exclude_config)
from .profile import format_profile, plot_profile, profile_layers, write_profile_csv

__all__ = ["profile_layers", "format_profile", "write_profile_csv", "plot_profile", "float_fallback_ranking",
           "layer_quantizers", "recovery_exclude_list", "write_exclude_config", "format_ranking", "plot_ranking"]
