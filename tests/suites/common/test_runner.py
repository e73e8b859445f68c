"""The runner (suites/common/runner.py) with a tiny suite, and its device selection without a GPU."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from suites.common import runner
from suites.common.devices import parse_devices
from suites.common.metrics import load_metrics
from suites.common.suite import Data, Metric, Suite, SuiteError


class TinySuite(Suite):
    """A two-class problem on random 16x16 images: the whole contract in a few lines."""

    name = "tiny"
    metric = Metric("top1", "higher")
    recipes = {"embedded": dict(epochs=2, batch_size=16, lr=1e-3, optim="adam", calib_batches=1, print_freq=1,
                                distill_method="kd"), "general": {}}

    def datasets(self, args) -> Data:
        x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        ds = torch.utils.data.TensorDataset(x, (x.mean((1, 2, 3)) > 0).long())
        return Data(ds, ds, ds, name="random")

    def build_model(self, args, arch, pretrained):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 2))

    def dummy_input(self, args):
        return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def evaluate(self, model, loader, args, prefix):
        model.eval()
        with torch.no_grad():
            hits = [(model(x.to(args.device)).argmax(1).cpu() == y) for x, y in loader]
        return {"top1": round(100.0 * float(torch.cat(hits).float().mean()), 3)}

    def evaluate_onnx(self, session, loader, args, prefix):
        name = session.get_inputs()[0].name
        hits = [int(session.run(None, {name: x[i:i + 1].numpy()})[0].argmax()) == int(y[i])
                for x, y in loader for i in range(len(y))]
        return {"top1": round(100.0 * float(np.mean(hits)), 3)}


def test_the_whole_pipeline_of_a_tiny_suite(tmp_path, capsys):
    out = tmp_path / "out"
    assert runner.main(TinySuite(), ["--output-dir", str(out), "--device", "cpu", "--print-freq", "1"]) == 0
    m = load_metrics(out / "tiny" / "tiny_metrics.json")
    assert (m["suite"], m["arch"], m["backend"], m["metric"]) == ("tiny", "tiny", "TSQAT", "top1")
    assert all(m[k] is not None for k in ("qat", "ort", "ort_minus_qat", "quantized_layers", "integer_kernels_total"))
    assert m["run"]["qat_steps"] == 2 * 4 and m["run"]["best"] is not None and m["run"]["embedded"] is True
    assert set(m["times_s"]) >= {"calibration", "qat_train", "qat_eval", "export", "ort_eval", "total"}
    for name in ("checkpoint.pth", "model_best.pth", "checkpoint_float.pth", "qparams.json",
                 "onnx_quantization.onnx", "bestonnx_quantization.onnx"):
        assert (out / "tiny" / f"tiny_{name}").is_file(), name
    ck = torch.load(out / "tiny" / "tiny_checkpoint.pth", weights_only=True)
    assert ck["epoch"] == 2 and ck["metric"] == "top1" and ck["best_metric"] == m["run"]["best"]
    log = capsys.readouterr().out
    assert "Epoch: [1][3/4]" in log and "=> ORT int8 top1" in log and "=> metrics written to" in log
    # -e --resume with the runner's analysis stages: per-layer profile, one-layer-at-a-time sensitivity
    assert runner.main(TinySuite(), ["--output-dir", str(out), "--device", "cpu", "-e", "--no-export", "--profile",
                                     "--sensitivity", "--resume", str(out / "tiny" / "tiny_checkpoint.pth"),
                                     "--metrics", str(out / "analysis.json")]) == 0
    a = load_metrics(out / "analysis.json")
    assert a["qat"] == m["qat"] and a["run"]["profile"]["layers"] > 0
    assert isinstance(a["run"]["sensitivity"]["exclude_module_name"], list)
    for k in ("profile_csv", "profile_png", "sensitivity", "exclude"):
        assert (out / "tiny" / a["files"][k].split("/")[-1]).is_file(), k
    # a suite metric missing from the evaluation is named
    class Broken(TinySuite):
        def evaluate(self, model, loader, args, prefix):
            return {"accuracy": 1.0}
    with pytest.raises(KeyError, match="not the suite's metric 'top1'"):
        runner.main(Broken(), ["--output-dir", str(tmp_path / "b"), "--device", "cpu", "--no-export"])


def test_qparam_lr_and_warmup_steps_shape_the_qat_optimizer(capsys):
    """--qparam-lr: the quantizers' scales / zero points in their own group at that rate (no weight decay), the
    weights at --lr; --warmup-steps: the LR rises linearly over those steps, then the cosine; bad values are
    errors before any work."""
    from suites.common import cli
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    suite = TinySuite()
    args = cli.resolve(suite, cli.build_parser(suite).parse_args(["--qparam-lr", "2e-5", "--warmup-steps", "4",
                                                                   "--wd", "0.01"]))
    q = prepare_by_platform(suite.build_model(args, "tiny", False).eval(), BackendType.TSQAT)
    opt, sched = runner.make_training(suite, q, 4, args)
    weights, qparams = opt.param_groups
    assert (weights["lr"], qparams["lr"]) == (pytest.approx(1e-3 / 4), pytest.approx(2e-5 / 4))
    assert (weights["weight_decay"], qparams["weight_decay"]) == (0.01, 0.0)
    assert {id(p) for p in qparams["params"]} == {id(q.get_parameter(n)) for n, _ in q.named_parameters()
                                                  if n.endswith(".scale")}
    for _ in range(3):
        opt.step(), sched.step()
    assert weights["lr"] == pytest.approx(1e-3) and qparams["lr"] == pytest.approx(2e-5)
    for _ in range(2):
        opt.step(), sched.step()
    assert weights["lr"] < 1e-3 and qparams["lr"] < 2e-5  # the cosine (over 2 epochs x 4 steps)
    # without the flags: one group at --lr, no warm-up
    args = cli.resolve(suite, cli.build_parser(suite).parse_args([]))
    opt, _ = runner.make_training(suite, q, 4, args)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 1e-3
    for bad, msg in ((["--qparam-lr", "nan"], "--qparam-lr nan must be a finite number > 0"),
                     (["--warmup-steps", "-1"], "--warmup-steps -1 must be >= 0")):
        with pytest.raises(SuiteError, match=re.escape(msg)):
            cli.resolve(suite, cli.build_parser(suite).parse_args(bad))


def test_a_missing_gpu_is_an_error_naming_the_fix(tmp_path, capsys):
    assert runner.main(TinySuite(), ["--output-dir", str(tmp_path), "--device", "7"]) == 2
    err = capsys.readouterr().err
    assert "error: --device 7: GPU 7 is not there" in err and "--device cpu" in err


@pytest.mark.parametrize("device, gpu, visible, want", [
    (None, None, 0, ["cpu"]),
    (None, None, 2, ["cuda:0", "cuda:1"]),       # no device named: every visible GPU
    ("cpu", None, 2, ["cpu"]),
    ("1", None, 2, ["cuda:1"]),
    ("0,1", None, 2, ["cuda:0", "cuda:1"]),
    ("cuda:1", None, 2, ["cuda:1"]),
    ("cuda", None, 3, ["cuda:0", "cuda:1", "cuda:2"]),
    (None, 1, 2, ["cuda:1"]),                    # the manual's --gpu
    ("1", 1, 2, ["cuda:1"]),
])
def test_device_flags(device, gpu, visible, want):
    assert [str(d) for d in parse_devices(device, gpu, visible)] == want


@pytest.mark.parametrize("device, gpu, visible, message", [
    ("0", None, 0, "--device 0: GPU 0 is not there (no CUDA GPU is visible"),
    ("2", None, 2, "--device 2: GPU 2 is not there (2 CUDA GPUs visible"),
    ("0,3", None, 2, "GPU 3 is not there"),
    (None, 4, 1, "--gpu 4: GPU 4 is not there"),
    ("cuda", None, 0, "--device cuda: no CUDA GPU is visible; use --device cpu"),
    ("gpu0", None, 1, "is not understood: give cpu, a GPU index (0)"),
    ("0,0", None, 2, "names a GPU twice"),
    ("0", 1, 2, "--gpu 1 and --device 0 name different devices"),
])
def test_device_errors(device, gpu, visible, message):
    with pytest.raises(SuiteError, match=re.escape(message)):
        parse_devices(device, gpu, visible)
