"""The float-fallback ranking: which quantized layers cost the most accuracy, and which to leave float.

    ranking = float_fallback_ranking(qmodel, evaluate)       # evaluate(model) -> metric, higher is better
    excl = recovery_exclude_list(qmodel, evaluate, ranking)  # fewest float layers recovering most of the loss
    write_exclude_config(excl, "exclude.json")               # ready for prepare_by_platform

One layer at a time is left float (its weight quantizer and its output quantizer switched off) and the caller's
metric is measured (on a held-out slice, say). The model's quantizer switches are restored after. This measures
the whole model's metric per layer; ``mix_precision.layer_sensitivity`` estimates each layer's loss increase per
bit width instead, for choosing bit widths.
"""
from __future__ import annotations

import io
import json
import logging
from typing import Callable

import torch
from torch import fx, nn

from ..fake_quantize import QuantizeBase
from ..nn.qat import QATMixin
from ..utils.atomic_io import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["layer_quantizers", "float_fallback_ranking", "recovery_exclude_list", "write_exclude_config",
           "format_ranking", "plot_ranking"]


def layer_quantizers(model: fx.GraphModule) -> dict[str, list[QuantizeBase]]:
    """Each QAT layer (by its module name) -> its weight quantizer and the quantizer of its output."""
    groups: dict[str, list[QuantizeBase]] = {}
    for node in model.graph.nodes:
        if node.op != "call_module":
            continue
        mod = model.get_submodule(node.target)
        if not isinstance(mod, QATMixin):
            continue
        qs = [mod.weight_fake_quant]
        cur = node
        for _ in range(3):  # the output quantizer sits right after the layer (or after its activation)
            nxt = [u for u in cur.users if u.op == "call_module"
                   and isinstance(model.get_submodule(u.target), QuantizeBase)]
            if nxt:
                qs.append(model.get_submodule(nxt[0].target))
                break
            if len(cur.users) != 1:
                break
            (cur,) = cur.users
        groups[str(node.target)] = qs
    return groups


class _Float:
    """Context: the given quantizers pass values through unchanged."""

    def __init__(self, quantizers):
        self.qs = list(quantizers)

    def __enter__(self):
        self.saved = [q.fake_quant_enabled for q in self.qs]
        for q in self.qs:
            q.disable_fake_quant()

    def __exit__(self, *exc):
        for q, s in zip(self.qs, self.saved):
            q.enable_fake_quant(s)


@torch.no_grad()
def float_fallback_ranking(model: fx.GraphModule, evaluate: Callable[[nn.Module], float],
                           log_every: int = 10) -> dict:
    """The metric with every layer quantized, all float, and each layer alone left float (its gain over all
    quantized): ``{"quantized", "float", "rows": [{"layer", "metric_if_float", "gain"}, ...]}``, largest gain
    first."""
    groups = layer_quantizers(model)
    all_q = [m for m in model.modules() if isinstance(m, QuantizeBase)]
    quantized = float(evaluate(model))
    with _Float(all_q):
        float_metric = float(evaluate(model))
    rows = []
    for i, (name, qs) in enumerate(groups.items()):
        with _Float(qs):
            m = float(evaluate(model))
        rows.append({"layer": name, "metric_if_float": m, "gain": m - quantized})
        if log_every and (i + 1) % log_every == 0:
            logger.info("float-fallback ranking: %d/%d layers", i + 1, len(groups))
    rows.sort(key=lambda r: -r["gain"])
    return {"quantized": quantized, "float": float_metric, "rows": rows}


@torch.no_grad()
def recovery_exclude_list(model: fx.GraphModule, evaluate: Callable[[nn.Module], float], result: dict,
                          recover: float = 0.8, max_layers: int = 8) -> dict:
    """Greedy: add the most sensitive layers (measured together, not assumed additive) until ``recover`` of
    the float-vs-quantized gap is back or ``max_layers`` are float. Returns the list and measured metric."""
    groups = layer_quantizers(model)
    gap = result["float"] - result["quantized"]
    chosen, metric = [], result["quantized"]
    for r in result["rows"][:max_layers]:
        if gap <= 0 or metric - result["quantized"] >= recover * gap or r["gain"] <= 0:
            break
        chosen.append(r["layer"])
        with _Float([q for name in chosen for q in groups[name]]):
            metric = float(evaluate(model))
    return {"exclude_module_name": chosen, "metric": metric,
            "recovered_fraction": (metric - result["quantized"]) / gap if gap > 0 else 1.0}


def write_exclude_config(exclude: dict, path: str) -> dict:
    """The exclusions as a prepare_custom_config_dict (JSON at ``path``); returns it."""
    cfg = {"extra_quantizer_dict": {"exclude_module_name": exclude["exclude_module_name"]}}
    atomic_write_bytes(path, (json.dumps(cfg, indent=1) + "\n").encode())
    return cfg


def format_ranking(result: dict, top: int = 15) -> str:
    """The ``top`` layers of a ranking as a text table."""
    lines = [f"all quantized: {result['quantized']:.3f}   all float: {result['float']:.3f}",
             f"{'layer':40s} {'metric if float':>16s} {'gain':>8s}"]
    for r in result["rows"][:top]:
        lines.append(f"{r['layer'][:40]:40s} {r['metric_if_float']:16.3f} {r['gain']:+8.3f}")
    return "\n".join(lines)


def plot_ranking(result: dict, path: str, top: int = 25) -> None:
    """The ``top`` layers' gains as horizontal bars (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"][:top]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    ax.barh([r["layer"] for r in rows][::-1], [r["gain"] for r in rows][::-1], color="tab:orange")
    ax.set_xlabel("metric gain when this layer alone stays float")
    ax.set_title(f"sensitivity (quantized {result['quantized']:.2f}, float {result['float']:.2f})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
