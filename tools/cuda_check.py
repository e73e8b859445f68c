#!/usr/bin/env python3
"""CUDA checks of the core, for a machine with a GPU (CI has none; this is run by hand where one exists).

1. Every fake quantizer (fixed, LSQ, LSQ+, PACT, DoReFa; per tensor and per channel; 8 and 4 bits) gives the
   same forward values and the same gradients on CUDA as on the CPU.
2. A prepared mobilenet_v2 (TSQAT) calibrated on the CPU and moved to CUDA predicts what it predicts on the CPU.
3. QAT steps on CUDA under AMP (float16 with GradScaler, and bfloat16) lower the loss, and every quantizer
   parameter stays float32 and finite.
4. The CUDA-trained model's QAT checkpoint loads on the CPU and gives the same outputs; its QDQ ONNX export runs in
   onnxruntime and agrees with the fake-quant model.

Prints one line per check and a summary, writes JSON (--out), exits 1 if a check fails.

    python tools/cuda_check.py [--out runs/cuda_check.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from ts_qat_pytorch.convert_export import convert_export
from ts_qat_pytorch.fake_quantize import FAKE_QUANTIZERS
from ts_qat_pytorch.onnx.verify import ort_session
from ts_qat_pytorch.prepare_by_platform import prepare_by_platform
from ts_qat_pytorch.scheme import QuantScheme
from ts_qat_pytorch.utils.state import enable_calibration, enable_quantization
from ts_qat_pytorch.utils.utils import load_qat_checkpoint, save_qat_checkpoint

RESULTS: list[dict] = []
DEV = "cuda"  # --dry-run-on-cpu: the same code against the CPU (a rehearsal where no GPU exists)


def check(name: str, ok: bool, **detail) -> bool:
    RESULTS.append({"check": name, "ok": bool(ok), **detail})
    shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in detail.items())
    print(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f": {shown}" if shown else ""), flush=True)
    return ok


def fake_quant_parity() -> None:
    g = torch.Generator().manual_seed(0)
    for fq_name in ("FixedFakeQuantize", "LearnableFakeQuantize", "LSQPlusFakeQuantize", "PACTFakeQuantize",
                    "DoReFaFakeQuantize"):
        cls = FAKE_QUANTIZERS[fq_name]
        for bit in (8, 4):
            for per_channel in (False, True):
                if per_channel and fq_name == "PACTFakeQuantize":
                    continue  # PACT clips activations: per tensor only
                scheme = QuantScheme(bit=bit, symmetry=per_channel, per_channel=per_channel, ch_axis=0)
                kwargs = {"channels": 16} if per_channel and fq_name in ("LearnableFakeQuantize",
                                                                          "LSQPlusFakeQuantize") else {}
                cpu = cls(scheme, **kwargs)
                if per_channel:
                    cpu.is_weight = True
                x = torch.randn(16, 8, 5, 5, generator=g) * 2 + (0 if per_channel else 1)
                cpu(x)  # observe
                cpu.disable_observer()
                gpu = copy.deepcopy(cpu).to(DEV)
                xc, xg = x.clone().requires_grad_(), x.to(DEV).requires_grad_()
                yc, yg = cpu(xc), gpu(xg)
                (yc * torch.linspace(-1, 1, yc.numel()).view_as(yc)).sum().backward()
                (yg * torch.linspace(-1, 1, yg.numel(), device=DEV).view_as(yg)).sum().backward()
                step = float(torch.as_tensor(cpu.qparams()[0]).min())
                diff = (yc - yg.cpu()).abs()
                off = float((diff > 1e-4 * step + 1e-6).float().mean())  # values that rounded the other way
                gx = float((xc.grad - xg.grad.cpu()).abs().max())
                pgrads = [(n, p.grad, dict(gpu.named_parameters())[n].grad) for n, p in cpu.named_parameters()
                          if p.grad is not None]
                prel = max([float((a - b.cpu()).abs().max() / (a.abs().max() + 1e-12)) for _, a, b in pgrads],
                           default=0.0)
                check(f"fake quant parity {fq_name} {bit}-bit {'per-channel' if per_channel else 'per-tensor'}",
                      off <= 1e-3 and float(diff.max()) <= step * 1.0001 and gx <= 1e-5 and prel <= 1e-3,
                      rounded_differently=off, max_abs_diff=float(diff.max()), grad_x_diff=gx, param_grad_rel=prel)


def model_checks(out_dir: str) -> None:
    torch.manual_seed(0)
    float_model = torchvision.models.mobilenet_v2(num_classes=10)
    x = torch.randn(32, 3, 64, 64)
    for m in float_model.modules():  # BatchNorm statistics of this data, so activations and logits are not ~0
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        float_model.train()(x)
    float_model.eval()
    q = prepare_by_platform(float_model, "TSQAT").eval()
    enable_calibration(q)
    with torch.no_grad():
        q(x)
    enable_quantization(q)
    qc = copy.deepcopy(q).to(DEV)
    with torch.no_grad():
        a, b = q(x), qc(x.to(DEV)).cpu()
    cos = float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    agree = float((a.argmax(1) == b.argmax(1)).float().mean())
    check("prepared mobilenet_v2: CUDA vs CPU outputs", cos >= 0.999 and agree >= 0.96, cosine=cos,
          top1_agreement=agree)

    y = torch.randint(0, 10, (32,))
    for dtype in (torch.float16, torch.bfloat16):
        m = copy.deepcopy(qc).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
        scaler = torch.amp.GradScaler(DEV, enabled=dtype is torch.float16)
        xs, ys = x.to(DEV), y.to(DEV)
        losses = []
        t0 = time.perf_counter()
        for _ in range(60):
            with torch.autocast(DEV, dtype=dtype):
                loss = F.cross_entropy(m(xs), ys)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss))
        if DEV == "cuda":
            torch.cuda.synchronize()
        qparams = [(n, p) for n, p in m.named_parameters() if "fake_quant" in n or "post_act" in n]
        fp32 = all(p.dtype == torch.float32 for _, p in qparams)
        finite = all(bool(torch.isfinite(p).all()) for p in m.parameters())
        check(f"AMP {str(dtype).split('.')[-1]} QAT steps on CUDA", losses[-1] < 0.5 * losses[0] and fp32 and finite,
              first_loss=losses[0], last_loss=losses[-1], quantizer_params=len(qparams),
              quantizer_params_fp32=fp32, finite=finite, seconds=time.perf_counter() - t0)
        if dtype is torch.float16:
            trained = m

    trained.eval()
    ck = os.path.join(out_dir, "cuda_qat_checkpoint.pth")
    save_qat_checkpoint(ck, trained, epoch=1)
    cpu_model = prepare_by_platform(float_model, "TSQAT").eval()
    load_qat_checkpoint(ck, cpu_model)
    with torch.no_grad():
        a, b = trained(x.to(DEV)).float().cpu(), cpu_model(x)
    cos = float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    check("QAT checkpoint saved on CUDA loads on the CPU", cos >= 0.9999, cosine=cos)

    onnx_path = os.path.join(out_dir, "cuda_trained.onnx")
    r = convert_export(copy.deepcopy(trained).cpu(), x[:1], onnx_path, batch_size=8)
    sess = ort_session(onnx_path)
    ort = sess.run(None, {r.input_names[0]: x[:8].numpy()})[0]
    with torch.no_grad():
        ref = cpu_model(x[:8]).numpy()
    scale = r.output_scales[0] if getattr(r, "output_scales", None) else None
    diff = float(np.abs(ort - ref).max())
    agree = float((ort.argmax(1) == ref.argmax(1)).mean())
    check("export of the CUDA-trained model runs in onnxruntime", agree == 1.0 and diff <= 0.5,
          max_abs_diff=diff, top1_agreement=agree, output_scale=scale, integer_kernels=str(r.integer_kernels))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/cuda_check.json")
    p.add_argument("--dry-run-on-cpu", action="store_true", help="run every check with the CPU standing in for CUDA")
    a = p.parse_args(argv)
    global DEV
    if a.dry_run_on_cpu:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (run this on a machine with a GPU)")
        return 2
    # TF32 (on by default for cuDNN convolutions on Ampere and later) rounds conv inputs to 10-bit mantissas: enough
    # to move values across fake-quant rounding boundaries, so a random network's outputs drift from the CPU's.
    # The parity checks compare arithmetic, so they run in full float32; training may use TF32.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    info = {"torch": torch.__version__, "cudnn_tf32_default": tf32, "device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"}
    print(f"torch {info['torch']} on {info['device']}", flush=True)
    fake_quant_parity()
    with tempfile.TemporaryDirectory() as d:
        model_checks(d)
    failed = [r["check"] for r in RESULTS if not r["ok"]]
    print(f"\n{len(RESULTS) - len(failed)} of {len(RESULTS)} CUDA checks passed" +
          (f"; failed: {failed}" if failed else ""))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({**info, "checks": RESULTS}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
