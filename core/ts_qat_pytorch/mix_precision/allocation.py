"""Bit allocation: an integer linear program picks each layer's bits.

    alloc = allocate_bits(sensitivity, costs, {"avg_bits": 4})
    q = prepare_by_platform(model, alloc.backend, alloc.prepare_custom_config_dict())

One binary variable per layer and candidate (weight bits, activation bits); exactly one per layer; minimise the
summed sensitivities (weight and activation) under ONE budget:

    avg_bits    parameter-weighted mean weight bits  (sum params x wbit / sum params) <= value
    size_bits   model size in bits                    (sum params x wbit)              <= value
    bops        bit operations per sample             (sum MACs x wbit x abit)         <= value

Solved with scipy.optimize.milp (HiGHS) when scipy >= 1.9 is installed, else with PuLP (CBC) if installed.

Backends (scheme.py): TSQAT takes 8 bits only, ONNXRuntime 7..8, Experimental 2..8 for weights and activations
separately. ``alloc.backend`` is "Experimental" as soon as any layer gets fewer than 8 bits, else "TSQAT". Activation
bits, when searched, go into each layer's ``a_qscheme`` (its input and output quantizers; a tensor two layers share
has one grid, the later entry's).
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .cost import LayerCost
from .sensitivity import Sensitivity

logger = logging.getLogger(__name__)

__all__ = ["BitAllocation", "allocate_bits", "budget_range", "BUDGET_KEYS"]

BUDGET_KEYS = ("avg_bits", "size_bits", "bops")


@dataclass
class BitAllocation:
    w_bits: dict[str, int]
    a_bits: dict[str, int] | None            # None: activation bits were not searched (model-wide setting)
    budget: dict[str, float]
    achieved: dict[str, float]              # avg_bits, size_bits and bops of the result
    objective: float                        # summed sensitivity of the choice
    rows: list[dict[str, Any]] = field(default_factory=list)  # per layer: the table the tool prints

    @property
    def backend(self) -> str:
        bits = list(self.w_bits.values()) + list((self.a_bits or {}).values())
        return "TSQAT" if all(b == 8 for b in bits) else "Experimental"

    @property
    def module_qconfig(self) -> dict[str, dict[str, dict[str, int]]]:
        out = {}
        for n, b in self.w_bits.items():
            out[n] = {"w_qscheme": {"bit": int(b)}}
            if self.a_bits is not None:
                out[n]["a_qscheme"] = {"bit": int(self.a_bits[n])}
        return out

    def prepare_custom_config_dict(self, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``base`` (a prepare_custom_config_dict) with this allocation's ``module_qconfig`` laid over it."""
        cfg = dict(base or {})
        cfg["module_qconfig"] = {**dict(cfg.get("module_qconfig") or {}), **self.module_qconfig}
        return cfg


def _check_budget(budget: Mapping[str, float]) -> tuple[str, float]:
    if not isinstance(budget, Mapping) or len(budget) != 1:
        raise ValueError(f"budget must hold exactly one of {list(BUDGET_KEYS)}, e.g. {{'avg_bits': 4}}; got {budget!r}")
    (key, value), = budget.items()
    if key not in BUDGET_KEYS:
        close = difflib.get_close_matches(str(key), BUDGET_KEYS, n=1)
        raise ValueError(f"unknown budget key {key!r}; valid keys: {list(BUDGET_KEYS)}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    return key, float(value)


def _solve(c: np.ndarray, groups: list[list[int]], a_budget: np.ndarray, limit: float) -> np.ndarray | None:
    """min c.x, x binary, one x per group, a_budget.x <= limit; None when infeasible."""
    n = len(c)
    a_eq = np.zeros((len(groups), n))
    for g, idx in enumerate(groups):
        a_eq[g, idx] = 1.0
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        milp = None
    if milp is not None:
        res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(a_eq, 1, 1), LinearConstraint(a_budget[None, :], -np.inf, limit)])
        return np.round(res.x) if res.status == 0 else None
    try:
        import pulp
    except ImportError:
        raise ImportError("allocate_bits needs an integer LP solver: install scipy>=1.9 (scipy.optimize.milp) or "
                          "pulp") from None
    prob = pulp.LpProblem("bits", pulp.LpMinimize)
    x = [pulp.LpVariable(f"x{i}", cat="Binary") for i in range(n)]
    prob += pulp.lpSum(float(c[i]) * x[i] for i in range(n))
    for idx in groups:
        prob += pulp.lpSum(x[i] for i in idx) == 1
    prob += pulp.lpSum(float(a_budget[i]) * x[i] for i in range(n)) <= limit
    prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[prob.status] != "Optimal":
        return None
    return np.array([round(v.value()) for v in x], dtype=float)


def budget_range(costs: Mapping[str, LayerCost], budget: Mapping[str, float], candidates, act_candidates=(8,)
                 ) -> tuple[float, float]:
    """The least and the most the budget's quantity can be with these candidates (no sensitivity needed): a
    search can be refused before the sensitivities are computed."""
    key, _ = _check_budget(budget)
    total = sum(c.params for c in costs.values()) or 1
    w, a = sorted(int(b) for b in candidates), sorted(int(b) for b in act_candidates)

    def value(wb, ab):
        return {"avg_bits": sum(c.params for c in costs.values()) * wb / total,
                "size_bits": sum(c.params for c in costs.values()) * wb,
                "bops": sum(c.macs for c in costs.values()) * wb * ab}[key]
    return float(value(w[0], a[0])), float(value(w[-1], a[-1]))


def allocate_bits(sensitivity: Sensitivity, costs: Mapping[str, LayerCost], budget: Mapping[str, float],
                  act_bits: int = 8) -> BitAllocation:
    """Weight bits (and activation bits, if ``sensitivity`` scored ``act_candidates``) per layer, minimising the
    summed sensitivity under ``budget`` (one of avg_bits, size_bits, bops; see the module docstring). Layers
    without activation scores use ``act_bits`` for the BOPs."""
    key, limit = _check_budget(budget)
    layers = sensitivity.layers
    missing = [n for n in layers if n not in costs]
    if missing:
        raise ValueError(f"allocate_bits: no cost for layers {missing[:5]}; compute costs with layer_costs on "
                         "the same prepared model")
    searched_a = bool(sensitivity.act_candidates)
    a_cands = sensitivity.act_candidates if searched_a else (int(act_bits),)
    total_params = sum(costs[n].params for n in layers) or 1
    options, c, coef, groups = [], [], [], []
    for n in layers:
        idx = []
        for wb in sensitivity.candidates:
            for ab in a_cands:
                idx.append(len(options))
                options.append((n, wb, ab))
                c.append(sensitivity.weight[n][wb] + (sensitivity.activation[n][ab] if searched_a else 0.0))
                coef.append({"avg_bits": costs[n].params * wb / total_params, "size_bits": costs[n].params * wb,
                             "bops": costs[n].macs * wb * ab}[key])
        groups.append(idx)
    c_arr, coef_arr = np.asarray(c, float), np.asarray(coef, float)
    scale = float(np.abs(c_arr).max()) or 1.0  # the solver's tolerances are absolute: bring costs to ~1
    x = _solve(c_arr / scale, groups, coef_arr, limit)
    if x is None:
        lo = sum(min(coef_arr[i] for i in idx) for idx in groups)
        hi = sum(max(coef_arr[i] for i in idx) for idx in groups)
        raise ValueError(f"budget {key}={limit:g} cannot be met with bits {list(sensitivity.candidates)}: the "
                         f"candidates reach {lo:g} at the least and {hi:g} at the most")
    chosen = [options[i] for i in range(len(options)) if x[i] > 0.5]
    w_bits = {n: wb for n, wb, _ in chosen}
    a_bits = {n: ab for n, _, ab in chosen}
    achieved = {
        "avg_bits": sum(costs[n].params * w_bits[n] for n in layers) / total_params,
        "size_bits": float(sum(costs[n].params * w_bits[n] for n in layers)),
        "bops": float(sum(costs[n].macs * w_bits[n] * a_bits[n] for n in layers)),
    }
    rows = [{"layer": n, "params": costs[n].params, "macs": costs[n].macs, "w_bit": w_bits[n], "a_bit": a_bits[n],
             "sensitivity": sensitivity.weight[n][w_bits[n]],
             "sensitivity_min_bits": sensitivity.weight[n][min(sensitivity.candidates)],
             "hessian_trace": sensitivity.trace.get(n)} for n in layers]
    objective = float(sum(c_arr[i] for i in range(len(options)) if x[i] > 0.5))
    logger.info("bit allocation under %s <= %g: avg %.2f weight bits, %.3g BOPs, summed sensitivity %.4g", key,
                limit, achieved["avg_bits"], achieved["bops"], objective)
    return BitAllocation(w_bits, a_bits if searched_a else None, {key: limit}, achieved, objective, rows)
