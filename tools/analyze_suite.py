#!/usr/bin/env python3
"""Where does a suite's accuracy go? Per-layer profile and sensitivity analysis on its trained QAT model.

    python tools/analyze_suite.py profile --suite imagenet [--output-dir checkpoint]
        each quantized layer's output, float vs fake-quant: cosine, SQNR (dB), max abs error, scale and
        clipping ratio, worst first: a table, <out>/<suite>_profile.csv and .png
    python tools/analyze_suite.py sensitivity --suite imagenet [--val-images 2000] [--recover 0.8]
        one layer at a time left float, the suite's metric on a held-out slice: the ranking, a plot, and
        <out>/<suite>_exclude.json: the extra_quantizer_dict that recovers most of the loss with the fewest
        float layers, ready for prepare_by_platform

A suite takes part by providing suites/<suite>/analysis.py with load(output_dir, val_images) ->
(prepared model loaded from its QAT checkpoint, input batches, evaluate(model) -> metric).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["profile", "sensitivity"])
    ap.add_argument("--suite", default="imagenet")
    ap.add_argument("--output-dir", default="checkpoint")
    ap.add_argument("--val-images", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=4, help="batches for the profile")
    ap.add_argument("--recover", type=float, default=0.8, help="fraction of the float-vs-int8 gap to win back")
    ap.add_argument("--max-layers", type=int, default=8)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        hook = importlib.import_module(f"suites.{a.suite}.analysis")
    except ModuleNotFoundError:
        print(f"suite '{a.suite}' has no analysis hook (suites/{a.suite}/analysis.py)", file=sys.stderr)
        return 2
    t = time.time()
    q, batches, evaluate = hook.load(a.output_dir, a.val_images)
    base = os.path.join(a.output_dir, a.suite)
    if a.command == "profile":
        from suites.common import profiler
        rows = profiler.profile_layers(q, batches, max_batches=a.batches)
        print(profiler.format_table(rows, limit=25))
        profiler.write_csv(rows, base + "_profile.csv")
        profiler.plot(rows, base + "_profile.png", title=f"{a.suite}: float vs fake-quant per layer")
        print(f"wrote {base}_profile.csv and {base}_profile.png ({time.time() - t:.0f} s)")
        return 0
    from suites.common import sensitivity as S
    res = S.layer_sensitivity(q, evaluate)
    print(S.format_ranking(res))
    excl = S.recovery_exclude_list(q, evaluate, res, recover=a.recover, max_layers=a.max_layers)
    cfg = S.write_exclude_config(excl, base + "_exclude.json")
    S.plot_ranking(res, base + "_sensitivity.png")
    with open(base + "_sensitivity.json", "w") as f:
        json.dump({**res, "exclude": excl}, f, indent=1)
    print(f"\nleave float {excl['exclude_module_name']}: metric {excl['metric']:.3f} "
          f"(quantized {res['quantized']:.3f}, float {res['float']:.3f}; recovers "
          f"{100 * excl['recovered_fraction']:.0f}% of the gap)")
    print(f"wrote {base}_exclude.json ({json.dumps(cfg)}), {base}_sensitivity.png, {base}_sensitivity.json "
          f"({time.time() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
