"""QAT checkpoints record how they were quantized, and loading checks it against the model."""
import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from ts_qat_pytorch import __version__
from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
from ts_qat_pytorch.utils.utils import load_qat_checkpoint, save_qat_checkpoint

from .helpers import prepare_and_calibrate
from .test_prepare import Block

X = torch.randn(2, 3, 8, 8)
W4A4 = {"extra_qconfig_dict": {"w_qscheme": {"bit": 4}, "a_qscheme": {"bit": 4}}}
TOOL = Path(__file__).resolve().parents[2] / "tools" / "qat_checkpoint.py"


def test_checkpoint_records_backend_quantizers_and_version(tmp_path):
    q = prepare_and_calibrate(Block().eval(), X, BackendType.Experimental, W4A4)
    save_qat_checkpoint(str(tmp_path / "c.pth"), q, epoch=1)
    rec = torch.load(tmp_path / "c.pth", weights_only=True)["quant_scheme"]
    assert rec["backend"] == "Experimental" and rec["ts_qat_pytorch"] == __version__
    assert rec["prepare_config"] == {"extra_qconfig_dict": {"w_qscheme": {"bit": 4}, "a_qscheme": {"bit": 4}}}
    w = rec["quantizers"]["conv1.weight_fake_quant"]
    assert w == {"kind": "weight", "type": "LearnableFakeQuantize", "bit": 4, "quant_min": -8, "quant_max": 7,
                 "per_channel": True, "symmetry": True, "pot_scale": False}
    a = rec["quantizers"]["x_post_act_fake_quantizer"]
    assert (a["kind"], a["bit"], a["quant_min"], a["quant_max"], a["symmetry"]) == ("activation", 4, 0, 15, False)
    assert copy.deepcopy(q).qat_backend == "Experimental"  # the record survives a copied model


def test_resuming_an_int8_checkpoint_into_a_4bit_model_is_refused(tmp_path):
    q8 = prepare_and_calibrate(Block().eval(), X)
    save_qat_checkpoint(str(tmp_path / "int8.pth"), q8)
    q4 = prepare_by_platform(Block(), BackendType.Experimental, W4A4)
    before = q4.conv1.weight.detach().clone()
    with pytest.raises(ValueError) as e:
        load_qat_checkpoint(str(tmp_path / "int8.pth"), q4)
    msg = str(e.value)
    assert "checkpoint: backend TSQAT; model: backend Experimental" in msg
    assert ("checkpoint: conv1.weight_fake_quant LearnableFakeQuantize 8-bit [-128,127] per-channel symmetric; "
            "model: LearnableFakeQuantize 4-bit [-8,7]") in msg
    assert "Fix: prepare the model the way it was trained, prepare_by_platform(model, 'TSQAT'" in msg
    assert torch.equal(q4.conv1.weight, before)  # nothing was loaded


def test_same_scheme_loads_and_older_checkpoints_load_with_a_warning(tmp_path, caplog):
    q = prepare_and_calibrate(Block().eval(), X, BackendType.Experimental, W4A4)
    save_qat_checkpoint(str(tmp_path / "c.pth"), q)
    load_qat_checkpoint(str(tmp_path / "c.pth"), prepare_by_platform(Block(), BackendType.Experimental, W4A4))
    old = torch.load(tmp_path / "c.pth", weights_only=True)
    del old["quant_scheme"]
    torch.save(old, tmp_path / "old.pth")
    q2 = prepare_by_platform(Block(), BackendType.Experimental, W4A4)
    with caplog.at_level(logging.WARNING, logger="ts_qat_pytorch"):
        load_qat_checkpoint(str(tmp_path / "old.pth"), q2)
    assert "no record of its quantization scheme" in caplog.text
    assert torch.equal(q2.conv1.weight, q.conv1.weight)


def test_to_float_of_a_w4a4_checkpoint_writes_its_bits(tmp_path):
    model = torchvision.models.resnet18(num_classes=7).eval()
    q = prepare_and_calibrate(model, torch.randn(2, 3, 32, 32), BackendType.Experimental, W4A4)
    save_qat_checkpoint(str(tmp_path / "w4a4.pth"), q)
    r = subprocess.run([sys.executable, str(TOOL), "to-float", str(tmp_path / "w4a4.pth"), "--arch",
                        "torchvision:resnet18", "--num-classes", "7", "--out", str(tmp_path / "f.pth"), "--json",
                        str(tmp_path / "f.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tensors = json.loads((tmp_path / "f.json").read_text())["tensors"]
    assert (tensors["conv1.weight"]["bit"], tensors["conv1.weight"]["quant_min"]) == (4, -8)
    assert {t["bit"] for t in tensors.values()} == {4}
    r = subprocess.run([sys.executable, str(TOOL), "info", str(tmp_path / "w4a4.pth")], capture_output=True, text=True)
    assert "backend Experimental, activation bits [4], weight bits [4]" in r.stdout
