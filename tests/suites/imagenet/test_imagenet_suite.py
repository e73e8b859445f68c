"""ImageNet suite tests: real weights, the pipeline on a tiny subset, bad inputs, resume, regression.

Real assets (mobilenet_v2 ImageNet weights, Fashion-MNIST) come from suites.common.assets (pip / apt)."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from suites.common.metrics import load_metrics
from suites.imagenet import main as suite_main
from suites.imagenet.suite import SUITE

ARCH = SUITE.recipes["embedded"]["arch"]  # the embedded default's model: every output file's prefix

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def mobilenet():
    import torchvision
    from suites.common.assets import install_torchvision_weights
    install_torchvision_weights()
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    model = torchvision.models.mobilenet_v2(weights=weights).eval()
    return model, weights.transforms()


def _skimage_batch(tf, names):
    import skimage.data
    from PIL import Image
    out = []
    for n in names:
        img = getattr(skimage.data, n)()
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        out.append(tf(Image.fromarray(img[..., :3])))
    return torch.stack(out)


def test_real_weights_float_fakequant_and_onnx_agree(mobilenet, tmp_path):
    from ts_qat_pytorch.convert_export import convert_export
    from ts_qat_pytorch.onnx.verify import ort_session
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    from ts_qat_pytorch.utils.state import enable_calibration, enable_quantization

    model, tf = mobilenet
    x = _skimage_batch(tf, ["chelsea", "coffee"])
    with torch.no_grad():
        pred = model(x).argmax(1).tolist()
    assert pred == [285, 967]  # Egyptian cat, espresso

    q = prepare_by_platform(model, BackendType.TSQAT)
    calib = _skimage_batch(tf, ["chelsea", "coffee", "astronaut", "rocket", "camera", "cat", "hubble_deep_field"])
    q.eval()
    enable_calibration(q)
    with torch.no_grad():
        q(calib)
    enable_quantization(q)
    with torch.no_grad():
        assert q(x).argmax(1).tolist() == [285, 967]
    r = convert_export(q, x[:1], str(tmp_path / "mnv2.onnx"), opset_version=18, batch_size=1)
    assert r.integer_matmul_kernels >= 50
    sess = ort_session(r.onnx_path)
    ort_pred = [int(sess.run(None, {r.input_names[0]: x[i:i + 1].numpy()})[0].argmax()) for i in range(2)]
    assert ort_pred == [285, 967]


SMOKE = ["--smoke", "--float-images", "192", "--train-images", "64", "--val-images", "128",
         "--calib-batches", "1", "--batch-size", "32", "--print-freq", "1"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    rc = suite_main.main(SMOKE + ["--output-dir", str(out), "--cache-dir", str(out / "cache"),
                                  "--metrics", str(out / "metrics.json")])
    return rc, out


def test_smoke_pipeline_metrics(smoke_run):
    rc, out = smoke_run
    assert rc == 0
    m = load_metrics(out / "metrics.json")  # the one schema (suites/README.md), checked
    assert (m["suite"], m["arch"], m["backend"], m["metric"], m["direction"]) == \
        ("imagenet", ARCH, "TSQAT", "top1", "higher")
    for k in ("float", "qat", "ort", "integer_kernels", "integer_matmul_kernels", "times_s", "quantized_layers"):
        assert m[k] is not None, k
    assert os.path.isfile(m["files"]["onnx"])
    for k in ("float", "qat", "ort"):
        assert 0.0 <= m[k] <= 100.0 and m[k] == m["scores"][k]["top1"] and 0.0 <= m["scores"][k]["top5"] <= 100.0
    assert m["float"] > 15.0  # 10 classes: better than chance after a few steps from ImageNet weights
    assert abs(m["ort"] - m["qat"]) <= 5.0
    assert m["qat_minus_float"] == round(m["qat"] - m["float"], 3) and m["ort_minus_qat"] == round(m["ort"] - m["qat"], 3)
    assert m["integer_matmul_kernels"] == m["quantized_layers"] > 0  # every quantized layer runs on integers
    for stage in ("float_train", "float_eval", "calibration", "qat_train", "qat_eval", "export", "ort_eval"):
        assert m["times_s"][stage] >= 0.0
    for name in ("checkpoint.pth", "model_best.pth", "onnx_quantization.onnx", "bestonnx_quantization.onnx",
                 "qparams.json", "checkpoint_float.pth"):
        assert (out / "imagenet" / f"{ARCH}_{name}").is_file(), name  # outputs under <output-dir>/<suite>/
    # the float weights load into the torchvision architecture
    import torchvision
    sd = torch.load(out / "imagenet" / f"{ARCH}_checkpoint_float.pth", weights_only=True)
    torchvision.models.get_model(ARCH, num_classes=10).load_state_dict(sd)


def test_resume_and_evaluate_checkpoint(smoke_run, capsys):
    """--resume picks up epoch / optimizer / fake-quant state and continues; -e exports it."""
    rc, out = smoke_run
    ck = torch.load(out / "imagenet" / f"{ARCH}_checkpoint.pth", weights_only=True)
    assert ck["epoch"] == 1 and "optimizer" in ck and "scheduler" in ck and "rng" in ck
    rc = suite_main.main(SMOKE + ["--output-dir", str(out), "--cache-dir", str(out / "cache"), "--epochs", "2",
                                  "--resume", str(out / "imagenet" / f"{ARCH}_checkpoint.pth"),
                                  "--metrics", str(out / "m2.json"), "--no-ort-eval"])
    assert rc == 0
    assert "resumed" in capsys.readouterr().out
    ck2 = torch.load(out / "imagenet" / f"{ARCH}_checkpoint.pth", weights_only=True)
    assert ck2["epoch"] == 2
    assert ck2["scheduler"]["last_epoch"] == 2 * ck["scheduler"]["last_epoch"]


def test_resume_continues_like_uninterrupted(smoke_run, tmp_path):
    """1 epoch + resume to 2 epochs gives the same weights as 2 epochs in one go."""
    common = SMOKE + ["--cache-dir", str(smoke_run[1] / "cache"), "--no-export", "--val-images", "32",
                      "--train-images", "32"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert suite_main.main(common + ["--output-dir", str(a), "--epochs", "2"]) == 0
    assert suite_main.main(common + ["--output-dir", str(b), "--epochs", "2", "--stop-after-epochs", "1"]) == 0
    assert suite_main.main(common + ["--output-dir", str(b), "--epochs", "2",
                                     "--resume", str(b / "imagenet" / f"{ARCH}_checkpoint.pth")]) == 0
    sa = torch.load(a / "imagenet" / f"{ARCH}_checkpoint.pth", weights_only=True)["state_dict"]
    sb = torch.load(b / "imagenet" / f"{ARCH}_checkpoint.pth", weights_only=True)["state_dict"]
    for k, v in sa.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            torch.testing.assert_close(v, sb[k], rtol=1e-4, atol=1e-5, msg=k)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_end_with_identical_weights(smoke_run, tmp_path):
    """main.py --multiprocessing-distributed: 2 CPU processes (gloo) train QAT steps on different data shards and
    end with the same weights, scales and observer state (digests gathered from each rank)."""
    import sys

    from tests.processes import run_group  # a separate process: on timeout it is killed with its workers
    out = tmp_path / "ddp"
    r = run_group([sys.executable, suite_main.__file__, *SMOKE, "--cache-dir", str(smoke_run[1] / "cache"),
                   "--output-dir", str(out), "--no-export", "--val-images", "32", "--train-images", "64", "--threads",
                   "1", "--multiprocessing-distributed", "--dist-url", f"tcp://127.0.0.1:{_free_port()}",
                   "--metrics", str(out / "metrics.json")], timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = load_metrics(out / "metrics.json")
    assert m["run"]["world_size"] == 2 and m["run"]["qat_steps"] >= 2
    d = m["run"]["replica_digests"]
    assert len(d) == 2 and d[0] == d[1], d
    # and training moved the weights away from the calibrated float start (the digest is not of an idle model)
    ck = torch.load(out / "imagenet" / f"{ARCH}_checkpoint.pth", weights_only=True)
    assert ck["epoch"] == 1


def _image_folder(root, classes=2, per_class=2):
    from PIL import Image
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray((np.random.rand(40, 40, 3) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


def test_data_recipe_fine_tunes_like_the_manuals_demo():
    """QAT with --data fine-tunes a trained model: the manual's demo (--lr 1e-4 --optim adam --wd 1e-5 --epochs 10),
    not pytorch/examples' 90 epochs of SGD at lr 0.1 (what --not-qat, training from scratch, keeps); given flags win."""
    from suites.common.cli import build_parser, resolve

    def recipe(*argv):
        a = resolve(SUITE, build_parser(SUITE).parse_args(["--data", "/data/imagenet", *argv]))
        return a.epochs, a.lr, a.optim, a.weight_decay

    assert recipe("--pretrained") == (10, 1e-4, "adam", 1e-5)
    assert recipe("--pretrained", "--lr", "0.01", "--epochs", "3", "--optim", "sgd") == (3, 0.01, "sgd", 1e-5)
    assert recipe("--not-qat") == (90, 0.1, "sgd", 1e-4)


def test_bad_inputs(tmp_path, capsys):
    def err(argv):
        rc = suite_main.main(argv)
        assert rc != 0
        return capsys.readouterr().err

    assert "does not exist" in err(["--data", str(tmp_path / "nope"), "--pretrained"])
    (tmp_path / "empty").mkdir()
    assert "no 'train/' folder" in err(["--data", str(tmp_path / "empty"), "--pretrained"])
    e = err(["-a", "mobilenetv2"])
    assert "unknown --arch 'mobilenetv2'" in e and "mobilenet_v2" in e
    folder = _image_folder(tmp_path / "if")
    e = err(["--data", str(folder), "-a", "resnet18", "-nc", "2"])
    assert "--pretrained" in e and "--model-path" in e and "--resume" in e
    import torchvision
    ck = tmp_path / "r18_5.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), ck)
    e = err(["--data", str(folder), "-a", "resnet18", "-nc", "2", "--model-path", str(ck), "--not-qat", "-e"])
    assert "5 classes" in e and "is 2" in e
    bad = tmp_path / "trunc.pth"
    bad.write_bytes(ck.read_bytes()[:1000])
    e = err(["--data", str(folder), "-a", "resnet18", "-nc", "2", "--model-path", str(bad)])
    assert "could not be read" in e
    e = err(["--data", str(folder), "-a", "resnet18", "-nc", "2", "--model-path", str(tmp_path / "missing.pth")])
    assert "does not exist" in e


def test_teacher_class_mismatch(tmp_path, capsys):
    import torchvision
    folder = _image_folder(tmp_path / "if")
    st, te = tmp_path / "s.pth", tmp_path / "t.pth"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), st)
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), te)
    rc = suite_main.main(["--data", str(folder), "-a", "resnet18", "-nc", "2", "--model-path", str(st),
                          "--teacher-arch", "resnet18", "--teacher-path", str(te), "--distill-method", "kd",
                          "--image-size", "32", "-j", "0", "--output-dir", str(tmp_path / "o")])
    assert rc != 0
    e = capsys.readouterr().err
    assert "7 classes" in e and "is 2" in e


def test_shipped_baselines_are_well_formed():
    from suites.common.regression import load_baselines
    path = os.path.join(os.path.dirname(suite_main.__file__), "baselines.json")
    entries = load_baselines(path)
    assert {e["metric"] for e in entries} >= {"float", "qat", "ort"}  # the schema's headline values


def test_flags_are_range_checked_before_any_work(tmp_path, capsys):
    """--lr / --float-lr (finite, > 0), -j, --image-size, --opset-version (13..21), -nc: errors from resolve_args,
    before data, models or the first export."""
    from suites.common.cli import build_parser, resolve
    from suites.common.suite import SuiteError
    from suites.imagenet.suite import SUITE

    def resolve_args(args):
        return resolve(SUITE, args)
    for argv, msg in ((["--lr", "nan"], "--lr nan must be a finite number > 0"),
                      (["--lr", "-0.1"], "--lr -0.1 must be"), (["--lr", "0"], "--lr 0.0 must be"),
                      (["--float-lr", "inf"], "--float-lr inf must be"),
                      (["-j", "-1"], "-j/--workers -1 must be >= 0"),
                      (["--image-size", "0"], "--image-size 0 must be >= 32"),
                      (["--opset-version", "12"], "--opset-version 12 is outside 13..21"),
                      (["--opset-version", "22"], "--opset-version 22 is outside 13..21"),
                      (["--data", "x", "-nc", "0"], "-nc/--num-classes 0 must be >= 1")):
        with pytest.raises(SuiteError, match=re.escape(msg)):
            resolve_args(build_parser(SUITE).parse_args(argv))
    resolve_args(build_parser(SUITE).parse_args(["--lr", "1e-3", "-j", "2", "--image-size", "32",
                                                 "--opset-version", "13"]))
    # through main: "error: ...", exit code 2, before the (missing) data is even looked at
    assert suite_main.main(["--data", str(tmp_path / "nope"), "--lr", "nan"]) == 2
    assert "error: --lr nan must be a finite number > 0" in capsys.readouterr().err


def test_low_bit_recipes():
    """The embedded recipe below 8 bits: 2 000 steps at 5e-4; from a --ptq-recon model half of them at 1e-3, the
    scales at 2e-5, after a 100-step warm-up; 8 bits keep the int8 touch-up; given flags win."""
    from suites.common.cli import build_parser, resolve
    from suites.imagenet.suite import SUITE

    def run(*argv):
        a = resolve(SUITE, build_parser(SUITE).parse_args(list(argv)))
        return a.epochs, a.train_images, a.lr, a.qparam_lr, a.warmup_steps
    w4a4 = ("--backend", "Experimental", "--w-bit", "4", "--a-bit", "4")
    assert run() == (1, 6400, 5e-5, None, 0)
    assert run("--ptq-recon") == (1, 6400, 5e-5, None, 0)
    assert run(*w4a4) == (4, 32000, 5e-4, None, 0)
    assert run(*w4a4, "--ptq-recon") == (2, 32000, 1e-3, 2e-5, 100)
    assert run(*w4a4, "--ptq-recon", "--epochs", "1", "--lr", "5e-4", "--qparam-lr", "1e-4", "--warmup-steps",
               "0") == (1, 32000, 5e-4, 1e-4, 0)


def test_num_classes_must_match_the_data(tmp_path, capsys):
    """-nc larger than the data's class folders is an error naming what the data has (it was a warning)."""
    import torchvision
    folder = _image_folder(tmp_path / "if")
    ck = tmp_path / "r18_5.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), ck)
    rc = suite_main.main(["--data", str(folder), "-a", "resnet18", "-nc", "5", "--model-path", str(ck), "--not-qat",
                          "-e", "-j", "0", "--image-size", "32", "--output-dir", str(tmp_path / "o")])
    assert rc == 2
    e = capsys.readouterr().err
    assert "has 2 classes (class folders in train/) but -nc/--num-classes is 5" in e and "use -nc 2" in e


def test_zoo_teacher_with_a_random_head_is_not_used(tmp_path, capsys):
    """kd with -nc other than the zoo teacher's 1000 classes and no --teacher-path: the fine-tuned float model of
    --model-path teaches (logged); without one it is an error before any model is built."""
    import argparse
    import torchvision
    from suites.common.cli import choose_teacher
    from suites.common.run import Run, RunConfig
    from suites.common.stages.teacher import build_teacher
    from suites.common.suite import Data
    from suites.imagenet.suite import SUITE, teacher_source
    folder = _image_folder(tmp_path / "if")
    rc = suite_main.main(["--data", str(folder), "-a", "mobilenet_v2", "--teacher-arch", "mobilenet_v2", "-nc", "2",
                          "--pretrained", "--distill-method", "kd", "-j", "0", "--image-size", "32", "--epochs", "1",
                          "-b", "2", "--calib-batches", "1", "--no-export", "--output-dir", str(tmp_path / "o")])
    assert rc == 2
    e = capsys.readouterr().err
    assert "predicts 1000 classes, and a new 2-class head would be random" in e and "--teacher-path" in e
    args = argparse.Namespace(distill_method="kd", not_qat=False, evaluate=False, teacher_path="", embedded=False,
                              teacher_arch="resnet101", model_zoo="torchvision", num_classes=2,
                              model_path=str(tmp_path / "ft.pth"), device=torch.device("cpu"), image_size=32,
                              arch="resnet18")
    assert teacher_source(args) == "float"
    assert "the float model of --model-path" in capsys.readouterr().err
    assert teacher_source(argparse.Namespace(**{**vars(args), "num_classes": 1000})) == "zoo"
    assert choose_teacher(argparse.Namespace(**{**vars(args), "teacher_path": "t.pth", "teacher": "zoo"})) == "path"
    student = torchvision.models.resnet18(num_classes=2).eval()
    run = Run(RunConfig({**vars(args), "teacher": "float"}), SUITE, torch.device("cpu"), None)
    run.data = Data(None, None, None, example=torch.randn(1, 3, 32, 32))
    teacher = build_teacher(run, SUITE, student)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), student(x))
    assert teacher is not student and not any(p.requires_grad for p in teacher.parameters())


def _qat_ckpt(path, lr):
    sd = {"conv.weight": torch.zeros(2, 3, 1, 1), "conv.weight_fake_quant.scale": torch.ones(2)}
    torch.save({"state_dict": sd, "qat": True, "epoch": 1,
                "optimizer": {"state": {}, "param_groups": [{"lr": lr / 2, "initial_lr": lr, "params": [0]}]},
                "scheduler": {"base_lrs": [lr], "last_epoch": 3}}, path)


def test_resume_with_another_lr_is_reported(tmp_path, capsys):
    from suites.common.resume import checkpoint_lr, lr_change_message
    ck = tmp_path / "q.pth"
    _qat_ckpt(ck, 1e-3)
    # early (before the data, which is missing here): the warning names both values and the one used
    assert suite_main.main(["--data", str(tmp_path / "nope"), "-a", "resnet18", "--resume", str(ck),
                            "--lr", "0.5"]) == 2
    e = capsys.readouterr().err
    assert "--lr 0.5 differs from the learning rate 0.001 of --resume" in e and "the checkpoint's 0.001 is used" in e
    assert suite_main.main(["--data", str(tmp_path / "nope"), "-a", "resnet18", "--resume", str(ck),
                            "--lr", "1e-3"]) == 2
    assert "differs from the learning rate" not in capsys.readouterr().err
    assert checkpoint_lr({"optimizer": {"param_groups": [{"lr": 0.2}]}}) == 0.2 and checkpoint_lr({}) is None
    assert "(the default)" in lr_change_message({"scheduler": {"base_lrs": [0.1]}}, 5e-5, "x", given=False)
    # a float state_dict given to --resume is refused before the data as well
    import torchvision
    fl = tmp_path / "float.pth"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), fl)
    assert suite_main.main(["--data", str(tmp_path / "nope"), "-a", "resnet18", "--resume", str(fl)]) == 2
    assert "is not a QAT checkpoint" in capsys.readouterr().err


def test_unreadable_image_is_an_error_naming_it_or_a_counted_skip(tmp_path, capsys):
    import torchvision
    from suites.common.training import skipped_images
    from suites.imagenet.data import DataError, imagefolder_datasets
    folder = _image_folder(tmp_path / "if")
    good = (folder / "val" / "c0" / "0.png").read_bytes()
    (folder / "val" / "c0" / "bad.png").write_bytes(good[: len(good) // 3])  # truncated
    (folder / "train" / "c1" / "junk.png").write_bytes(b"not an image at all")
    train, val, _calib = imagefolder_datasets(str(folder), 32)
    bad_index = next(i for i, (p, _t) in enumerate(val.samples) if p.endswith("bad.png"))
    with pytest.raises(DataError, match=r"image '.*bad\.png' cannot be read .*--on-bad-image skip"):
        val[bad_index]
    # skip: the next readable image takes its place; counted in DataLoader workers too
    train, val, _calib = imagefolder_datasets(str(folder), 32, "skip")
    for ds, n in ((val, 5), (train, 5)):  # 4 readable images + 1 unreadable, whose place the next one takes
        dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
        assert sum(len(x) for x, _y in dl) == n
        assert skipped_images(ds) == 1
    assert skipped_images(torch.utils.data.Subset(val, [bad_index])) == 1
    # main.py: the error names the file (no PIL traceback, no worker traceback); skip reports the count
    st = tmp_path / "s.pth"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), st)
    argv = ["--data", str(folder), "-a", "resnet18", "-nc", "2", "--model-path", str(st), "--not-qat", "-e", "-j", "2",
            "--image-size", "32", "--output-dir", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json")]
    assert suite_main.main(argv) == 2
    e = capsys.readouterr().err
    assert "error: image '" in e and "bad.png' cannot be read" in e and "Traceback" not in e
    assert suite_main.main(argv + ["--on-bad-image", "skip"]) == 0
    assert "Float: skipped 1 unreadable image(s)" in capsys.readouterr().err
    m = load_metrics(tmp_path / "m.json")
    assert m["run"]["skipped_images"] == {"train": 0, "val": 1, "calib": 0}


def test_tools_read_the_metrics_file_not_the_suite(smoke_run, tmp_path):
    """tools/analyze_suite.py reruns the script the metrics file names (run.entry, run.argv) with --profile;
    tools/bench_suites.py times the ONNX file it names against its float twin. Neither imports the suite."""
    import sys

    from tests.processes import run_group  # analyze_suite.py starts main.py: on timeout both are killed
    rc, out = smoke_run
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(repo, "core"), repo])}
    r = run_group([sys.executable, os.path.join(repo, "tools", "analyze_suite.py"), "profile", "--suite",
                   "imagenet", "--output-dir", str(out), "--metrics", str(out / "metrics.json"),
                   "--val-images", "32"], env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "per-layer float vs fake-quant (worst first)" in r.stdout
    assert (out / "imagenet" / f"{ARCH}_profile.csv").is_file()
    r = run_group([sys.executable, os.path.join(repo, "tools", "bench_suites.py"), "--output-dir", str(out),
                   "--reps", "2", "--out", str(tmp_path / "b.json")], env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["imagenet"]["arch"] == ARCH and b["imagenet"]["int8_ms"] > 0 and b["imagenet"]["fp32_ms"] > 0


@pytest.mark.skipif(not os.environ.get("TS_QAT_RKNN_PYTHON"),
                    reason="no rknn-toolkit2 environment ($TS_QAT_RKNN_PYTHON; nox -s tests sets it)")
def test_deploy_rknn_evaluates_the_exported_file_beside_qat_and_onnxruntime(smoke_run):
    """`nox -s deploy_check -- imagenet` runs this: the export session plus --deploy rknn."""
    rc, out = smoke_run
    rc = suite_main.main(SMOKE + ["--output-dir", str(out), "--cache-dir", str(out / "cache"), "--evaluate",
                                  "--resume", str(out / "imagenet" / f"{ARCH}_checkpoint.pth"), "--val-images", "64",
                                  "--deploy", "rknn", "--metrics", str(out / "deploy.json")])
    assert rc == 0
    m = load_metrics(out / "deploy.json")
    rec = m["deploy"]["rknn"]
    assert rec["platform"] == "rk3588" and rec["build_s"] > 0 and rec["file_bytes"] > 0
    assert 0.0 <= rec["top1"] <= 100.0 and rec["top1"] == rec["scores"]["top1"]
    assert rec["minus_ort"] == round(rec["top1"] - m["ort"], 3)
    assert abs(rec["minus_ort"]) <= 10.0  # 64 images: the NPU's integers agree with onnxruntime's


def test_deploy_without_the_rknn_environment_is_refused_before_work(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TS_QAT_RKNN_PYTHON", raising=False)
    rc = suite_main.main(SMOKE + ["--output-dir", str(tmp_path), "--deploy", "rknn"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nox -s deploy_check" in err and "Float:" not in err
