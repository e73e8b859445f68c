#!/usr/bin/env python3
"""Each suite's deployed latency: its exported int8 ONNX against the same trained model exported in fp32,
both in onnxruntime (CPU provider, ORT_ENABLE_ALL), interleaved, median of --reps runs.

A suite takes part with suites/<suite>/analysis.py:deploy_pair(output_dir) -> (float model, int8 ONNX, input).

    python tools/bench_suites.py [--output-dir checkpoint] [--reps 30] [--out runs/bench_suites.json]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_suite(name: str, output_dir: str, reps: int) -> dict:
    import torch
    from ts_qat_pytorch.onnx.verify import ort_session
    model, int8_path, x = importlib.import_module(f"suites.{name}.analysis").deploy_pair(output_dir)
    with tempfile.TemporaryDirectory() as d:
        fp32_path = os.path.join(d, "fp32.onnx")
        torch.onnx.export(model, (x,), fp32_path, dynamo=True, external_data=False, opset_version=18, verbose=False)
        sess = {"fp32": ort_session(fp32_path), "int8": ort_session(int8_path)}
        feeds = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sess.items()}
        for k in sess:
            sess[k].run(None, feeds[k])
        times = {k: [] for k in sess}
        for _ in range(reps):
            for k in sess:
                t = time.perf_counter()
                sess[k].run(None, feeds[k])
                times[k].append(time.perf_counter() - t)
    f, i = statistics.median(times["fp32"]), statistics.median(times["int8"])
    return {"input_shape": list(x.shape), "fp32_ms": f * 1e3, "int8_ms": i * 1e3, "speedup": f / i}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="checkpoint")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="runs/bench_suites.json")
    a = ap.parse_args(argv)
    res = {}
    for folder in sorted((ROOT / "suites").iterdir()):
        if not (folder / "analysis.py").is_file():
            continue
        try:
            res[folder.name] = bench_suite(folder.name, a.output_dir, a.reps)
        except FileNotFoundError as e:
            print(f"{folder.name}: skipped, no trained artefacts ({e}); run its *_qat session first")
    print(f"{'suite':12s} {'input':18s} {'fp32 ms':>9s} {'int8 ms':>9s} {'speedup':>8s}")
    for k, r in res.items():
        print(f"{k:12s} {str(r['input_shape']):18s} {r['fp32_ms']:9.2f} {r['int8_ms']:9.2f} {r['speedup']:7.2f}x")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
