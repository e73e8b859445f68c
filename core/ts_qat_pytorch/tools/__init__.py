"""Float-model processing before ``prepare_by_platform`` (the manual's ``ts_qat_pytorch.tools``).

    from ts_qat_pytorch.tools import equalize, fold_bn, smooth_quant
    model, report = equalize(model, example_inputs)              # fold BN -> cross-layer equalization -> HBA
    model, report = smooth_quant(model, batches, alpha=0.5)      # SmoothQuant on LayerNorm -> Linear
    q = prepare_by_platform(model, backend)

Each returns a processed copy of the model (the input is not modified) and a report dataclass (``to_dict()``).
Files: ``patterns`` finds what they work on in a torch.fx trace; ``bn_folding``, ``cle`` (the numerics of
cross-layer equalization), ``bias_absorption`` (high-bias absorption) and ``equalization`` (the three as one verb);
``smoothquant``; ``output_check``, the self-check on an example input. Bias correction, which needs the quantized
model, is ``advanced_ptq.bias_correction``.
"""
from .bn_folding import FoldReport, fold_bn
from .equalization import EqualizeReport, equalize
from .smoothquant import SmoothQuantReport, smooth_quant, smoothing_groups

__all__ = ["equalize", "EqualizeReport", "fold_bn", "FoldReport", "smooth_quant", "SmoothQuantReport",
           "smoothing_groups"]
