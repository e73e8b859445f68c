"""The runner's accuracy flags on the tiny suite (tests/suites/common/test_runner.py): --ptq-recon (PTQ only and
before QAT), --mixed-precision with a budget, --max-drop (raise to 8 bits / leave float, either metric direction),
their records in the metrics JSON, --resume of what they saved, and the errors before long work."""
from __future__ import annotations

import json

import pytest
import torch

from suites.common import runner
from suites.common.metrics import load_metrics
from suites.common.suite import Metric
from ts_qat_pytorch.fake_quantize import QuantizeBase

from .test_runner import TinySuite

FAST = ["--device", "cpu", "--print-freq", "100", "--no-ort-eval"]


def _run(suite, out, *flags) -> tuple[int, dict | None]:
    rc = runner.main(suite, ["--output-dir", str(out), *FAST, *map(str, flags)])
    path = out / "tiny" / "tiny_metrics.json"
    return rc, (load_metrics(path) if rc == 0 else None)


def test_ptq_recon_only_records_calibrated_and_reconstructed_and_saves_the_model(tmp_path, capsys):
    out = tmp_path / "out"
    rc, m = _run(TinySuite(), out, "--ptq-recon", "--epochs", "0", "--ptq-config", '{"max_count": 10}')
    assert rc == 0
    ptq = m["extras"]["ptq"]
    assert ptq["config"] == {"pattern": "block", "prob": 0.5, "max_count": 10, "scale_lr": 2e-3,
                             "round_mode": "learned_hard_sigmoid"}
    assert ptq["units"] == 2 and len(ptq["per_unit"]) == 2 and ptq["seconds"] > 0
    assert ptq["loss_after"] <= ptq["loss_before"]
    assert ptq["calibrated"] is not None and ptq["reconstructed"] == m["qat"]  # PTQ only: the result is the model
    assert m["run"].get("qat_steps") is None and "ptq_recon" in m["times_s"]
    for name in ("checkpoint.pth", "model_best.pth", "onnx_quantization.onnx", "bestonnx_quantization.onnx"):
        assert (out / "tiny" / f"tiny_{name}").is_file(), name
    log = capsys.readouterr().out
    assert "=> PTQ calibrated (min/max, round-to-nearest) top1" in log and "=> PTQ reconstructed top1" in log
    assert "reconstruction per unit" in log and "no QAT (--epochs 0)" in log
    # the PTQ checkpoint continues with QAT
    rc = runner.main(TinySuite(), ["--output-dir", str(out), *FAST, "--epochs", "1", "--no-export", "--resume",
                                   str(out / "tiny" / "tiny_checkpoint.pth"), "--metrics", str(tmp_path / "r.json")])
    assert rc == 0 and load_metrics(tmp_path / "r.json")["run"]["qat_steps"] == 4


def test_ptq_recon_then_qat_from_an_ancestor_yaml_config(tmp_path):
    cfg = tmp_path / "ptq.yaml"
    cfg.write_text("quantize:\n  reconstruction:\n    pattern: layer\n    max_count: 5\n    prob: 1.0\n")
    rc, m = _run(TinySuite(), tmp_path / "out", "--ptq-recon", "--ptq-config", cfg, "--epochs", "1", "--no-export")
    assert rc == 0
    assert m["extras"]["ptq"]["config"]["pattern"] == "layer" and m["extras"]["ptq"]["config"]["prob"] == 1.0
    assert m["run"]["qat_steps"] == 4 and m["qat"] is not None


def test_mixed_precision_allocates_records_writes_and_resumes(tmp_path, capsys):
    out = tmp_path / "out"
    rc, m = _run(TinySuite(), out, "--mixed-precision", "--avg-bits", "4", "--candidates", "2", "4", "8",
                 "--mp-blockwise", "--epochs", "1")
    assert rc == 0
    mp = m["extras"]["mixed_precision"]
    assert mp["budget"] == {"avg_bits": 4.0} and mp["achieved"]["avg_bits"] <= 4 and mp["method"] == "hessian"
    assert mp["blockwise"] and (mp["batches"], mp["samples"]) == (1, 16)  # the tiny suite has one calibration batch
    assert set(mp["w_bits"]) == {"0", "5"} and min(mp["w_bits"].values()) < 8 and m["backend"] == "Experimental"
    for k in ("mixed_precision", "mixed_precision_csv", "mixed_precision_png"):
        assert (out / "tiny" / "tiny_mixed_precision" / m["files"][k].split("/")[-1]).is_file(), k
    cfg = json.loads((out / "tiny" / "tiny_mixed_precision" / "mixed_precision.json").read_text())
    assert cfg["prepare_custom_config_dict"]["module_qconfig"]["0"]["w_qscheme"]["bit"] == mp["w_bits"]["0"]
    assert "=> mixed precision allocation" in capsys.readouterr().out
    ck = torch.load(out / "tiny" / "tiny_checkpoint.pth", weights_only=True)
    assert ck["layer_config"]["prepare"]["module_qconfig"]["0"]["w_qscheme"]["bit"] == mp["w_bits"]["0"]
    # -e --resume (what tools/analyze_suite.py runs, with the run's flags): prepared from the checkpoint's record
    rc = runner.main(TinySuite(), ["--output-dir", str(out), *FAST, "--mixed-precision", "--avg-bits", "4", "-e",
                                   "--no-export", "--resume", str(out / "tiny" / "tiny_checkpoint.pth"),
                                   "--metrics", str(tmp_path / "e.json")])
    assert rc == 0
    e = load_metrics(tmp_path / "e.json")
    assert e["qat"] == m["qat"] and e["backend"] == "Experimental" and "mixed_precision" not in e["extras"]
    assert "instead of a new search" in capsys.readouterr().out


def test_mixed_precision_bops_budget_with_activation_candidates_and_the_loss_method(tmp_path):
    rc, m = _run(TinySuite(), tmp_path / "out", "--mixed-precision", "--bops", "1e6", "--act-candidates", "4", "8",
                 "--sensitivity-method", "loss", "--epochs", "1", "--no-export")
    assert rc == 0
    mp = m["extras"]["mixed_precision"]
    assert mp["achieved"]["bops"] <= 1e6 and mp["a_bits"] is not None and mp["method"] == "loss"


class PenaltySuite(TinySuite):
    """The metric is known from the model's quantization: each layer whose weights have fewer than 8 bits (or, with
    ``every``, each quantized layer) costs 10 points; the float model has none."""

    every = False

    def evaluate(self, model, loader, run, prefix):
        n = sum(1 for mod in model.modules() if isinstance(getattr(mod, "weight_fake_quant", None), QuantizeBase)
                and (self.every or mod.weight_fake_quant.scheme.bit < 8))
        return {self.metric.name: 100.0 - 10.0 * n if self.metric.direction == "higher" else 10.0 * n}


class ErrorSuite(PenaltySuite):
    metric = Metric("err", "lower")

    def evaluate_onnx(self, session, loader, run, prefix):
        return {"err": 0.0}


@pytest.mark.parametrize("suite", [PenaltySuite(), ErrorSuite()], ids=["higher", "lower"])
def test_max_drop_raises_the_most_sensitive_layers_to_8_bits_until_within(tmp_path, suite, capsys):
    low = ["--backend", "Experimental", "--w-bit", "4", "--first-last-bit", "0", "--epochs", "1"]
    rc, m = _run(suite, tmp_path / "a", *low, "--max-drop", "5")
    assert rc == 0
    ac = m["extras"]["accuracy_control"]
    assert ac["drop_before"] == 20 and ac["drop"] == 0 and ac["within_budget"] and ac["action"] == "8-bit"
    assert ac["changes"] == {"0": 8, "5": 8} and len(ac["tries"]) == 3  # none, one, two layers
    assert m["qat"] == (100.0 if suite.metric.direction == "higher" else 0.0)
    ck = torch.load(tmp_path / "a" / "tiny" / "tiny_checkpoint.pth", weights_only=True)
    assert ck["layer_config"]["prepare"]["module_qconfig"]["0"]["w_qscheme"] == {"bit": 8}
    assert m["files"]["onnx"] and "=> accuracy control:" in capsys.readouterr().out
    # at most one layer: the best model (one layer raised) is kept, outside the budget
    rc, m = _run(suite, tmp_path / "b", *low, "--max-drop", "5", "--max-drop-layers", "1", "--no-export")
    ac = m["extras"]["accuracy_control"]
    assert rc == 0 and ac["drop"] == 10 and not ac["within_budget"] and len(ac["changes"]) == 1


def test_max_drop_leaves_layers_float_after_ptq_and_the_result_resumes(tmp_path):
    class Every(PenaltySuite):
        every = True
    out = tmp_path / "out"
    rc, m = _run(Every(), out, "--epochs", "0", "--ptq-recon", "--ptq-config", '{"max_count": 3}', "--max-drop", "15",
                 "--sensitivity-method", "loss")
    assert rc == 0
    ac = m["extras"]["accuracy_control"]
    assert ac["action"] == "float" and ac["drop"] == 10 and ac["within_budget"]
    (layer,) = ac["changes"]
    assert ac["changes"][layer] is None and m["qat"] == 90 and m["quantized_layers"] == 1
    rc = runner.main(Every(), ["--output-dir", str(out), *FAST, "-e", "--no-export", "--max-drop", "15", "--resume",
                               str(out / "tiny" / "tiny_checkpoint.pth"), "--metrics", str(tmp_path / "e.json")])
    assert rc == 0 and load_metrics(tmp_path / "e.json")["qat"] == 90


def test_max_drop_within_budget_changes_nothing(tmp_path):
    rc, m = _run(PenaltySuite(), tmp_path / "out", "--epochs", "1", "--no-export", "--max-drop", "0")
    assert rc == 0
    ac = m["extras"]["accuracy_control"]
    assert ac["within_budget"] and ac["changes"] == {} and ac["drop"] == 0 and ac["tries"] == []


@pytest.mark.parametrize("flags, message", [
    (["--avg-bits", "4"], "--avg-bits configures --mixed-precision; add --mixed-precision"),
    (["--candidates", "2", "8"], "--candidates configures --mixed-precision"),
    (["--mixed-precision"], "--mixed-precision needs exactly one budget"),
    (["--mixed-precision", "--avg-bits", "4", "--bops", "1e6"], "got --avg-bits and --bops"),
    (["--mixed-precision", "--avg-bits", "1.5"], "--avg-bits 1.5 is below the smallest of --candidates 2 4 8"),
    (["--mixed-precision", "--avg-bits", "4", "--candidates", "1", "8"], "--candidates 1: bit widths must be within"),
    (["--mixed-precision", "--avg-bits", "4", "--backend", "TSQAT"], "--mixed-precision with --backend TSQAT"),
    (["--mixed-precision", "--avg-bits", "4", "--backend", "Experimental", "--w-bit", "4"], "drop --w-bit"),
    (["--mixed-precision", "--size-kib", "0.01"], "--size-kib 0.01 cannot be met: with --candidates 2 4 8"),
    (["--max-drop", "-1"], "--max-drop -1.0 must be a finite number >= 0"),
    (["--max-drop", "nan"], "--max-drop nan must be a finite number >= 0"),
    (["--max-drop-layers", "3"], "configure --max-drop; add --max-drop X"),
    (["--max-drop", "1", "--max-drop-layers", "0"], "--max-drop-layers 0 must be >= 1"),
    (["--max-drop", "1", "--not-qat"], "cannot be combined with --not-qat"),
    (["--ptq-config", '{"max_count": 5}'], "--ptq-config configures --ptq-recon; add --ptq-recon"),
    (["--ptq-recon", "--ptq-config", '{"max_cout": 5}'], "did you mean ['max_count']"),
    (["--ptq-recon", "--ptq-config", '{"prob": 0}'], "'prob' must be in (0, 1]"),
    (["--ptq-recon", "--ptq-config", "no-such.json"], "is neither a file nor a JSON object"),
    (["--ptq-recon", "--ptq-config", "{oops"], "--ptq-config is not valid JSON"),
    (["--epochs", "-1"], "--epochs -1 must be >= 0"),
])
def test_bad_combinations_are_errors_before_long_work(tmp_path, capsys, flags, message):
    assert runner.main(TinySuite(), ["--output-dir", str(tmp_path), *FAST, *flags]) == 2
    io = capsys.readouterr()
    assert message in io.err, io.err
    assert "stage float_eval" not in io.out  # nothing was evaluated, let alone trained


def test_max_drop_waits_for_the_last_epoch_of_a_time_sliced_run(tmp_path, capsys):
    low = ["--backend", "Experimental", "--w-bit", "4", "--first-last-bit", "0", "--no-export", "--max-drop", "5"]
    rc, m = _run(PenaltySuite(), tmp_path / "out", *low, "--epochs", "2", "--stop-after-epochs", "1")
    assert rc == 0 and "accuracy_control" not in m["extras"]
    assert "--max-drop: after the last epoch (--stop-after-epochs stopped at 1 of 2)" in capsys.readouterr().out
