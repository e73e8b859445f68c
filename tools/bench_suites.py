#!/usr/bin/env python3
"""Each suite's deployed latency: its exported int8 ONNX against the same network in fp32, both in onnxruntime
(CPU provider, ORT_ENABLE_ALL), interleaved, median of --reps runs.

A suite takes part through its metrics file (the suites' one schema, suites/README.md): every
``<output-dir>/**/*metrics.json`` with ``files.onnx`` (the newest per suite). The fp32 twin is ``files.fp32_onnx``
when the suite wrote one, else the int8 file with its quantization folded away (constant DequantizeLinear ->
float initializers, activation QuantizeLinear -> DequantizeLinear pairs removed): the same trained network.

    python tools/bench_suites.py [--output-dir checkpoint] [--reps 30] [--out runs/bench_suites.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "core"))


def latest_runs(output_dir: str) -> dict[str, dict]:
    """suite -> its newest metrics (schema 1) that names an exported ONNX file."""
    from suites.common.metrics import load_metrics
    runs: dict[str, tuple[float, dict]] = {}
    for p in Path(output_dir).rglob("*metrics.json"):
        try:
            m = load_metrics(p)
        except ValueError as exc:
            print(f"skipped {p}: {exc}")
            continue
        if m["files"].get("onnx") and os.path.exists(m["files"]["onnx"]):
            t = p.stat().st_mtime
            if m["suite"] not in runs or t > runs[m["suite"]][0]:
                runs[m["suite"]] = (t, m)
    return {k: v for k, (_t, v) in sorted(runs.items())}


def float_twin(int8_path: str, out_path: str) -> str:
    """The QDQ file with its quantization folded away: the float network of the same trained weights."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(int8_path)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def const(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    keep = []
    for n in g.node:
        if n.op_type == "DequantizeLinear":
            x = const(n.input[0])
            if x is not None:  # a quantized constant (weight, bias): dequantize it once
                scale = const(n.input[1])
                zp = const(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros((), x.dtype)
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                if scale.ndim == 1 and x.ndim > 1:
                    shape = [1] * x.ndim
                    shape[axis] = -1
                    scale, zp = scale.reshape(shape), zp.reshape(shape)
                w = (x.astype(np.float32) - zp.astype(np.float32)) * scale.astype(np.float32)
                g.initializer.append(numpy_helper.from_array(w.astype(np.float32), n.output[0]))
                continue
            q = producer.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":  # an activation's Q -> DQ pair
                keep.append(onnx.helper.make_node("Identity", [q.input[0]], [n.output[0]]))
                continue
        keep.append(n)
    used = {i for n in keep for i in n.input}
    keep = [n for n in keep if n.op_type != "QuantizeLinear" or n.output[0] in used]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    live = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    onnx.save(model, out_path)
    return out_path


def _feeds(sess) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = (np.zeros(shape, np.int64) if "int" in i.type
                         else rng.standard_normal(shape).astype(np.float32))
    return feeds


def bench(int8_path: str, fp32_path: str, reps: int) -> dict:
    from ts_qat_pytorch.onnx.verify import interleaved_times, ort_session
    sess = {"fp32": ort_session(fp32_path), "int8": ort_session(int8_path)}
    feeds = {k: _feeds(s) for k, s in sess.items()}
    times = interleaved_times(sess, feeds, reps)
    f, i = statistics.median(times["fp32"]), statistics.median(times["int8"])
    shapes = [list(v.shape) for v in feeds["int8"].values()]
    return {"input_shape": shapes[0] if len(shapes) == 1 else shapes, "fp32_ms": f * 1e3, "int8_ms": i * 1e3,
            "speedup": f / i}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="checkpoint")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="runs/bench_suites.json")
    a = ap.parse_args(argv)
    runs = latest_runs(a.output_dir)
    if not runs:
        print(f"no suite metrics with an exported ONNX under {a.output_dir}: run a suite's *_qat session first")
        return 0
    res = {}
    with tempfile.TemporaryDirectory() as d:
        for suite, m in runs.items():
            fp32 = m["files"].get("fp32_onnx")
            if not fp32 or not os.path.exists(fp32):
                fp32 = float_twin(m["files"]["onnx"], os.path.join(d, f"{suite}_fp32.onnx"))
            res[suite] = {"arch": m["arch"], "onnx": m["files"]["onnx"], **bench(m["files"]["onnx"], fp32, a.reps)}
    print(f"{'suite':12s} {'arch':14s} {'input':18s} {'fp32 ms':>9s} {'int8 ms':>9s} {'speedup':>8s}")
    for k, r in res.items():
        print(f"{k:12s} {r['arch'][:14]:14s} {str(r['input_shape'])[:18]:18s} {r['fp32_ms']:9.2f} {r['int8_ms']:9.2f} "
              f"{r['speedup']:7.2f}x")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
