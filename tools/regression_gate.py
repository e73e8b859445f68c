#!/usr/bin/env python3
"""One regression gate over every suite.

A suite takes part when its folder holds ``baselines.json`` and ``regression.json``:

    {"script": "main.py", "args": ["--epochs", "1"], "metrics_flag": "--metrics"}

The gate runs ``python suites/<name>/<script> <args> <metrics_flag> <file>`` for each suite (discovered, not
listed), reads the metrics file it wrote (the suites' one schema, suites/README.md; any other file is that suite's
error), compares it with the suite's baselines (suites/common/regression.py: metric, value, tolerance, optional
direction), prints one table (suite, metric, baseline, tolerance, measured, verdict), writes the same as JSON
(--out), and exits non-zero when any metric fails or any suite's run fails.

A suite may add longer runs of the same script, each with its own baselines file, under ``"extra"``; they run with
``--extra`` (all of them, after the default runs) or ``--extra NAME ...``, and their rows are named ``suite/NAME``:

    {"script": "main.py", "args": [...], "extra": [{"name": "w4a4_ptq", "args": ["--epochs", "0", ...],
                                                    "baselines": "baselines_w4a4_ptq.json"}]}

    python tools/regression_gate.py [--suites-root suites] [--only imagenet] [--extra [NAME ...]]
                                    [--out runs/regression.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from suites.common.metrics import load_metrics  # noqa: E402
from suites.common.regression import compare_metrics, format_table  # noqa: E402


def discover(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "baselines.json").is_file() and (p / "regression.json").is_file())


def entries(folder: Path, extra: list[str] | None) -> list[tuple[str, list[str], Path]]:
    """(row name, script arguments, baselines file) of the suite's default run and of the ``extra`` runs asked for
    (``extra`` None: none; []: all; names: those)."""
    cfg = json.loads((folder / "regression.json").read_text())
    runs = [(folder.name, list(cfg.get("args", [])), folder / "baselines.json")]
    for e in cfg.get("extra", []) if extra is not None else []:
        if not extra or e["name"] in extra:
            runs.append((f"{folder.name}/{e['name']}", list(e.get("args", [])), folder / e["baselines"]))
    return runs


def run_suite(folder: Path, workdir: Path, name: str | None = None, args: list[str] | None = None,
              baselines: Path | None = None) -> tuple[list[dict], str | None, float]:
    cfg = json.loads((folder / "regression.json").read_text())
    name = name or folder.name
    args = cfg.get("args", []) if args is None else args
    metrics_file = workdir / f"{name.replace('/', '_')}_metrics.json"
    cmd = [sys.executable, str(folder / cfg["script"]), *args, cfg.get("metrics_flag", "--metrics"),
           str(metrics_file)]
    print(f"[regression] {name}: {' '.join(cmd)}", flush=True)
    t = time.time()
    r = subprocess.run(cmd, cwd=str(ROOT))
    wall = time.time() - t
    if not metrics_file.exists():
        return [], f"the run exited with {r.returncode} and wrote no metrics", wall
    try:
        metrics = load_metrics(metrics_file)
    except ValueError as exc:
        return [], str(exc), wall
    rows, _ = compare_metrics(metrics, baselines or folder / "baselines.json")
    for row in rows:
        row["suite"] = name
    return rows, None if r.returncode in (0, 1) else f"the run exited with {r.returncode}", wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites-root", default=str(ROOT / "suites"))
    ap.add_argument("--only", nargs="*", help="suite names to run (default: all discovered)")
    ap.add_argument("--extra", nargs="*", default=None, metavar="NAME",
                    help="also the suites' longer runs (regression.json 'extra'): all, or those named")
    ap.add_argument("--out", default=str(ROOT / "runs" / "regression.json"))
    a = ap.parse_args(argv)
    suites = [s for s in discover(Path(a.suites_root)) if not a.only or s.name in a.only]
    if not suites:
        print("no suite has both baselines.json and regression.json", file=sys.stderr)
        return 2
    runs = [(s, *e) for s in suites for e in entries(s, a.extra)]
    if a.extra:
        unknown = set(a.extra) - {n.split("/", 1)[1] for _s, n, _a, _b in runs if "/" in n}
        if unknown:
            print(f"--extra {' '.join(sorted(unknown))}: no such run in the suites' regression.json", file=sys.stderr)
            return 2
    missing = [str(b) for _s, _n, _a, b in runs if not b.is_file()]
    if missing:
        print(f"baselines file(s) missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows, errors, walls = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for s, name, args, baselines in sorted(runs, key=lambda r: "/" in r[1]):  # default runs first
            r, err, walls[name] = run_suite(s, Path(tmp), name, args, baselines)
            rows += r
            if err:
                errors[name] = err
    print("\n" + format_table(rows))
    for name, err in errors.items():
        print(f"{name}: {err}")
    ok = not errors and all(r["verdict"] == "PASS" for r in rows)
    print(f"\nregression gate: {'PASS' if ok else 'FAIL'} ({len(suites)} suites, {len(runs)} runs, "
          + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) + ")")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"ok": ok, "rows": rows, "errors": errors, "wall_s": walls}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
