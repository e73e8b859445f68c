"""The runner's fast post-training flags on tiny suites (tests/suites/common/test_runner.py): --cle,
--bias-correction, --smoothquant [ALPHA] and --qconfig, their records in the metrics JSON and the checkpoint, --resume
of what they saved, combinations with --ptq-recon, and the errors before any work."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from suites.common import runner
from suites.common.metrics import load_metrics

from .test_runner import TinySuite

FAST = ["--device", "cpu", "--print-freq", "100", "--no-ort-eval"]


class ChainSuite(TinySuite):
    """conv-BN-ReLU6 -> depthwise conv-BN-ReLU -> conv: a chain to equalize."""

    def build_model(self, cfg, arch, pretrained):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                             nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


class NormSuite(TinySuite):
    """Linear -> LayerNorm -> Linear (the LayerNorm read by the Linear alone)."""

    def build_model(self, cfg, arch, pretrained):
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 16), nn.LayerNorm(16), nn.Linear(16, 2))


def _run(suite, out, *flags) -> tuple[int, dict | None]:
    rc = runner.main(suite, ["--output-dir", str(out), *FAST, *map(str, flags)])
    path = out / "tiny" / "tiny_metrics.json"
    return rc, (load_metrics(path) if rc == 0 else None)


def test_cle_and_bias_correction_ptq_only_record_save_and_resume(tmp_path, capsys):
    out = tmp_path / "out"
    rc, m = _run(ChainSuite(), out, "--cle", "--bias-correction", "--epochs", "0")
    assert rc == 0
    cle, bc = m["extras"]["cle"], m["extras"]["bias_correction"]
    assert cle["folded"] == [["0", "1"], ["3", "4"]] and cle["relu6_replaced"] == ["2"]
    assert cle["chains"][0]["layers"] == ["0", "3", "6"] and cle["seconds"] >= 0
    assert cle["output_change"]["cle"] < 1e-4 and cle["float_after"] is not None  # ReLU6 -> ReLU: evaluated again
    assert [r["layer"] for r in bc["layers"]] == ["0", "3", "6", "9"]
    assert sum(r["shift_after"] for r in bc["layers"]) < sum(r["shift_before"] for r in bc["layers"])
    assert bc["calibrated"] is not None and bc["corrected"] == m["qat"]  # PTQ only: the corrected model is the result
    assert {"cle", "bias_correction"} <= set(m["times_s"])
    log = capsys.readouterr().out
    assert "=> CLE: 2 BatchNorms folded" in log and "=> bias correction: 4 layers corrected" in log
    assert "the bias-corrected model is the result" in log
    ck = torch.load(out / "tiny" / "tiny_checkpoint.pth", weights_only=True)
    assert ck["float_tools"] == {"cle": True}
    resume = ["--epochs", "1", "--no-export", "--resume", str(out / "tiny" / "tiny_checkpoint.pth"),
              "--metrics", str(tmp_path / "r.json")]
    # the checkpoint's layers have no BatchNorm: resuming needs --cle again (the float model processed the same way)
    assert runner.main(ChainSuite(), ["--output-dir", str(out), *FAST, *resume]) == 2
    assert "was made with --cle: add --cle" in capsys.readouterr().err
    assert runner.main(ChainSuite(), ["--output-dir", str(out), *FAST, "--cle", "--bias-correction", *resume]) == 0
    assert "--bias-correction: not with --resume" in capsys.readouterr().out
    assert load_metrics(tmp_path / "r.json")["run"]["qat_steps"] == 4


def test_bias_correction_before_reconstruction_and_qat(tmp_path):
    rc, m = _run(ChainSuite(), tmp_path / "out", "--bias-correction", "--ptq-recon", "--ptq-config",
                 '{"max_count": 5, "pattern": "layer"}', "--epochs", "1", "--no-export")
    assert rc == 0
    bc, ptq = m["extras"]["bias_correction"], m["extras"]["ptq"]
    assert ptq["calibrated"] == bc["corrected"]  # reconstruction starts from the corrected model
    assert ptq["units"] == 4 and m["run"]["qat_steps"] == 4


def test_smoothquant_records_and_combines_with_mixed_precision(tmp_path, capsys):
    rc, m = _run(NormSuite(), tmp_path / "out", "--smoothquant", "--bias-correction", "--mixed-precision",
                 "--avg-bits", "6", "--epochs", "0", "--no-export")
    assert rc == 0
    sq = m["extras"]["smoothquant"]
    assert sq["alpha"] == 0.5 and [n["norm"] for n in sq["norms"]] == ["2"] and sq["norms"][0]["linears"] == ["3"]
    assert sq["output_change"] < 1e-4 and sq["batches"] == 1
    assert "mixed_precision" in m["extras"] and "bias_correction" in m["extras"]
    assert "=> SmoothQuant: alpha 0.5: 1 LayerNorms smoothed" in capsys.readouterr().out
    rc, m = _run(NormSuite(), tmp_path / "b", "--smoothquant", "0.8", "--epochs", "0", "--no-export")
    assert rc == 0 and m["extras"]["smoothquant"]["alpha"] == 0.8


def test_qconfig_lays_extra_qconfig_dict_keys_over_the_backend(tmp_path):
    cfg = tmp_path / "per_tensor.json"
    cfg.write_text(json.dumps({"w_qscheme": {"per_channel": False}}))
    rc, _ = _run(ChainSuite(), tmp_path / "out", "--qconfig", cfg, "--epochs", "0", "--no-export")
    assert rc == 0
    sd = torch.load(tmp_path / "out" / "tiny" / "tiny_checkpoint.pth", weights_only=True)["state_dict"]
    scales = [k for k in sd if k.endswith("weight_fake_quant.scale")]
    assert len(scales) == 4 and all(sd[k].numel() == 1 for k in scales)  # one scale per tensor
    # with Experimental's bits: the scheme keys are merged, not replaced
    rc, _ = _run(ChainSuite(), tmp_path / "b", "--backend", "Experimental", "--w-bit", "4", "--qconfig",
                 '{"w_qscheme": {"per_channel": false}}', "--epochs", "0", "--no-export")
    assert rc == 0
    sd = torch.load(tmp_path / "b" / "tiny" / "tiny_checkpoint.pth", weights_only=True)["state_dict"]
    assert all(sd[k].numel() == 1 for k in sd if k.endswith("weight_fake_quant.scale"))


@pytest.mark.parametrize("suite, flags, message", [
    (ChainSuite(), ["--smoothquant", "1.5"], "--smoothquant 1.5 must be in (0, 1)"),
    (ChainSuite(), ["--smoothquant", "0"], "--smoothquant 0.0 must be in (0, 1)"),
    (ChainSuite(), ["--smoothquant"], "--smoothquant: tiny has no LayerNorm read by a Linear layer"),
    (TinySuite(), ["--cle"], "--cle: tiny has no conv -> [BatchNorm] -> [ReLU / ReLU6] -> conv chain"),
    (ChainSuite(), ["--cle", "--not-qat"], "--cle: it prepares a model for quantization; not with --not-qat"),
    (ChainSuite(), ["--bias-correction", "--smoothquant", "--not-qat"], "they prepare a model"),
    (ChainSuite(), ["--qconfig", '{"w_qscheme": {"per_chanel": false}}'], "unknown quantization scheme keys"),
    (ChainSuite(), ["--qconfig", '{"w_qscheme": {"bit": 4}}'], "--qconfig (backend TSQAT): w_qscheme bit=4"),
    (ChainSuite(), ["--qconfig", "no-such.json"], "--qconfig 'no-such.json' is neither a file nor a JSON object"),
    (ChainSuite(), ["--backend", "Experimental", "--w-bit", "4", "--qconfig", '{"w_qscheme": {"bit": 2}}'],
     "give the bits once"),
])
def test_bad_combinations_are_errors_before_any_work(tmp_path, capsys, suite, flags, message):
    rc, _ = _run(suite, tmp_path / "out", *flags, "--epochs", "0")
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out" / "tiny" / "tiny_metrics.json").exists()


def test_cle_with_resume_of_a_checkpoint_made_without_it_is_an_error(tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(ChainSuite(), out, "--epochs", "0", "--no-export")[0] == 0
    rc = runner.main(ChainSuite(), ["--output-dir", str(out), *FAST, "--cle", "--epochs", "1", "--resume",
                                    str(out / "tiny" / "tiny_checkpoint.pth")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--cle with --resume" in err and "drop --cle" in err


def test_qconfig_is_checked_in_a_fresh_process_before_the_backends_are_imported():
    """The runner checks --qconfig before anything has imported the backends (seen: 'registered backends: []')."""
    import subprocess
    import sys
    code = ("import argparse; from suites.common.cli import parse_qconfig; "
            "a = argparse.Namespace(backend='TSQAT', w_bit=None, a_bit=None); "
            "print(parse_qconfig('{\"w_qscheme\": {\"per_channel\": false}}', a))")
    root = __file__.rsplit("/tests/", 1)[0]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "per_channel" in r.stdout
