"""Import an exported QDQ file into a deployment toolchain and compare what it computes with onnxruntime.

    ts-qat-deploy-check model.onnx --target rknn [--platform rk3588] [--inputs x.npz] [--json report.json]
    ts-qat-deploy-check --smoke --target rknn      # a small conv net, prepared, exported and imported

Targets (ts_qat_pytorch.deploy): ``onnxruntime`` (CPU, integer kernels) and ``rknn`` (Rockchip's rknn-toolkit2:
the file imported as a pre-quantized model, ``build(do_quantization=False)``, run in its NPU simulator). rknn-toolkit2
lives in its own environment: ``python3 -m nox -s deploy_check -- model.onnx`` makes it and runs this tool.

For each output: max |target - onnxruntime| as a fraction of the output's range and in output quantization steps
(the scale of the DequantizeLinear that writes it), over --samples random inputs (or --inputs, an .npz keyed by
the file's input names). A suite's whole evaluation set through a target is ``nox -s deploy_check -- <suite>``.
Exit status: 0 when the target imports and runs the file, 1 when it does not, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from ts_qat_pytorch.deploy import TARGETS, DeployError, close_session, open_session


def _inputs(session, npz: str | None, samples: int, seed: int) -> list[dict[str, np.ndarray]]:
    if npz:
        with np.load(npz) as z:
            missing = [i.name for i in session.get_inputs() if i.name not in z.files]
            if missing:
                raise SystemExit(f"error: {npz} lacks the inputs {missing} (it has {z.files})")
            return [{i.name: z[i.name] for i in session.get_inputs()}]
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(samples):
        feed = {}
        for i in session.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
            if "int" in i.type:
                feed[i.name] = rng.integers(0, 2, shape).astype(np.int64 if "int64" in i.type else np.int32)
            else:
                feed[i.name] = rng.standard_normal(shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def _output_scales(path: str) -> dict[str, float]:
    """The quantization step of each output a DequantizeLinear produces (the file's own scale)."""
    import onnx

    from ts_qat_pytorch.onnx.graph import GraphIndex
    G = GraphIndex(onnx.load(path))
    out = {}
    for o in G.g.output:
        n = G.producer.get(o.name)
        scale = G.const(n.input[1]) if n is not None and n.op_type == "DequantizeLinear" else None
        if scale is not None:
            out[o.name] = float(np.max(scale))
    return out


def check(path: str, target: str, platform: str = "rk3588", npz: str | None = None, samples: int = 4,
          seed: int = 0) -> dict:
    """The target's outputs against onnxruntime's on the same inputs: a report dict."""
    ref = open_session(path, "onnxruntime")
    report = {"file": path, "target": target, "platform": platform if target == "rknn" else None,
              "file_bytes": os.path.getsize(path), "outputs": {}}
    try:
        sess = open_session(path, target, platform=platform) if target == "rknn" else open_session(path, target)
    except DeployError as exc:
        report["error"] = str(exc)
        return report
    try:
        report["build_s"] = getattr(sess, "build_s", None)
        scales = _output_scales(path)
        names = [o.name for o in ref.get_outputs()]
        worst = {n: [0.0, 0.0] for n in names}  # max |diff|, output range
        for feed in _inputs(ref, npz, samples, seed):
            for n, a, b in zip(names, sess.run(None, feed), ref.run(None, feed)):
                a, b = np.asarray(a, np.float64).reshape(b.shape), np.asarray(b, np.float64)
                worst[n][0] = max(worst[n][0], float(np.abs(a - b).max()) if b.size else 0.0)
                worst[n][1] = max(worst[n][1], float(np.ptp(b)) if b.size else 0.0)
        for n, (d, r) in worst.items():
            report["outputs"][n] = {"max_abs_diff": d, "output_range": r,
                                    "fraction_of_range": d / r if r else None,
                                    "output_steps": d / scales[n] if scales.get(n) else None}
    finally:
        close_session(sess)
    return report


def smoke_model(out_dir: str) -> str:
    """conv-BN-ReLU x2, a residual add, pooling and a linear layer, prepared (TSQAT), calibrated and exported."""
    import torch
    from torch import nn

    from ts_qat_pytorch.convert_export import convert_export
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    from ts_qat_pytorch.utils.calibrate import calibrate

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            z = torch.relu(self.b2(self.c2(y))) + y
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1))

    torch.manual_seed(0)
    q = prepare_by_platform(Net().eval(), BackendType.TSQAT)
    calibrate(q, [torch.randn(2, 3, 32, 32) for _ in range(4)])
    return convert_export(q, (1, 3, 32, 32), os.path.join(out_dir, "smoke.onnx")).onnx_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("onnx", nargs="?", help="an exported QDQ file (convert_export)")
    p.add_argument("--target", default="rknn", choices=TARGETS)
    p.add_argument("--platform", default="rk3588", help="the NPU rknn builds for (rk3588, rk3576, rk3566 ...)")
    p.add_argument("--inputs", default=None, help=".npz of inputs keyed by the file's input names")
    p.add_argument("--samples", type=int, default=4, help="random input samples (without --inputs)")
    p.add_argument("--max-fraction", type=float, default=None,
                   help="fail (exit 1) when an output differs from onnxruntime by more than this fraction of its range")
    p.add_argument("--smoke", action="store_true", help="check a small conv net exported here instead of a file")
    p.add_argument("--json", default=None, help="write the report here")
    a = p.parse_args(argv)
    if bool(a.onnx) == a.smoke:
        p.error("give an ONNX file or --smoke (one of them)")
    if a.onnx and not os.path.isfile(a.onnx):
        p.error(f"{a.onnx} is not a file")
    with tempfile.TemporaryDirectory() as tmp:
        path = smoke_model(tmp) if a.smoke else a.onnx
        r = check(path, a.target, a.platform, a.inputs, a.samples)
        if a.smoke:
            r["file"] = "smoke (a conv net exported by convert_export)"
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    if "error" in r:
        print(f"error: {r['error']}", file=sys.stderr)
        return 1
    where = f"{r['target']} {r['platform']}" if r["platform"] else r["target"]
    print(f"{r['file']} ({r['file_bytes'] / 1e6:.2f} MB) imported by {where}"
          + (f", built in {r['build_s']:.1f} s" if r.get("build_s") is not None else ""))
    print(f"{'output':<24} {'max |diff|':>12} {'range':>10} {'fraction':>9} {'steps':>7}")
    bad = False
    for n, o in r["outputs"].items():
        frac, steps = o["fraction_of_range"], o["output_steps"]
        print(f"{n:<24} {o['max_abs_diff']:>12.4g} {o['output_range']:>10.4g} "
              f"{'-' if frac is None else f'{frac:.2%}':>9} {'-' if steps is None else f'{steps:.1f}':>7}")
        bad |= a.max_fraction is not None and frac is not None and frac > a.max_fraction
    if bad:
        print(f"error: an output differs from onnxruntime by more than {a.max_fraction:.2%} of its range",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
