#!/usr/bin/env python3
"""Core benchmark: QAT vs float training step, ORT int8 vs fp32 latency, peak memory of a QAT step.

Training steps, measured interleaved in one run (each kind takes its turn in every round, so machine noise
hits all alike), median of the rounds, ratio to the float step:

    float        the float model
    torch.ao     torch.ao's prepare_qat_fx (x86 qconfig: its fused observer + fake-quant kernels), as a reference
    lsq          this project, TSQAT backend (LSQ, the default)
    lsq_eager    the same on torch's own fake-quant kernels (TS_QAT_FAST_FQ=0: the numerics reference)
    fixed        this project, TSQAT with fixed (observer-driven) quantizers

onnxruntime latency: the fp32 file, this project's int8 files (TSQAT and ONNXRuntime backends) and
onnxruntime's own quantize_static file (QDQ, per channel, reduce_range) as a reference, taking turns.
torch.ao and onnxruntime.quantization are references here only; the library never uses them.
Prints one table and writes JSON (--out, default runs/bench_core.json). On a machine with CUDA, the
training-step part also runs on the GPU. ``--profile`` prints torch.profiler's ops by self time of one
float and one QAT step.

    python tools/bench_core.py [--steps 8] [--models resnet18 mobilenet_v2] [--out runs/bench_core.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
import torchvision

from ts_qat_pytorch.convert_export import convert_export
from ts_qat_pytorch.onnx.verify import cpu_has_vnni, interleaved_times, ort_session
from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
from ts_qat_pytorch.utils.state import enable_calibration, enable_quantization
from ts_qat_pytorch.utils.utils import atomic_write_bytes


KINDS = ("float", "torch.ao", "lsq", "lsq_eager", "fixed")
_FIXED = {"extra_qconfig_dict": {"w_fakequantize": "FixedFakeQuantize", "a_fakequantize": "FixedFakeQuantize"}}


def build(arch: str, kind: str | bool, device: str, batch: int, res: int, classes: int = 1000):
    """A model of one kind (KINDS; True / False mean lsq / float), an SGD optimizer and one batch."""
    kind = {True: "lsq", False: "float"}.get(kind, kind)
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=classes).to(device)
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    if kind == "torch.ao":
        with warnings.catch_warnings():  # deprecated in torch; a reference only
            warnings.simplefilter("ignore")
            from torch.ao.quantization import get_default_qat_qconfig_mapping
            from torch.ao.quantization.quantize_fx import prepare_qat_fx
            model.train()
            model = prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (x,)).to(device)
    elif kind in ("lsq", "lsq_eager", "fixed"):
        model = prepare_by_platform(model, BackendType.TSQAT, _FIXED if kind == "fixed" else None).to(device)
        model.eval()
        enable_calibration(model)
        with torch.no_grad():
            model(x)
        enable_quantization(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt, x, y


@contextlib.contextmanager
def kernels_for(kind: str):
    """lsq_eager: this project's quantizers on torch's kernels (the fused CPU kernels off)."""
    old = os.environ.get("TS_QAT_FAST_FQ")
    if kind == "lsq_eager":
        os.environ["TS_QAT_FAST_FQ"] = "0"
    try:
        yield
    finally:
        if kind == "lsq_eager":
            if old is None:
                os.environ.pop("TS_QAT_FAST_FQ", None)
            else:
                os.environ["TS_QAT_FAST_FQ"] = old


def step(model, opt, x, y, amp: bool = False):
    with torch.autocast(x.device.type, enabled=amp, dtype=torch.bfloat16 if x.device.type == "cpu" else torch.float16):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def time_steps(arch, device, steps, batch, res, amp=False, kinds=KINDS):
    kinds = [k for k in kinds if not (k == "lsq_eager" and device != "cpu")]  # the fused kernels are CPU-only
    runs = {k: build(arch, k, device, batch, res) for k in kinds}
    times = {k: [] for k in kinds}
    for k in runs:  # warm-up (also compiles the fused kernels once)
        with kernels_for(k):
            for _ in range(3 if device == "cuda" else 1):
                step(*runs[k], amp=amp)
    for _ in range(steps):
        for k in kinds:
            with kernels_for(k):
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                step(*runs[k], amp=amp)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {f"{k}_step_s": v for k, v in med.items()}
    out.update({f"{k}_ratio": v / med["float"] for k, v in med.items() if k != "float"})
    # the names earlier runs' JSON used
    out.update(float_step_s=med["float"], qat_step_s=med["lsq"], ratio=med["lsq"] / med["float"])
    return out


def profile_steps(arch, batch, res, rows=15):
    """torch.profiler's ops by self time: one float, one eager-kernel QAT and one QAT step."""
    from torch.profiler import ProfilerActivity, profile
    for kind in ("float", "lsq_eager", "lsq"):
        model, opt, x, y = build(arch, kind, "cpu", batch, res)
        with kernels_for(kind):
            step(model, opt, x, y)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(model, opt, x, y)
        print(f"\n[profile] {arch} {kind}: one train step (batch {batch}, {res}x{res}), ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(arch, kind, batch, res):
    """Run in a child process: peak resident memory added by training steps."""
    torch.set_num_threads(int(os.environ.get("TS_QAT_BENCH_THREADS", "0")) or torch.get_num_threads())
    model, opt, x, y = build(arch, kind, "cpu", batch, res)
    before = _rss_bytes()
    for _ in range(3):
        step(model, opt, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"delta_bytes": peak - before}))


def peak_memory(arch, batch, res):
    out = {}
    for kind in ("float", "lsq"):
        r = subprocess.run([sys.executable, __file__, "--memory-worker", arch, kind, str(batch), str(res)],
                           capture_output=True, text=True, check=True)
        out[kind] = json.loads(r.stdout.strip().splitlines()[-1])["delta_bytes"]
    return {"float_step_mb": out["float"] / 2**20, "qat_step_mb": out["lsq"] / 2**20,
            "ratio": out["lsq"] / max(out["float"], 1)}


def _ort_quantize_static(fp32: str, out: str, x: torch.Tensor) -> None:
    """onnxruntime's own post-training QDQ file of the same float model (reference only)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Reader(CalibrationDataReader):
        def __init__(self, name):
            self.batches = iter([{name: x.numpy()}])

        def get_next(self):
            return next(self.batches, None)

    name = ort_session(fp32).get_inputs()[0].name
    quantize_static(fp32, out, _Reader(name), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def ort_latency(arch, batch, res, reps):
    """fp32, this project's TSQAT and ONNXRuntime-backend files, and onnxruntime's quantize_static file, taking
    turns in one process; median ms of each."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    x = torch.randn(batch, 3, res, res)
    threads = int(os.environ.get("TS_QAT_BENCH_THREADS", "0")) or None
    kernels = {}
    with tempfile.TemporaryDirectory() as d:
        files = {"fp32": os.path.join(d, "fp32.onnx")}
        torch.onnx.export(model, (x,), files["fp32"], dynamo=True, external_data=False, opset_version=18, verbose=False)
        for backend in ("TSQAT", "ONNXRuntime"):
            q = prepare_by_platform(model, backend)
            q.eval()
            enable_calibration(q)
            with torch.no_grad():
                q(x)
            enable_quantization(q)
            files[backend] = os.path.join(d, f"{backend}.onnx")
            kernels[backend] = convert_export(q, x, files[backend], batch_size=batch).integer_kernels
        files["ort_quantize_static"] = os.path.join(d, "ort_qs.onnx")
        _ort_quantize_static(files["fp32"], files["ort_quantize_static"], x)
        sizes = {k: os.path.getsize(f) for k, f in files.items()}
        sess = {k: ort_session(f, threads=threads) for k, f in files.items()}
        feeds = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sess.items()}
        times = interleaved_times(sess, feeds, reps)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"ms": ms, "speedup": {k: ms["fp32"] / v for k, v in ms.items() if k != "fp32"},
            "integer_kernels": kernels, "file_bytes": sizes, "cpu_has_vnni": cpu_has_vnni()}


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
    p.add_argument("--ort-only", action="store_true", help="only the onnxruntime latencies and file sizes")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's ops by self time of one float, "
                   "one eager-kernel QAT and one QAT train step per model")
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
        if a.profile:
            profile_steps(arch, a.batch, a.res)
        for dev in ([] if a.ort_only else devices):
            for amp in ([False, True] if a.amp else [False]):
                tag = f"{dev}, AMP" if amp else dev
                print(f"[bench] {arch}: train steps on {tag} (batch {a.batch}, {a.res}x{a.res}) ...", flush=True)
                res[f"train_{dev}{'_amp' if amp else ''}"] = t = time_steps(arch, dev, a.steps, a.batch, a.res, amp=amp)
                rows.append((arch, f"float train step ({tag})", f"{t['float_step_s']*1e3:.1f} ms", "1.00x", ""))
                for k in KINDS[1:]:
                    if f"{k}_step_s" in t:
                        target = {"lsq": f"<= 1.3, < torch.ao ({t['torch.ao_ratio']:.2f})"}.get(k, "")
                        rows.append((arch, f"  {k} QAT step ({tag})", f"{t[k + '_step_s']*1e3:.1f} ms",
                                     f"{t[k + '_ratio']:.2f}x", target))
        if a.train_only:
            continue
        if not a.ort_only:
            print(f"[bench] {arch}: peak memory ...", flush=True)
            res["memory_cpu"] = m = peak_memory(arch, a.batch, a.res)
            rows.append((arch, "QAT/float step peak memory", f"{m['qat_step_mb']:.0f} / {m['float_step_mb']:.0f} MB",
                         f"{m['ratio']:.2f}x", "<= 1.3"))
        print(f"[bench] {arch}: onnxruntime latency ...", flush=True)
        res["ort"] = o = ort_latency(arch, a.ort_batch, a.ort_res, a.ort_reps)
        rows.append((arch, f"ORT fp32 (b{a.ort_batch}, {a.ort_res}px)", f"{o['ms']['fp32']:.1f} ms", "1.00x", ""))
        for k, sp in o["speedup"].items():
            label = {"TSQAT": "this project, TSQAT", "ONNXRuntime": "this project, ONNXRuntime backend",
                     "ort_quantize_static": "onnxruntime quantize_static (reference)"}[k]
            target = f">= quantize_static ({o['speedup']['ort_quantize_static']:.2f}x)" if k == "TSQAT" else ""
            rows.append((arch, f"  ORT int8: {label}", f"{o['ms'][k]:.1f} ms", f"{sp:.2f}x faster", target))
        qs = o["file_bytes"]["ort_quantize_static"]
        for k, b in o["file_bytes"].items():
            rows.append((arch, f"  file: {k}", f"{b / 1e6:.2f} MB", f"{b / qs:.2f}x quantize_static",
                         "<= 1.1" if k == "TSQAT" else ""))
        vnni = {True: "with VNNI", False: "WITHOUT VNNI (int8 kernels may saturate)", None: "not x86"}[o["cpu_has_vnni"]]
        rows.append((arch, "  CPU", vnni, "", ""))
    w = [max(len(str(r[i])) for r in rows + [("model", "measure", "value", "ratio", "target")]) for i in range(5)]
    header = ("model", "measure", "value", "ratio", "target")
    print("\n" + "  ".join(h.ljust(w[i]) for i, h in enumerate(header)))
    for r in rows:
        print("  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))
    atomic_write_bytes(a.out, json.dumps(results, indent=1).encode())
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
