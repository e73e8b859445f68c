"""Compare a run's metrics with a suite's ``baselines.json`` (a list of {metric, value, tolerance}).

    rows, ok = compare_metrics(metrics, "suites/imagenet/baselines.json")
    print(format_table(rows))

A metric passes when |measured - value| <= tolerance. Optional per-entry ``direction``:
"higher" (only a drop beyond the tolerance fails) or "lower" (only a rise fails); default "both".
Metric names may be dotted paths into nested dicts ("integer_kernels.QLinearConv").
A metric missing from the run fails.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any


def lookup(metrics: dict, name: str) -> Any:
    cur: Any = metrics
    if name in metrics:
        return metrics[name]
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def load_baselines(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict) and "baselines" in data:
        data = data["baselines"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of {{metric, value, tolerance}} entries")
    for i, e in enumerate(data):
        missing = {"metric", "value", "tolerance"} - set(e)
        if missing:
            raise ValueError(f"{path}: entry {i} lacks {sorted(missing)}")
    return data


def compare_metrics(metrics: dict, baselines_path: str | os.PathLike) -> tuple[list[dict], bool]:
    rows = []
    for e in load_baselines(baselines_path):
        measured = lookup(metrics, e["metric"])
        base, tol = float(e["value"]), float(e["tolerance"])
        direction = e.get("direction", "both")
        if measured is None or not isinstance(measured, (int, float)) or math.isnan(float(measured)):
            verdict = "MISSING"
        else:
            diff = float(measured) - base
            if direction == "higher":
                good = diff >= -tol
            elif direction == "lower":
                good = diff <= tol
            else:
                good = abs(diff) <= tol
            verdict = "PASS" if good else "FAIL"
        rows.append({"metric": e["metric"], "baseline": base, "tolerance": tol, "direction": direction,
                     "measured": measured, "verdict": verdict})
    return rows, all(r["verdict"] == "PASS" for r in rows)


def format_table(rows: list[dict]) -> str:
    """metric / baseline / tolerance / measured / verdict, led by a suite column when rows name their suite."""
    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    with_suite = any("suite" in r for r in rows)
    head = (["suite"] if with_suite else []) + ["metric", "baseline", "tolerance", "measured", "verdict"]
    body = [([r.get("suite", "")] if with_suite else []) +
            [r["metric"], fmt(r["baseline"]), ("±" if r["direction"] == "both" else
             "-" if r["direction"] == "higher" else "+") + fmt(r["tolerance"]), fmt(r["measured"]), r["verdict"]]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="compare a metrics JSON with a baselines JSON")
    p.add_argument("metrics")
    p.add_argument("baselines")
    a = p.parse_args(argv)
    with open(a.metrics) as f:
        rows, ok = compare_metrics(json.load(f), a.baselines)
    print(format_table(rows))
    print("regression: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
