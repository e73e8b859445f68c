"""The runner (suites/common/runner.py) with a tiny suite, and its device selection without a GPU."""
from __future__ import annotations

import os
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

    def datasets(self, cfg) -> Data:
        x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        ds = torch.utils.data.TensorDataset(x, (x.mean((1, 2, 3)) > 0).long())
        return Data(ds, ds, ds, name="random", example=x[:1])

    def build_model(self, cfg, arch, pretrained):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 2))

    def evaluate(self, model, loader, run, prefix):
        model.eval()
        with torch.no_grad():
            hits = [(model(x.to(run.device)).argmax(1).cpu() == y) for x, y in loader]
        return {"top1": round(100.0 * float(torch.cat(hits).float().mean()), 3)}

    def evaluate_onnx(self, session, loader, run, prefix):
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
        def evaluate(self, model, loader, run, prefix):
            return {"accuracy": 1.0}
    with pytest.raises(KeyError, match="not the suite's metric 'top1'"):
        runner.main(Broken(), ["--output-dir", str(tmp_path / "b"), "--device", "cpu", "--no-export"])


def test_a_suite_hears_each_stage_end_and_the_run_end_once(tmp_path):
    """The events: on_stage_end(run, stage, result) after each stage with what the stage made (the data, the float
    model, each evaluation's scores and detail, the calibrated model, each export's result), on_run_end(run) once,
    before the metrics JSON is written (what a suite records there is in the file)."""
    from suites.common.run import Run
    from suites.common.suite import Evaluation
    heard = []

    class Listening(TinySuite):
        def evaluate(self, model, loader, run, prefix):
            return {**super().evaluate(model, loader, run, prefix), "detail": prefix}

        def on_stage_end(self, run, stage, result):
            heard.append((stage, result))

        def on_run_end(self, run):
            assert isinstance(run, Run) and run.metrics["qat"] is not None
            heard.append(("run_end", run))
            run.metrics.extras["heard"] = [s for s, _ in heard]

    out = tmp_path / "out"
    assert runner.main(Listening(), ["--output-dir", str(out), "--device", "cpu", "--epochs", "1"]) == 0
    stages = [s for s, _ in heard]
    assert stages == ["data", "float_model", "float_eval", "teacher", "calibration", "qat_eval", "export",
                      "checkpoint", "ort_eval", "run_end"]
    res = dict(heard)
    assert isinstance(res["data"], Data) and isinstance(res["float_model"], nn.Module)
    assert isinstance(res["float_eval"], Evaluation) and res["float_eval"].detail == "Float"
    assert res["qat_eval"].scores["top1"] == load_metrics(out / "tiny" / "tiny_metrics.json")["qat"]
    assert "detail" not in load_metrics(out / "tiny" / "tiny_metrics.json")["scores"]["qat"]
    assert hasattr(res["calibration"], "graph") and res["export"].onnx_path.endswith("tiny_onnx_quantization.onnx")
    assert load_metrics(out / "tiny" / "tiny_metrics.json")["extras"]["heard"] == stages


def test_the_run_config_is_frozen():
    """Flags and recipe are resolved once: the config refuses changes, a stage's decisions go on the Run."""
    import dataclasses

    from suites.common import cli
    suite = TinySuite()
    cfg = cli.resolve(suite, cli.build_parser(suite).parse_args(["--lr", "0.5"]))
    assert (cfg.lr, cfg.epochs, cfg.arch, cfg.num_classes, cfg.teacher) == (0.5, 2, "tiny", None, "float")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    assert cfg.replace(lr=1.0).lr == 1.0 and cfg.lr == 0.5


def test_each_epoch_leaves_its_results_and_the_metrics(tmp_path):
    """After each epoch: its row in <arch>_results.csv (epoch, losses, metric, lr, seconds), the loss / metric curves
    in <arch>_results.png and the metrics JSON rewritten. A run killed in its second epoch leaves the first epoch's;
    --resume continues the rows."""
    import csv

    class KilledInEpoch2(TinySuite):
        steps = 0

        def loss(self, output, target, teacher_output=None, cfg=None):
            KilledInEpoch2.steps += 1
            if KilledInEpoch2.steps == 6:  # 4 steps an epoch
                raise KeyboardInterrupt
            return super().loss(output, target, teacher_output, cfg)

    out = tmp_path / "out"
    argv = ["--output-dir", str(out), "--device", "cpu", "--no-export"]
    assert runner.main(KilledInEpoch2(), argv) == 130
    m = load_metrics(out / "tiny" / "tiny_metrics.json")
    assert m["qat"] is not None and m["run"]["qat_steps"] == 4
    assert m["files"]["results_csv"] == str(out / "tiny" / "tiny_results.csv")
    rows = list(csv.DictReader(open(out / "tiny" / "tiny_results.csv")))
    assert [r["epoch"] for r in rows] == ["0"] and rows[0]["stage"] == "qat"
    assert set(rows[0]) == {"epoch", "stage", "train_loss", "train_Acc@1", "train_Acc@5", "top1", "lr", "seconds"}
    assert float(rows[0]["top1"]) == m["qat"] and float(rows[0]["lr"]) > 0 and float(rows[0]["seconds"]) > 0
    assert (out / "tiny" / "tiny_results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert runner.main(TinySuite(), argv + ["--resume", str(out / "tiny" / "tiny_checkpoint.pth")]) == 0
    rows = list(csv.DictReader(open(out / "tiny" / "tiny_results.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]


def _help_entries(parser) -> dict[str, str]:
    """{the flags' line: the flag's whole help} of ``parser.format_help()``."""
    entries, flags = {}, None
    for line in parser.format_help().splitlines():
        if re.match(r"^  -", line):
            flags = line.split("  ")[1].strip()
            entries[flags] = line
        elif line.startswith("    ") and flags:
            entries[flags] += " " + line.strip()
        else:
            flags = None
    return entries


def test_help_shows_each_default_once():
    """--help gives each flag's default once: the recipes' values of a recipe-dependent flag (argparse's None is not
    shown beside them), argparse's for a fixed default."""
    from suites.common import cli
    from suites.imagenet.suite import SUITE
    for suite in (TinySuite(), SUITE):
        entries = _help_entries(cli.build_parser(suite))
        for flags, text in entries.items():
            assert "(default: None)" not in text and len(re.findall("default", text, re.I)) <= 1, text
    entries = _help_entries(cli.build_parser(SUITE))
    assert "QAT epochs (default: 10; embedded: 1)" in entries["--epochs N"]
    assert entries["--momentum MOMENTUM"].endswith("SGD momentum (default: 0.9)")


def test_qparam_lr_and_warmup_steps_shape_the_qat_optimizer(capsys):
    """--qparam-lr: the quantizers' scales / zero points in their own group at that rate (no weight decay), the
    weights at --lr; --warmup-steps: the LR rises linearly over those steps, then the cosine; bad values are
    errors before any work."""
    from suites.common import cli
    from suites.common.run import Run
    from suites.common.stages.qat import make_training
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    suite = TinySuite()
    args = cli.resolve(suite, cli.build_parser(suite).parse_args(["--qparam-lr", "2e-5", "--warmup-steps", "4",
                                                                   "--wd", "0.01"]))
    q = prepare_by_platform(suite.build_model(args, "tiny", False).eval(), BackendType.TSQAT)
    opt, sched = make_training(Run(args, suite, torch.device("cpu"), None), suite, q, 4)
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
    opt, _ = make_training(Run(args, suite, torch.device("cpu"), None), suite, q, 4)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 1e-3
    for bad, msg in ((["--qparam-lr", "nan"], "--qparam-lr nan must be a finite number > 0"),
                     (["--warmup-steps", "-1"], "--warmup-steps -1 must be >= 0")):
        with pytest.raises(SuiteError, match=re.escape(msg)):
            cli.resolve(suite, cli.build_parser(suite).parse_args(bad))


def test_a_missing_gpu_is_an_error_naming_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert runner.main(TinySuite(), ["--output-dir", str(tmp_path), "--device", "7"]) == 2
    err = capsys.readouterr().err
    assert "error: --device 7: GPU 7 is not there" in err and "--device cpu" in err
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # a refused --device leaves the environment as it was


def _gpus(monkeypatch, n: int) -> None:
    """n CUDA GPUs visible (none is initialised), on a machine without any."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)


def test_the_manuals_device_list_runs_as_written(tmp_path, monkeypatch):
    """The manual's `CUDA_VISIBLE_DEVICES='1,2,3,4,5,6,7' python train_qat.py ... --device 1,2,3,4,5,6,7` with those 7
    GPUs visible: as in ultralytics, --device becomes CUDA_VISIBLE_DEVICES (the machine's GPUs 1..7, before CUDA
    starts) and the run spawns one DistributedDataParallel process on each of them, cuda:0..6."""
    import torch.multiprocessing as mp
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2,3,4,5,6,7")
    _gpus(monkeypatch, 7)
    spawned = {}
    monkeypatch.setattr(mp, "spawn", lambda fn, nprocs, args: spawned.update(nprocs=nprocs, devices=args[1],
                                                                             args=args[2]))
    assert runner.main(TinySuite(), ["--output-dir", str(tmp_path), "--device", "1,2,3,4,5,6,7"]) == 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,2,3,4,5,6,7"
    assert spawned["nprocs"] == 7 and [str(d) for d in spawned["devices"]] == [f"cuda:{i}" for i in range(7)]
    assert spawned["args"].distributed and spawned["args"].world_size == 7
    # another list picks other GPUs of the machine, whatever CUDA_VISIBLE_DEVICES said
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2,3,4,5,6,7")
    _gpus(monkeypatch, 2)
    assert runner.main(TinySuite(), ["--output-dir", str(tmp_path), "--device", "0,3"]) == 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,3" and spawned["nprocs"] == 2


def test_no_device_named_is_one_device(tmp_path, monkeypatch):
    """Without --device: the first GPU, one process, no DistributedDataParallel (ultralytics' and pytorch/examples'
    default); under torchrun each local rank takes its own GPU."""
    _gpus(monkeypatch, 4)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    started = {}
    monkeypatch.setattr(runner, "worker", lambda local, suite, devices, cfg: started.update(
        devices=devices, distributed=cfg.distributed) or 0)
    assert runner.main(TinySuite(), ["--output-dir", str(tmp_path)]) == 0
    assert [str(d) for d in started["devices"]] == ["cuda:0"] and not started["distributed"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert runner.main(TinySuite(), ["--output-dir", str(tmp_path)]) == 0
    assert [str(d) for d in started["devices"]] == [f"cuda:{i}" for i in range(4)] and started["distributed"]


@pytest.mark.parametrize("device, gpu, visible, want", [
    (None, None, 0, ["cpu"]),
    (None, None, 2, ["cuda:0"]),                 # no device named: one, the first GPU
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
