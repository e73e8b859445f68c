"""Accuracy-controlled quantization: give the most sensitive layers back their precision until the metric is
within ``max_drop`` of float.

    result = accuracy_controlled(build_quantized, evaluate, float_metric=76.1, max_drop=1.0,
                                 sensitivities=sens.scores(), max_layers=8)

``build_quantized(changes)`` builds (prepares, calibrates, reconstructs or fine-tunes) the quantized model with
``changes`` = {layer name: bits, or None for "leave float"} applied, and ``evaluate(model)`` returns its metric.
:func:`with_layer_changes` turns ``changes`` into a prepare_custom_config_dict. The loop tries no change, then the
1, 2, ... ``max_layers`` most sensitive layers changed (fewest first) and stops at the first model within
``max_drop``; the best model seen is returned either way, with the layers it changed.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

logger = logging.getLogger(__name__)

__all__ = ["AccuracyControlResult", "accuracy_controlled", "with_layer_changes"]


@dataclass
class AccuracyControlResult:
    model: Any                               # the best model found
    metric: float                            # its metric
    drop: float                              # float metric minus it (the other way round if lower is better)
    changes: dict[str, int | None]           # the layers it changed: bits, or None (left float)
    within_budget: bool
    history: list[tuple[dict[str, int | None], float]] = field(default_factory=list)  # every try: changes, metric


def with_layer_changes(prepare_custom_config_dict: Mapping[str, Any] | None,
                       changes: Mapping[str, int | None]) -> dict[str, Any]:
    """A prepare_custom_config_dict with ``changes`` applied: a layer with bits gets them for its weight and its
    activations (``module_qconfig``), a layer with None is excluded (``exclude_module_name``: it stays float)."""
    cfg = copy.deepcopy(dict(prepare_custom_config_dict or {}))
    mq = dict(cfg.get("module_qconfig") or {})
    extra = dict(cfg.get("extra_quantizer_dict") or {})
    excluded = list(extra.get("exclude_module_name", []))
    for name, bits in changes.items():
        if bits is None:
            mq.pop(name, None)
            if name not in excluded:
                excluded.append(name)
        else:
            mq[name] = {**mq.get(name, {}), "w_qscheme": {"bit": int(bits)}, "a_qscheme": {"bit": int(bits)}}
    if mq:
        cfg["module_qconfig"] = mq
    if excluded:
        extra["exclude_module_name"] = excluded
        cfg["extra_quantizer_dict"] = extra
    return cfg


def _ranking(sensitivities: Mapping[str, float] | Sequence[str] | Any) -> list[str]:
    if hasattr(sensitivities, "ranking"):  # a Sensitivity
        return list(sensitivities.ranking())
    if isinstance(sensitivities, Mapping):
        return sorted(sensitivities, key=lambda n: -float(sensitivities[n]))
    return list(sensitivities)


def accuracy_controlled(build_quantized: Callable[[dict[str, int | None]], Any], evaluate: Callable[[Any], float],
                        float_metric: float, max_drop: float,
                        sensitivities: Mapping[str, float] | Sequence[str] | Any, max_layers: int = 8,
                        higher_is_better: bool = True, bits: int | None = 8) -> AccuracyControlResult:
    """See the module docstring.

    sensitivities  {layer: score} (highest first), a list of layer names already ranked, or a ``Sensitivity``.
    max_layers     at most this many layers are changed.
    bits           what a changed layer gets: a bit width (8: full precision on the integer backends) or None
                   (the layer stays float).
    """
    if max_drop < 0:
        raise ValueError(f"accuracy_controlled: max_drop must be >= 0, got {max_drop}")
    ranked = _ranking(sensitivities)
    sign = 1.0 if higher_is_better else -1.0
    history: list[tuple[dict[str, int | None], float]] = []
    best = None
    for k in range(0, min(max_layers, len(ranked)) + 1):
        changes = {n: bits for n in ranked[:k]}
        model = build_quantized(dict(changes))
        metric = float(evaluate(model))
        drop = sign * (float_metric - metric)
        history.append((changes, metric))
        logger.info("accuracy control: %d layer(s) changed %s: metric %.4g, drop %.4g (allowed %.4g)", k,
                    list(changes), metric, drop, max_drop)
        if best is None or drop < best.drop:
            best = AccuracyControlResult(model, metric, drop, changes, drop <= max_drop)
        if drop <= max_drop:
            break
    best.history = history
    if not best.within_budget:
        logger.warning("accuracy control: no model within %.4g of float after changing up to %d layers; the best "
                       "(drop %.4g, %d layers changed) is returned", max_drop, max_layers, best.drop,
                       len(best.changes))
    return best
