import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.core.helpers import prepare_and_calibrate
from tests.core.test_prepare import Block
from ts_qat_pytorch.convert_export import convert_export

TOOL = Path(__file__).resolve().parents[2] / "tools" / "onnx_inspect.py"


def _export(tmp_path, config=None):
    x = torch.randn(2, 3, 8, 8)
    q = prepare_and_calibrate(Block().eval(), x, config=config)
    return convert_export(q, x, str(tmp_path / "b.onnx"))


def test_inspector_agrees_with_json_and_counts_kernels(tmp_path):
    r = _export(tmp_path)
    out = subprocess.run([sys.executable, str(TOOL), r.onnx_path, "--qparams", r.qparams_path,
                          "--json", str(tmp_path / "rep.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "against the JSON: agrees" in out.stdout
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["ort_integer_kernels"]["QLinearConv"] == 2
    assert all(c["integer"] for c in rep["compute_ops"])


def test_inspector_reports_doctored_json(tmp_path):
    r = _export(tmp_path)
    js = json.loads(Path(r.qparams_path).read_text())
    js["tensors"]["conv1.weight"]["scale"][0] *= 2
    Path(r.qparams_path).write_text(json.dumps(js))
    out = subprocess.run([sys.executable, str(TOOL), r.onnx_path, "--qparams", r.qparams_path],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "conv1.weight: scale differs" in out.stdout


def test_inspector_says_why_a_layer_is_float(tmp_path):
    r = _export(tmp_path, {"extra_quantizer_dict": {"exclude_module_name": ["conv2"]}})
    out = subprocess.run([sys.executable, str(TOOL), r.onnx_path], capture_output=True, text=True)
    assert "weight" in out.stdout and "is not quantized" in out.stdout


def test_profile_reports_time_per_op_type_of_each_file(tmp_path):
    r = _export(tmp_path)
    out = subprocess.run([sys.executable, str(TOOL), r.onnx_path, r.onnx_path, "--profile", "--threads", "1",
                          "--runs", "3", "--json", str(tmp_path / "prof.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    profiles = json.loads((tmp_path / "prof.json").read_text())
    assert len(profiles) == 2 and all(p["wall_ms"] > 0 for p in profiles)
    ops = {o["op"]: o for o in profiles[0]["ops"]}
    assert ops["QLinearConv"]["nodes"] == 2  # the optimized graph's kernels, counted per node
    assert abs(sum(o["share"] for o in profiles[0]["ops"]) - 1.0) < 0.01
    assert "QLinearConv" in out.stdout
