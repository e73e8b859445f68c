"""Inspect an exported QDQ ONNX model.

  1. every quantized tensor (activations: QuantizeLinear; weights: integer initializers) with its scale(s), zero
     point(s), storage type and axis;
  2. a check of those against the parameter JSON (--qparams);
  3. onnxruntime with integer kernels (ORT_ENABLE_ALL) against onnxruntime's float QDQ reference
     (no graph optimisation), per output, on given (--inputs a.npy ...) or random inputs;
  4. which conv / gemm / matmul ops onnxruntime runs as integer kernels, and for each one left in float,
     why ("why is my int8 model slow");
  5. with --profile [--threads N]: where onnxruntime spends the time, per op type of its optimized graph
     (its own profiler; compare an int8 file with its fp32 twin to see what the int8 one pays extra for).

    ts-qat-inspect model.onnx [--qparams model_qparams.json] [--inputs x.npy] [--json report.json]
    ts-qat-inspect model_int8.onnx model_fp32.onnx --profile --threads 2
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from ts_qat_pytorch.onnx.graph import GraphIndex
from ts_qat_pytorch.onnx.storage import quantized_tensors
from ts_qat_pytorch.onnx.verify import INTEGER_KERNELS, optimized_op_counts, ort_session

COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    vals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
    return vals


def _row(tensor: str, node: str, scale, zp, axis) -> dict:
    return {"tensor": tensor, "node": node,
            "scale": None if scale is None else np.atleast_1d(scale).astype(float).tolist(),
            "zero_point": None if zp is None else np.atleast_1d(zp).astype(int).tolist(),
            "dtype": None if zp is None else str(zp.dtype),
            "axis": axis if scale is not None and np.size(scale) > 1 else None}


def quantize_nodes(model: onnx.ModelProto) -> list[dict]:
    """Every quantized tensor: activations (the input of a QuantizeLinear) and integer weights (an 8-bit initializer
    read by a DequantizeLinear, or an embedding table whose rows are gathered before their per-row scales)."""
    consts = _constants(model)
    rows = []
    weights = {k for k, kind in quantized_tensors(model).items() if kind == "weight"}
    for n in model.graph.node:
        axis = next((a.i for a in n.attribute if a.name == "axis"), None)
        if n.op_type == "QuantizeLinear" or (n.op_type == "DequantizeLinear" and n.input[0] in weights):
            zp = consts.get(n.input[2]) if len(n.input) > 2 else None
            rows.append(_row(n.input[0], n.name, consts.get(n.input[1]), zp, axis))
            weights.discard(n.input[0])
    for n in model.graph.node:  # tables looked up first (onnx/gather.py): the scales are gathered with the same ids
        if n.op_type == "Gather" and n.input[0] in weights:
            scale = next((consts.get(m.input[0]) for m in model.graph.node if m is not n and m.op_type == "Gather"
                          and m.input[1] == n.input[1] and consts.get(m.input[0]) is not None
                          and consts[m.input[0]].dtype == np.float32), None)
            table = consts[n.input[0]]
            zp = np.zeros(np.size(scale) if scale is not None else 1, table.dtype)
            rows.append(_row(n.input[0], n.name, scale, zp, 0))
            weights.discard(n.input[0])
    return rows


def check_against_json(rows: list[dict], qparams: dict) -> list[str]:
    """Mismatches between the file and the JSON (empty list: they agree)."""
    by_tensor = {r["tensor"]: r for r in rows}
    problems = []
    for name, e in qparams["tensors"].items():
        r = by_tensor.get(name)
        if r is None:
            problems.append(f"{name}: in the JSON but the file does not quantize it")
            continue
        if r["scale"] is None or not np.allclose(r["scale"], e["scale"], rtol=1e-6):
            problems.append(f"{name}: scale differs (file {r['scale'][:4] if r['scale'] else None}, json {e['scale'][:4]})")
        want_zp = e.get("onnx_zero_point", e["zero_point"])
        if r["zero_point"] is None or list(np.broadcast_to(r["zero_point"], len(want_zp))) != want_zp:
            problems.append(f"{name}: zero point differs (file {r['zero_point'][:4] if r['zero_point'] else None}, "
                            f"json {want_zp[:4]})")
    for name in by_tensor:
        if name not in qparams["tensors"]:
            problems.append(f"{name}: quantized in the file but missing from the JSON")
    return problems


def float_compute_reasons(model: onnx.ModelProto) -> list[dict]:
    """For each conv / gemm / matmul: would onnxruntime's QDQ fusion make it an integer kernel? If not, why."""
    G = GraphIndex(model)
    g, producer, consumers = G.g, G.producer, G.consumers
    outputs = {o.name for o in g.output}
    rows = []
    for n in g.node:
        if n.op_type not in COMPUTE_OPS:
            continue
        reasons = []
        names = ["input", "weight"] if n.op_type != "MatMul" else ["input A", "input B"]
        for label, i in zip(names, n.input[:2]):
            p = producer.get(i)
            if p is None or p.op_type != "DequantizeLinear":
                reasons.append(f"{label} '{i}' is not quantized (no DequantizeLinear in front)")
        out = n.output[0]
        outs = consumers.get(out, [])
        # onnxruntime folds a Relu / Clip between the op and its QuantizeLinear into the requantization
        while len(outs) == 1 and outs[0].op_type in ("Relu", "Clip") and out not in outputs:
            out = outs[0].output[0]
            outs = consumers.get(out, [])
        if n.op_type in ("Conv", "ConvTranspose") and (not outs or any(c.op_type != "QuantizeLinear" for c in outs)
                                                        or out in outputs):
            kinds = sorted({c.op_type for c in outs}) or ["graph output"]
            reasons.append(f"output feeds {kinds}, not only QuantizeLinear: add an output quantizer "
                           "(a quantized consumer) or fuse the activation")
        if n.op_type == "ConvTranspose":
            reasons.append("onnxruntime's CPU provider has no integer ConvTranspose kernel")
        rows.append({"node": n.name or n.output[0], "op": n.op_type, "integer": not reasons, "why_float": reasons})
    return rows


def op_time_profile(path: str, inputs: list[np.ndarray] | None = None, threads: int | None = None,
                    runs: int = 10, seed: int = 0) -> dict:
    """onnxruntime's profiler over one warm-up run and ``runs`` timed runs: wall ms per timed run and, per op type
    of the optimized graph, kernel ms per run (all runs), share of the kernel time and nodes."""
    import os
    import tempfile
    import time
    from collections import defaultdict

    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(d, "ort_profile")
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        feeds = _feeds(sess, inputs, seed)
        sess.run(None, feeds)  # warm-up: in the profile too, so the per-op figures divide by runs + 1
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feeds)
        wall = (time.perf_counter() - t0) / runs * 1000
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    per_op, nodes = Counter(), defaultdict(set)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"]["op_name"]
            per_op[op] += e["dur"]
            nodes[op].add(e["name"])
    total = sum(per_op.values()) or 1
    calls = runs + 1
    return {"onnx": path, "threads": threads, "runs": runs, "wall_ms": round(wall, 2),
            "ops": [{"op": op, "ms": round(us / 1000 / calls, 3), "share": round(us / total, 4), "nodes": len(nodes[op])}
                    for op, us in per_op.most_common()]}


def print_profile(p: dict, out=sys.stdout, limit: int = 15) -> None:
    print(f"\n{p['onnx']}: {p['wall_ms']} ms per run ({p['threads'] or 'default'} threads, {p['runs']} runs)", file=out)
    print(f"  {'op':32s} {'ms/run':>8s} {'share':>6s} {'nodes':>6s}", file=out)
    for r in p["ops"][:limit]:
        print(f"  {r['op']:32s} {r['ms']:8.2f} {100 * r['share']:5.1f}% {r['nodes']:6d}", file=out)


def _feeds(sess, inputs: list[np.ndarray] | None, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for k, i in enumerate(sess.get_inputs()):
        if inputs and k < len(inputs):
            feeds[i.name] = inputs[k]
            continue
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        if "int" in i.type:
            feeds[i.name] = rng.integers(0, 2, size=shape).astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def compare_ort(path: str, inputs: list[np.ndarray] | None, seed: int = 0) -> dict:
    ref_sess, int_sess = ort_session(path, optimize=False), ort_session(path, optimize=True)
    feeds = _feeds(ref_sess, inputs, seed)
    ref, got = ref_sess.run(None, feeds), int_sess.run(None, feeds)
    return {o.name: {"max_abs_diff": float(np.abs(a - b).max()) if a.size else 0.0,
                     "mean_abs_diff": float(np.abs(a - b).mean()) if a.size else 0.0}
            for o, a, b in zip(ref_sess.get_outputs(), ref, got)}


def inspect(path: str, qparams_path: str | None = None, inputs=None) -> dict:
    model = onnx.load(path)
    rows = quantize_nodes(model)
    report = {"onnx": path, "quantize_linear": rows, "compute_ops": float_compute_reasons(model)}
    if qparams_path:
        with open(qparams_path) as f:
            report["json_mismatches"] = check_against_json(rows, json.load(f))
    counts = optimized_op_counts(path)
    report["ort_integer_kernels"] = {k: v for k, v in sorted(counts.items()) if k in INTEGER_KERNELS}
    report["ort_float_compute_ops"] = {k: v for k, v in sorted(counts.items()) if k in COMPUTE_OPS | {"FusedConv"}}
    report["ort_int8_vs_qdq_reference"] = compare_ort(path, inputs)
    return report


def print_report(r: dict, out=sys.stdout) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"{r['onnx']}: {len(r['quantize_linear'])} quantized tensors")
    p(f"{'tensor':48s} {'dtype':6s} {'axis':>4s}  scale / zero point")
    for q in r["quantize_linear"]:
        s = q["scale"] or []
        z = q["zero_point"] or []
        desc = f"{s[0]:.6g} / {z[0] if z else '-'}" if len(s) == 1 else f"{len(s)} channels, scale {min(s):.3g}..{max(s):.3g}"
        p(f"{q['tensor'][:48]:48s} {str(q['dtype']):6s} {str(q['axis'] if q['axis'] is not None else ''):>4s}  {desc}")
    if "json_mismatches" in r:
        p(f"\nagainst the JSON: {'agrees' if not r['json_mismatches'] else str(len(r['json_mismatches'])) + ' mismatches'}")
        for m in r["json_mismatches"][:20]:
            p(f"  - {m}")
    p(f"\nonnxruntime integer kernels: {r['ort_integer_kernels']}")
    p(f"onnxruntime float conv/gemm/matmul left: {r['ort_float_compute_ops'] or 'none'}")
    floats = [c for c in r["compute_ops"] if not c["integer"]]
    if floats:
        p("float compute ops and why:")
        for c in floats[:30]:
            p(f"  - {c['op']} {c['node']}: " + "; ".join(c["why_float"]))
    p("\nonnxruntime int8 vs its float QDQ reference:")
    for name, d in r["ort_int8_vs_qdq_reference"].items():
        p(f"  {name}: max |diff| {d['max_abs_diff']:.4g}, mean {d['mean_abs_diff']:.4g}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx")
    ap.add_argument("more", nargs="*", help="with --profile: more ONNX files to profile alongside (an fp32 twin)")
    ap.add_argument("--qparams", help="the parameter JSON written by convert_export / save_checkpoint")
    ap.add_argument("--inputs", nargs="*", help=".npy files, one per model input (default: random)")
    ap.add_argument("--json", help="also write the report as JSON here")
    ap.add_argument("--profile", action="store_true", help="time per op type in onnxruntime (its profiler)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads for --profile")
    ap.add_argument("--runs", type=int, default=10, help="profiled runs for --profile")
    a = ap.parse_args(argv)
    inputs = [np.load(f) for f in a.inputs] if a.inputs else None
    if a.profile:
        profiles = [op_time_profile(f, inputs, a.threads, a.runs) for f in [a.onnx, *a.more]]
        for p in profiles:
            print_profile(p)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(profiles, f, indent=1)
        return 0
    if a.more:
        ap.error("more than one ONNX file is for --profile")
    r = inspect(a.onnx, a.qparams, inputs)
    print_report(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 1 if r.get("json_mismatches") else 0


if __name__ == "__main__":
    sys.exit(main())
