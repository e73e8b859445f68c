import subprocess
import sys
from pathlib import Path

import torch
import torchvision

from tests.core.helpers import prepare_and_calibrate
from ts_qat_pytorch.utils.utils import save_qat_checkpoint

TOOL = Path(__file__).resolve().parents[2] / "tools" / "qat_checkpoint.py"


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True)


def test_ddp_prefix_strip_info_and_to_float(tmp_path):
    q = prepare_and_calibrate(torchvision.models.resnet18(num_classes=7).eval(), torch.randn(2, 3, 32, 32))
    ddp_style = {"state_dict": {"module." + k: v for k, v in q.state_dict().items()}, "epoch": 4, "qat": True}
    torch.save(ddp_style, tmp_path / "ddp.pth")
    r = _run("info", tmp_path / "ddp.pth")
    assert r.returncode == 0 and "QAT" in r.stdout and "module_prefix      True" in r.stdout and "'epoch': 4" in r.stdout
    assert _run("strip", tmp_path / "ddp.pth", tmp_path / "plain.pth").returncode == 0
    assert "module_prefix      False" in _run("info", tmp_path / "plain.pth").stdout
    r = _run("to-float", tmp_path / "ddp.pth", "--arch", "torchvision:resnet18", "--num-classes", 7,
             "--out", tmp_path / "float.pth", "--json", tmp_path / "q.json")
    assert r.returncode == 0, r.stderr
    fm = torchvision.models.resnet18(num_classes=7)
    fm.load_state_dict(torch.load(tmp_path / "float.pth", weights_only=True))
    assert torch.equal(fm.fc.weight, q.fc.weight.detach())
    assert (tmp_path / "q.json").exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    q = prepare_and_calibrate(torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32))
    save_qat_checkpoint(str(tmp_path / "c.pth"), q)
    data = (tmp_path / "c.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:1000])
    r = _run("info", tmp_path / "cut.pth")
    assert r.returncode == 2 and "truncated" in r.stderr
