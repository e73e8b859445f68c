import csv
import json
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

from ts_qat_pytorch.fake_quantize import QuantizeBase
from ts_qat_pytorch.prepare_by_platform import prepare_by_platform

TOOL = Path(__file__).resolve().parents[2] / "tools" / "mixed_precision.py"


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_search_writes_a_config_that_prepares_a_table_and_a_plot(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    r = _run("-a", "resnet18", "--num-classes", 10, "--weights", tmp_path / "r18.pth", "--image-size", 16,
             "-b", 2, "--batches", 1, "--n-samples", 1, "--avg-bits", 4, "--candidates", 2, 4, 8,
             "--out", tmp_path / "mp")
    assert r.returncode == 0, r.stderr
    assert "layer1.0.conv1" in r.stdout and "backend Experimental" in r.stdout
    cfg = json.loads((tmp_path / "mp" / "mixed_precision.json").read_text())
    assert cfg["backend"] == "Experimental" and cfg["achieved"]["avg_bits"] <= 4
    q = prepare_by_platform(model.eval(), cfg["backend"], cfg["prepare_custom_config_dict"])
    mq = cfg["prepare_custom_config_dict"]["module_qconfig"]
    assert len(mq) == 21  # every conv and the fc
    for name, over in mq.items():
        fq = q.get_submodule(name).weight_fake_quant
        assert isinstance(fq, QuantizeBase) and fq.scheme.bit == over["w_qscheme"]["bit"]
    rows = list(csv.DictReader((tmp_path / "mp" / "layers.csv").open()))
    assert [row["layer"] for row in rows] == list(mq) and {int(row["w_bit"]) for row in rows} <= {2, 4, 8}
    assert (tmp_path / "mp" / "bits_vs_sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_and_an_impossible_budget():
    r = _run("--help")
    assert r.returncode == 0 and "--avg-bits" in r.stdout and "--bops" in r.stdout
    r = _run("-a", "resnet18", "--num-classes", 10, "--image-size", 16, "-b", 1, "--batches", 1,
             "--method", "loss", "--avg-bits", 1, "--out", "unused")
    assert r.returncode == 2 and "cannot be met" in r.stderr
