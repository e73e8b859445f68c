#!/usr/bin/env python3
"""Core benchmark: QAT vs float training step, ORT int8 vs fp32 latency, peak memory of a QAT step.

Measured interleaved in one run (float and QAT steps alternate, so machine noise hits both alike),
median of the repetitions. Prints one table and writes JSON (--out, default runs/bench_core.json).
On a machine with CUDA, the training-step part also runs on the GPU.

    python tools/bench_core.py [--steps 8] [--models resnet18 mobilenet_v2] [--out runs/bench_core.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from ts_qat_pytorch.convert_export import convert_export
from ts_qat_pytorch.onnx.verify import ort_session
from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
from ts_qat_pytorch.utils.state import enable_calibration, enable_quantization


def build(arch: str, qat: bool, device: str, batch: int, res: int, classes: int = 1000):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=classes).to(device)
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    if qat:
        model = prepare_by_platform(model, BackendType.TSQAT).to(device)
        model.eval()
        enable_calibration(model)
        with torch.no_grad():
            model(x)
        enable_quantization(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt, x, y


def step(model, opt, x, y, amp: bool = False):
    with torch.autocast(x.device.type, enabled=amp, dtype=torch.bfloat16 if x.device.type == "cpu" else torch.float16):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def time_steps(arch, device, steps, batch, res, amp=False):
    runs = {k: build(arch, k == "qat", device, batch, res) for k in ("float", "qat")}
    times = {"float": [], "qat": []}
    for k in runs:  # warm-up
        for _ in range(3 if device == "cuda" else 1):
            step(*runs[k], amp=amp)
    for _ in range(steps):
        for k in ("float", "qat"):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(*runs[k], amp=amp)
            if device == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    f, q = statistics.median(times["float"]), statistics.median(times["qat"])
    return {"float_step_s": f, "qat_step_s": q, "ratio": q / f}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(arch, kind, batch, res):
    """Run in a child process: peak resident memory added by training steps."""
    torch.set_num_threads(int(os.environ.get("TS_QAT_BENCH_THREADS", "0")) or torch.get_num_threads())
    model, opt, x, y = build(arch, kind == "qat", "cpu", batch, res)
    before = _rss_bytes()
    for _ in range(3):
        step(model, opt, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"delta_bytes": peak - before}))


def peak_memory(arch, batch, res):
    out = {}
    for kind in ("float", "qat"):
        r = subprocess.run([sys.executable, __file__, "--memory-worker", arch, kind, str(batch), str(res)],
                           capture_output=True, text=True, check=True)
        out[kind] = json.loads(r.stdout.strip().splitlines()[-1])["delta_bytes"]
    return {"float_step_mb": out["float"] / 2**20, "qat_step_mb": out["qat"] / 2**20,
            "ratio": out["qat"] / max(out["float"], 1)}


def ort_latency(arch, batch, res, reps, backend):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    x = torch.randn(batch, 3, res, res)
    q = prepare_by_platform(model, backend)
    q.eval()
    enable_calibration(q)
    with torch.no_grad():
        q(x)
    enable_quantization(q)
    with tempfile.TemporaryDirectory() as d:
        fp32, int8 = os.path.join(d, "fp32.onnx"), os.path.join(d, "int8.onnx")
        torch.onnx.export(model, (x,), fp32, dynamo=True, external_data=False, opset_version=18, verbose=False)
        r = convert_export(q, x, int8, batch_size=batch)
        threads = int(os.environ.get("TS_QAT_BENCH_THREADS", "0")) or None
        sess = {"fp32": ort_session(fp32, threads=threads), "int8": ort_session(int8, threads=threads)}
        feeds = {"fp32": {sess["fp32"].get_inputs()[0].name: x.numpy()}, "int8": {r.input_names[0]: x.numpy()}}
        for k in sess:
            sess[k].run(None, feeds[k])
        times = {"fp32": [], "int8": []}
        for _ in range(reps):
            for k in ("fp32", "int8"):
                t = time.perf_counter()
                sess[k].run(None, feeds[k])
                times[k].append(time.perf_counter() - t)
    f, i = statistics.median(times["fp32"]), statistics.median(times["int8"])
    return {"fp32_ms": f * 1e3, "int8_ms": i * 1e3, "speedup": f / i, "integer_kernels": r.integer_kernels}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--steps", type=int, default=8, help="timed train steps per model and kind")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--res", type=int, default=112)
    p.add_argument("--ort-batch", type=int, default=8)
    p.add_argument("--ort-res", type=int, default=224)
    p.add_argument("--ort-reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads (default: all cores)")
    p.add_argument("--devices", nargs="+", default=None, help="train-step devices (default: cpu, and cuda if present)")
    p.add_argument("--amp", action="store_true", help="also time train steps under autocast (fp16 CUDA, bf16 CPU)")
    p.add_argument("--train-only", action="store_true", help="only the train-step timings (no memory, no ORT)")
    p.add_argument("--out", default="runs/bench_core.json")
    p.add_argument("--memory-worker", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory_worker:
        arch, kind, b, r = a.memory_worker
        return memory_worker(arch, kind, int(b), int(r))
    threads = a.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    os.environ["TS_QAT_BENCH_THREADS"] = str(threads)
    devices = a.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "models": {}}
    rows = []
    for arch in a.models:
        res = results["models"][arch] = {}
        for dev in devices:
            print(f"[bench] {arch}: train steps on {dev} (batch {a.batch}, {a.res}x{a.res}) ...", flush=True)
            res[f"train_{dev}"] = t = time_steps(arch, dev, a.steps, a.batch, a.res)
            rows.append((arch, f"QAT/float train step ({dev})", f"{t['qat_step_s']*1e3:.1f} / {t['float_step_s']*1e3:.1f} ms",
                         f"{t['ratio']:.2f}x", "<= 1.25"))
            if a.amp:
                res[f"train_{dev}_amp"] = t = time_steps(arch, dev, a.steps, a.batch, a.res, amp=True)
                rows.append((arch, f"QAT/float train step ({dev}, AMP)",
                             f"{t['qat_step_s']*1e3:.1f} / {t['float_step_s']*1e3:.1f} ms", f"{t['ratio']:.2f}x",
                             "<= 1.25"))
        if a.train_only:
            continue
        print(f"[bench] {arch}: peak memory ...", flush=True)
        res["memory_cpu"] = m = peak_memory(arch, a.batch, a.res)
        rows.append((arch, "QAT/float step peak memory", f"{m['qat_step_mb']:.0f} / {m['float_step_mb']:.0f} MB",
                     f"{m['ratio']:.2f}x", "<= 1.5"))
        for backend in ("TSQAT", "ONNXRuntime"):
            print(f"[bench] {arch}: onnxruntime latency, {backend} backend ...", flush=True)
            res[f"ort_{backend}"] = o = ort_latency(arch, a.ort_batch, a.ort_res, a.ort_reps, backend)
            rows.append((arch, f"ORT fp32/int8 latency {backend} (b{a.ort_batch}, {a.ort_res}px)",
                         f"{o['fp32_ms']:.1f} / {o['int8_ms']:.1f} ms", f"{o['speedup']:.2f}x", ">= 2.5"))
    w = [max(len(str(r[i])) for r in rows + [("model", "measure", "value", "ratio", "target")]) for i in range(5)]
    header = ("model", "measure", "value", "ratio", "target")
    print("\n" + "  ".join(h.ljust(w[i]) for i, h in enumerate(header)))
    for r in rows:
        print("  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
