"""The per-layer error profile: float vs fake-quant outputs of a prepared (``prepare_by_platform``) model.

    rows = profile_layers(qmodel, batches)     # list of dicts, worst first
    text = format_profile(rows); write_profile_csv(rows, "x.csv"); plot_profile(rows, "x.png")

The model runs once with its fake quantizers on (``enable_quantization``) and once with all of them
off (``disable_all``) on the same inputs; forward hooks capture the output of every module that is a
QAT layer (conv / linear / fused, quantized weights) or a fake quantizer. For each one: cosine
similarity, SQNR in dB (10 log10 of signal power over error power) and max absolute error, averaged
over the batches (max for max error), plus the quantizer's scale and clipping ratio (the fraction of
float inputs, or of the deployed weight for a layer, outside the representable range). The quantizers' switches
and the model's train/eval mode are restored afterwards. Only torch is needed (matplotlib for ``plot_profile``);
files are written atomically.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Iterable

import torch
from torch import nn

from ..fake_quantize import QuantizeBase
from ..nn.qat import FusedQATModule, QATMixin
from ..utils.atomic_io import atomic_write_bytes
from ..utils.state import disable_all, enable_quantization

__all__ = ["profile_layers", "format_profile", "write_profile_csv", "plot_profile", "PROFILE_FIELDS"]

# the columns of a profile row, in table / CSV order
PROFILE_FIELDS = ("index", "layer", "kind", "cosine", "sqnr_db", "max_abs_err", "scale", "clip_ratio")


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    out = {}
    for name, m in model.named_modules():
        if not name:
            continue
        if isinstance(m, QuantizeBase):
            # weight quantizers act on parameters, not on the data flow; their effect shows in the layer
            if not m.is_weight:
                out[name] = m
        elif isinstance(m, (QATMixin, FusedQATModule)):
            out[name] = m
    return out


def _kind(m: nn.Module) -> str:
    return "act_fake_quant" if isinstance(m, QuantizeBase) else type(m).__name__


def _range(fq: QuantizeBase) -> tuple[torch.Tensor, torch.Tensor]:
    scale, zp = fq.qparams()
    return (fq.quant_min - zp.float()) * scale, (fq.quant_max - zp.float()) * scale


def _scale_and_clipping(m: nn.Module, counts: list | None) -> tuple[float | None, float | None]:
    """The quantizer's scale (largest, for per-channel weights) and the fraction of values it clips:
    float inputs for activation quantizers, the deployed (BN-folded) weight for layers."""
    if isinstance(m, QuantizeBase):
        if not m.initialized:
            return None, None
        return float(m.qparams()[0].max()), (counts[0] / counts[1] if counts and counts[1] else None)
    fq = getattr(m, "weight_fake_quant", None)
    if not isinstance(fq, QuantizeBase) or not fq.initialized:
        return None, None
    w = fq.export_transform(m.quantized_weight_source()[0].detach())
    lo, hi = _range(fq)
    if fq.ch_axis >= 0:
        shape = [1] * w.dim()
        shape[fq.ch_axis] = -1
        lo, hi = lo.reshape(shape), hi.reshape(shape)
    return float(fq.qparams()[0].max()), float(((w < lo) | (w > hi)).float().mean())


@torch.no_grad()
def _capture(model: nn.Module, targets: dict[str, nn.Module], x,
             clip_acc: dict | None = None) -> dict[str, torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in targets.items():
        def hook(_m, _inp, out, name=name):
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                outs[name] = out.detach().float().cpu()
            if clip_acc is not None and isinstance(_m, QuantizeBase) and _m.initialized and _inp \
                    and isinstance(_inp[0], torch.Tensor) and _inp[0].is_floating_point():
                lo, hi = _range(_m)
                v = _inp[0].detach()
                c = clip_acc.setdefault(name, [0, 0])
                c[0] += int(((v < float(lo.min())) | (v > float(hi.max()))).sum())
                c[1] += v.numel()
        handles.append(m.register_forward_hook(hook))
    try:
        model(*x) if isinstance(x, (tuple, list)) else model(x)
    finally:
        for h in handles:
            h.remove()
    return outs


def _sqnr_db(signal_power: float, error_power: float) -> float:
    if error_power > 0 and signal_power > 0:
        return 10 * math.log10(signal_power / error_power)
    return math.inf if error_power == 0 else -math.inf


def profile_layers(model: nn.Module, batches: Iterable, max_batches: int = 4) -> list[dict]:
    """Compare each quantized layer's output with quantization on vs off; rows sorted worst (lowest SQNR) first."""
    model = getattr(model, "module", model)
    quantizers = [m for m in model.modules() if isinstance(m, QuantizeBase)]
    if not quantizers:
        raise ValueError("profile_layers needs a model prepared by prepare_by_platform")
    saved = [(m.observer_enabled, m.fake_quant_enabled) for m in quantizers]
    was_training = model.training
    targets = _targets(model)
    order = {name: i for i, name in enumerate(targets)}
    acc: dict[str, dict] = {}
    clip_acc: dict[str, list] = {}  # activation quantizer -> [values outside its range, values]
    model.eval()
    try:
        for bi, batch in enumerate(batches):
            if bi >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch
            enable_quantization(model)
            q = _capture(model, targets, x)
            disable_all(model)
            f = _capture(model, targets, x, clip_acc)
            if bi == 0:  # execution order (hooks fire in the order the graph runs)
                order = {name: i for i, name in enumerate(q)}
            for name in q.keys() & f.keys():
                a, b = q[name].reshape(-1).double(), f[name].reshape(-1).double()
                if a.shape != b.shape:
                    continue
                err = a - b
                sig_p, err_p = float((b * b).mean()), float((err * err).mean())
                cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12))
                r = acc.setdefault(name, {"cos": 0.0, "sig": 0.0, "err": 0.0, "max": 0.0, "n": 0})
                r["cos"] += cos
                r["sig"] += sig_p
                r["err"] += err_p
                r["max"] = max(r["max"], float(err.abs().max()) if err.numel() else 0.0)
                r["n"] += 1
    finally:
        for m, (obs, fq) in zip(quantizers, saved):
            m.enable_observer(obs).enable_fake_quant(fq)
        model.train(was_training)
    rows = []
    for name, r in acc.items():
        scale, clip = _scale_and_clipping(targets[name], clip_acc.get(name))
        rows.append({"index": order.get(name, len(order)), "layer": name, "kind": _kind(targets[name]),
                     "cosine": r["cos"] / r["n"], "sqnr_db": _sqnr_db(r["sig"], r["err"]), "max_abs_err": r["max"],
                     "scale": scale, "clip_ratio": clip})
    rows.sort(key=lambda r: (r["sqnr_db"], r["cosine"]))
    return rows


def format_profile(rows: list[dict], limit: int | None = None) -> str:
    """The rows as a text table (the first ``limit`` of them)."""
    rows = rows[:limit] if limit else rows
    head = (f"{'#':>4}  {'layer':<40} {'kind':<22} {'cosine':>9} {'SQNR dB':>8} {'max|err|':>10} "
            f"{'scale':>10} {'clip %':>7}")
    lines = [head, "-" * len(head)]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        lines.append(f"{r['index']:>4}  {r['layer'][-40:]:<40} {r['kind'][:22]:<22} {r['cosine']:>9.5f} "
                     f"{r['sqnr_db']:>8.2f} {r['max_abs_err']:>10.4g} {fmt(r.get('scale'), '.4g'):>10} "
                     f"{fmt(None if r.get('clip_ratio') is None else 100 * r['clip_ratio'], '.3f'):>7}")
    return "\n".join(lines)


def write_profile_csv(rows: list[dict], path: str) -> None:
    """The rows as CSV (columns ``PROFILE_FIELDS``)."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(PROFILE_FIELDS))
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def plot_profile(rows: list[dict], path: str, title: str = "per-layer quantization error") -> None:
    """SQNR (bars) and cosine similarity (line) per layer in execution order, the five worst named (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ordered = sorted(rows, key=lambda r: r["index"])
    xs = list(range(len(ordered)))
    fig, ax1 = plt.subplots(figsize=(max(8, len(ordered) * 0.12), 4.5))
    ax1.bar(xs, [min(r["sqnr_db"], 80) for r in ordered], color="tab:blue", label="SQNR dB")
    ax1.set_ylabel("SQNR (dB)", color="tab:blue")
    ax1.set_xlabel("quantized layer / activation quantizer (execution order)")
    ax2 = ax1.twinx()
    ax2.plot(xs, [r["cosine"] for r in ordered], color="tab:red", marker=".", lw=1, label="cosine")
    ax2.set_ylabel("cosine similarity", color="tab:red")
    worst = sorted(ordered, key=lambda r: r["sqnr_db"])[:5]
    for r in worst:
        ax1.annotate(r["layer"], (xs[ordered.index(r)], min(r["sqnr_db"], 80)), fontsize=6, rotation=60)
    ax1.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
