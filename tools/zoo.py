#!/usr/bin/env python3
"""Sweep a list of architectures through prepare -> calibrate -> convert_export -> onnxruntime.

    python tools/zoo.py                               # every model of tools/zoo_models.txt
    python tools/zoo.py --models resnet18 tv:googlenet --out checkpoint/zoo_small
    python tools/zoo.py --resume                      # skip the models already in results.jsonl
    python3 -m nox -s zoo [-- flags]                  # the same, in the shared environment

A name is a timm model (``timm.create_model(name)``, random weights, its default input size) or
``tv:<name>`` for a torchvision one (224x224, 299x299 for inception_v3). Each model runs in its own
process with a time limit (``--timeout``; the whole process group is killed when it runs out), the way
a user would: ``prepare_by_platform(model, BackendType.TSQAT)``, calibration on 4 batches of 2 random
images, ``convert_export`` (torch's current exporter first), then onnxruntime on the file.

One JSON line per model goes to ``<out>/results.jsonl`` as soon as it is done (``--resume`` goes on from
there), and the markdown table to ``<out>/zoo.md``. Its columns:

    stage        the last stage reached: build, trace (prepare_by_platform), calibrate, export, onnxruntime
    exporter     the torch.onnx exporter that wrote the file (dynamo, or legacy after a logged fallback)
    int frac     integer conv / gemm / matmul kernels over all conv / gemm / matmul in onnxruntime's graph
    float ops    compute ops onnxruntime runs in float (BatchNormalization counted on its own)
    steps        max |ORT - PyTorch| of the output in output quantization steps
    s            wall seconds of the model's process
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ROOT / "tools" / "zoo_models.txt"
STAGES = ("build", "trace", "calibrate", "export", "onnxruntime")
# ops that move, reshape or (de)quantize data: not float compute left behind by the quantization
_DATA_MOVEMENT = frozenset({
    "QuantizeLinear", "DequantizeLinear", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat",
    "Split", "Slice", "Gather", "Shape", "Constant", "Identity", "Pad", "Expand", "Tile", "MaxPool", "Cast",
    "DynamicQuantizeLinear", "Resize", "DepthToSpace", "SpaceToDepth", "ConstantOfShape", "Range", "GatherND",
    "ScatterND", "Where", "Equal", "Less", "Greater", "Not", "And", "Or", "ReduceMax", "ArgMax", "NhwcMaxPool",
})
_FLOAT_MATMULS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")


def read_model_list(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def build_model(name: str):
    """(model, input shape) for a list entry."""
    import torch
    if name.startswith("tv:"):
        import torchvision
        arch = name[3:]
        kwargs = {"aux_logits": False, "init_weights": False} if arch in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
        size = 299 if arch == "inception_v3" else 224
        return model.eval(), (3, size, size)
    import timm
    model = timm.create_model(name, pretrained=False)
    shape = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    torch.manual_seed(0)
    return model.eval(), shape


def float_op_counts(path: str) -> Counter:
    """Op types of onnxruntime's optimised graph that still compute in float."""
    from ts_qat_pytorch.onnx.verify import INTEGER_KERNELS, optimized_op_counts
    return Counter({op: n for op, n in optimized_op_counts(path).items()
                    if op not in INTEGER_KERNELS and op not in _DATA_MOVEMENT})


def run_one(name: str, workdir: str) -> dict:
    """Take one model as far as it goes; the record says where it stopped and why."""
    import torch
    from ts_qat_pytorch import BackendType, convert_export, prepare_by_platform
    from ts_qat_pytorch.utils.state import enable_calibration, enable_quantization

    torch.manual_seed(0)
    record: dict = {"model": name, "stage": None, "error": None}
    start = time.perf_counter()
    try:
        model, shape = build_model(name)
        record["stage"] = "build"
        record["input"] = list(shape)
        gm = prepare_by_platform(model, BackendType.TSQAT)
        record["stage"] = "trace"
        gm.eval()
        enable_calibration(gm)
        with torch.no_grad():
            for _ in range(4):
                gm(torch.randn(2, *shape))
        enable_quantization(gm)
        record["stage"] = "calibrate"
        path = os.path.join(workdir, "model.onnx")
        result = convert_export(gm, torch.randn(1, *shape), path)
        record["stage"] = "export"
        record["exporter"] = result.exporter
        record["float_batch_norms"] = result.float_batch_norms  # named, with the reason, by the verification
        record["max_abs_diff"] = result.max_abs_diff
        record["steps"] = [d / s if s else None for d, s in zip(result.max_abs_diff, result.output_scale)]
        ints = sum(result.integer_kernels.get(k, 0) for k in _integer_matmuls())
        floats = float_op_counts(path)
        float_mm = sum(floats.get(k, 0) for k in _FLOAT_MATMULS)
        record.update(integer_kernels=result.integer_kernels, float_ops=dict(sorted(floats.items())),
                      integer_fraction=round(ints / (ints + float_mm), 4) if ints + float_mm else None,
                      batch_norms=floats.get("BatchNormalization", 0), file_mb=round(os.path.getsize(path) / 2**20, 2))
        record["stage"] = "onnxruntime"
    except Exception as exc:  # noqa: BLE001 - the record carries the failure
        first = str(exc).strip().splitlines()
        record["error"] = f"{type(exc).__name__}: {first[0][:400] if first else ''}"
        if len(first) > 1:
            record["error_detail"] = "\n".join(first[1:12])[:2000]
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def _integer_matmuls():
    from ts_qat_pytorch.onnx.verify import INTEGER_MATMUL_KERNELS
    return INTEGER_MATMUL_KERNELS


def run_isolated(name: str, timeout: float, threads: int) -> dict:
    """``name`` in a child process of its own session; on timeout the whole group is killed."""
    with tempfile.TemporaryDirectory(prefix="zoo_") as work:
        out = os.path.join(work, "record.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-out", out,
               "--threads", str(threads)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "core"), os.environ.get("PYTHONPATH", "")])}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"model": name, "stage": None, "error": f"timeout after {timeout:.0f} s",
                    "seconds": round(time.perf_counter() - start, 1)}
        if not os.path.exists(out):
            tail = "\n".join(log.strip().splitlines()[-8:])
            return {"model": name, "stage": None, "error": f"worker exited with {proc.returncode}",
                    "error_detail": tail, "seconds": round(time.perf_counter() - start, 1)}
        record = json.loads(Path(out).read_text())
        record["seconds"] = round(time.perf_counter() - start, 1)
        warnings = [ln for ln in log.splitlines() if "WARNING" in ln or "falling back" in ln]
        if warnings:
            record["warnings"] = warnings[:20]
        return record


def _steps(r: dict) -> float | None:
    vals = [s for s in r.get("steps") or [] if s is not None]
    return max(vals) if vals else None


def markdown_table(records: list[dict]) -> str:
    rows = ["| model | stage | exporter | int frac | float ops left | BN | steps | s |",
            "|---|---|---|---|---|---|---|---|"]
    for r in records:
        floats = r.get("float_ops") or {}
        other = ", ".join(f"{k} {v}" for k, v in floats.items() if k != "BatchNormalization") or "-"
        frac = r.get("integer_fraction")
        steps = _steps(r)
        stage = r.get("stage") or "-"
        if r.get("error"):
            stage = f"{stage} ✗ {r['error'][:90]}"
        rows.append(f"| {r['model']} | {stage} | {r.get('exporter', '-')} | "
                    f"{'-' if frac is None else f'{frac:.2f}'} | {other if r.get('float_ops') is not None else '-'} | "
                    f"{_bn_cell(r)} | {'-' if steps is None else f'{steps:.1f}'} | {r.get('seconds', '-')} |")
    return "\n".join(rows)


def _bn_cell(r: dict) -> str:
    """Float BatchNormalization nodes in onnxruntime's graph; "named" when the export's verification named as many
    unfoldable BatchNorm layers with their reason."""
    n = r.get("batch_norms")
    if n is None:
        return "-"
    named = len(r.get("float_batch_norms") or {})
    return f"{n} (named)" if n and named >= n else str(n)


def summary(records: list[dict]) -> str:
    done = [r for r in records if r.get("stage") == "onnxruntime"]
    legacy = [r["model"] for r in done if r.get("exporter") == "legacy"]
    with_bn = [r["model"] for r in done if r.get("batch_norms") and len(r.get("float_batch_norms") or {}) < r["batch_norms"]]
    named_bn = [r["model"] for r in done if r.get("batch_norms") and r["model"] not in with_bn]
    not_int = [r["model"] for r in done if (r.get("integer_fraction") or 0) < 1.0]
    steps = [s for s in (_steps(r) for r in done) if s is not None]
    lines = [f"{len(done)} of {len(records)} reach onnxruntime with integer kernels",
             f"{len(legacy)} need the legacy exporter" + (f": {', '.join(legacy)}" if legacy else ""),
             f"{len(with_bn)} keep float BatchNormalization the verification does not name"
             + (f": {', '.join(with_bn)}" if with_bn else ""),
             f"{len(named_bn)} keep BatchNorms the verification names as unfoldable (pre-activation)"
             + (f": {', '.join(named_bn)}" if named_bn else ""),
             f"integer fraction below 1.00: " + (", ".join(f"{r['model']} {r['integer_fraction']}" for r in done
                                                          if r["model"] in not_int) or "none"),
             f"median ORT-vs-PyTorch agreement: {statistics.median(steps):.2f} output steps" if steps else "",
             f"total {sum(r.get('seconds', 0) for r in records) / 60:.1f} min of model processes"]
    return "\n".join(line for line in lines if line)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", nargs="+", help="model names (default: the list in --model-list)")
    p.add_argument("--model-list", type=Path, default=DEFAULT_MODELS, help="a file with one name per line")
    p.add_argument("--out", type=Path, default=ROOT / "checkpoint" / "zoo", help="results.jsonl and zoo.md go here")
    p.add_argument("--resume", action="store_true", help="skip models already in <out>/results.jsonl")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model before its process is killed")
    p.add_argument("--threads", type=int, default=2, help="torch / onnxruntime threads per model")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        import torch
        torch.set_num_threads(args.threads)
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        record = run_one(args.worker, os.path.dirname(os.path.abspath(args.worker_out)))
        Path(args.worker_out).write_text(json.dumps(record))
        return 0

    names = args.models or read_model_list(args.model_list)
    if not names:
        p.error(f"no models: {args.model_list} is empty and --models was not given")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done: dict[str, dict] = {}
    if args.resume and results.exists():
        for line in results.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["model"]] = r
    elif results.exists():
        results.unlink()
    todo = [n for n in names if n not in done]
    print(f"zoo: {len(names)} models, {len(names) - len(todo)} already done, results in {results}", flush=True)
    for i, name in enumerate(todo, 1):
        record = run_isolated(name, args.timeout, args.threads)
        done[name] = record
        with open(results, "a") as f:  # one complete line per model: a killed sweep loses at most the current one
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        status = record.get("stage") if not record.get("error") else f"failed after {record.get('stage')}: {record['error'][:120]}"
        print(f"[{i}/{len(todo)}] {name}: {status} ({record.get('exporter', '-')}, int frac "
              f"{record.get('integer_fraction', '-')}, BN {record.get('batch_norms', '-')}, {record['seconds']} s)",
              flush=True)
    records = [done[n] for n in names if n in done]
    table = markdown_table(records) + "\n\n" + summary(records) + "\n"
    tmp = args.out / "zoo.md.partial"
    tmp.write_text(table)
    os.replace(tmp, args.out / "zoo.md")
    print(table)
    failed = [r for r in records if r.get("stage") != "onnxruntime"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "core"))
    sys.exit(main())
