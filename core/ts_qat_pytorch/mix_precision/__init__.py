"""Mixed precision: per-layer sensitivity, bit allocation by integer linear programming, and accuracy control.

    from ts_qat_pytorch.mix_precision import layer_sensitivity, layer_costs, allocate_bits, accuracy_controlled
    q = prepare_by_platform(model, "Experimental")
    sens = layer_sensitivity(q, batches, candidates=(2, 4, 8))           # Hutchinson trace x ||Q_b(W) - W||^2
    alloc = allocate_bits(sens, layer_costs(q, batches[0]), {"avg_bits": 4})
    q = prepare_by_platform(model, alloc.backend, alloc.prepare_custom_config_dict())

``sensitivity`` (scores), ``cost`` (weights and MACs), ``allocation`` (the ILP and the module_qconfig it gives),
``accuracy`` (raise the most sensitive layers until the metric is within a budget).
"""
from .accuracy import AccuracyControlResult, accuracy_controlled, with_layer_changes
from .allocation import BUDGET_KEYS, BitAllocation, allocate_bits, budget_range
from .cost import LayerCost, layer_costs
from .sensitivity import Sensitivity, hutchinson_trace, layer_sensitivity, quantize_weight, quantized_layers

__all__ = ["layer_sensitivity", "hutchinson_trace", "quantize_weight", "quantized_layers", "Sensitivity",
           "layer_costs", "LayerCost", "allocate_bits", "budget_range", "BitAllocation", "BUDGET_KEYS",
           "accuracy_controlled", "AccuracyControlResult", "with_layer_changes"]
