#!/usr/bin/env python3
"""Where does a suite's accuracy go? Per-layer profile and sensitivity analysis of its trained QAT model.

    python tools/analyze_suite.py profile --suite imagenet [--output-dir checkpoint]
        each quantized layer's output, float vs fake-quant: cosine, SQNR (dB), max abs error, scale and
        clipping ratio, worst first: a table, <arch>_profile.csv and .png next to the checkpoint
    python tools/analyze_suite.py sensitivity --suite imagenet [--val-images 2000]
        one layer at a time left float, the suite's metric on a held-out slice: the ranking, a plot, and
        <arch>_exclude.json: the extra_quantizer_dict that recovers most of the loss with the fewest float layers,
        ready for prepare_by_platform

The analysis is the runner's (``--profile`` / ``--sensitivity`` of every suite on suites/common/runner.py). This
tool finds the suite's last run through its metrics file (``<output-dir>/<suite>/*_metrics.json``, the suites' one
schema) and reruns the script recorded there (``run.entry``) with the run's own flags (``run.argv``) plus
``-e --resume <files.checkpoint> --profile|--sensitivity``. No suite is imported.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "core"))

# flags of the recorded run that an analysis rerun must not repeat (flag -> takes a value)
DROP = {"--baselines": True, "--metrics": True, "--resume": True, "--profile": False, "--sensitivity": False,
        "--stop-after-epochs": True, "--multiprocessing-distributed": False}


def last_run(output_dir: str, suite: str, metrics: str | None) -> dict:
    from suites.common.metrics import load_metrics
    if metrics:
        return load_metrics(metrics)
    found = sorted((ROOT / output_dir / suite if not os.path.isabs(output_dir) else Path(output_dir) / suite)
                   .glob("*_metrics.json"), key=lambda p: p.stat().st_mtime)
    for p in reversed(found):
        m = load_metrics(p)
        if m["files"].get("checkpoint"):
            return m
    raise SystemExit(f"no metrics file with a QAT checkpoint under {output_dir}/{suite}/: run the suite's QAT first "
                     f"(python3 -m nox -s {suite}_qat), or name one with --metrics")


def rerun_command(m: dict, command: str, val_images: int, output_dir: str) -> list[str]:
    entry = m["run"].get("entry")
    if not entry or not (ROOT / entry).is_file():
        raise SystemExit(f"the metrics of suite {m['suite']} name no script to rerun (run.entry {entry!r})")
    argv, skip = [], False
    for a in m["run"].get("argv", []):
        if skip:
            skip = False
            continue
        flag = a.split("=", 1)[0]
        if flag in DROP:
            skip = DROP[flag] and "=" not in a
            continue
        argv.append(a)
    return [sys.executable, str(ROOT / entry), *argv, "--output-dir", output_dir, "-e", "--resume",
            m["files"]["checkpoint"], f"--{command}", "--val-images", str(val_images), "--no-export",
            "--metrics", os.path.join(os.path.dirname(m["files"]["checkpoint"]), f"{m['arch']}_{command}_metrics.json")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["profile", "sensitivity"])
    ap.add_argument("--suite", default="imagenet")
    ap.add_argument("--output-dir", default="checkpoint")
    ap.add_argument("--metrics", default=None, help="the run's metrics file (default: the suite's newest)")
    ap.add_argument("--val-images", type=int, default=2000)
    a = ap.parse_args(argv)
    try:
        m = last_run(a.output_dir, a.suite, a.metrics)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cmd = rerun_command(m, a.command, a.val_images, a.output_dir)
    helptext = subprocess.run([cmd[0], cmd[1], "--help"], capture_output=True, text=True, cwd=str(ROOT)).stdout
    if f"--{a.command}" not in helptext:
        print(f"error: {m['run']['entry']} (suite {m['suite']}) has no --{a.command} flag: suites on the runner "
              "(suites/common/runner.py) have it", file=sys.stderr)
        return 2
    print("[analyze] " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=str(ROOT)).returncode


if __name__ == "__main__":
    sys.exit(main())
