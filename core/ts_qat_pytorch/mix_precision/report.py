"""The mixed-precision search's report: the config JSON ``prepare_by_platform`` takes, a CSV table per layer, and a
PNG of bits per layer against sensitivity (matplotlib, imported only here). Written by tools/mixed_precision.py and
by the suites' runner (``--mixed-precision``) alike; every file is written atomically."""
from __future__ import annotations

import csv
import io
import json
import os

from ..utils.atomic_io import atomic_write_bytes

__all__ = ["write_outputs", "plot", "table"]


def write_outputs(out: str, alloc, sens) -> None:
    """mixed_precision.json, layers.csv and bits_vs_sensitivity.png in the folder ``out``."""
    os.makedirs(out, exist_ok=True)
    cfg = {"backend": alloc.backend, "prepare_custom_config_dict": alloc.prepare_custom_config_dict(),
           "budget": alloc.budget, "achieved": alloc.achieved, "method": sens.method,
           "candidates": list(sens.candidates)}
    atomic_write_bytes(os.path.join(out, "mixed_precision.json"), (json.dumps(cfg, indent=1) + "\n").encode())
    buf = io.StringIO()
    fields = ["layer", "params", "macs", "w_bit", "a_bit", "sensitivity", "sensitivity_min_bits", "hessian_trace"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(alloc.rows)
    atomic_write_bytes(os.path.join(out, "layers.csv"), buf.getvalue().encode())
    plot(alloc.rows, os.path.join(out, "bits_vs_sensitivity.png"))


def plot(rows, path: str) -> None:
    """Bits per layer (bars) against each layer's sensitivity at the lowest candidate (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(rows)), 4))
    x = range(len(rows))
    ax.bar(x, [r["w_bit"] for r in rows], color="tab:blue", alpha=0.6, label="weight bits")
    ax.set_ylabel("weight bits")
    ax.set_xticks(list(x), [r["layer"] for r in rows], rotation=90, fontsize=6)
    ax2 = ax.twinx()
    ax2.plot(list(x), [max(r["sensitivity_min_bits"], 1e-12) for r in rows], "o-", color="tab:red",
             label="sensitivity at the lowest bits")
    ax2.set_yscale("log")
    ax2.set_ylabel("sensitivity (expected loss increase)")
    fig.legend(loc="lower left", fontsize=7, framealpha=0.8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def table(alloc) -> str:
    """The allocation as a text table with the achieved budget."""
    lines = [f"{'layer':40s} {'params':>9s} {'MACs':>11s} {'w_bit':>5s} {'a_bit':>5s} {'sensitivity':>12s}"]
    lines += [f"{r['layer']:40s} {r['params']:9d} {r['macs']:11d} {r['w_bit']:5d} {r['a_bit']:5d} "
              f"{r['sensitivity']:12.4g}" for r in alloc.rows]
    a = alloc.achieved
    lines.append(f"backend {alloc.backend}: average {a['avg_bits']:.2f} weight bits, {a['size_bits'] / 8192:.1f} KiB, "
                 f"{a['bops']:.4g} BOPs per sample (budget {alloc.budget})")
    return "\n".join(lines)
