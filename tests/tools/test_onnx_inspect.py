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


def _imported_modules(path: Path) -> set[str]:
    """The project modules a file imports (absolute imports anywhere in it, and importlib.import_module("...") of a
    literal name)."""
    import ast
    own = ("suites", "ts_qat_pytorch", "ts_qat_cli", "tools")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value)
    return {n for n in names if n.split(".")[0] in own}


def test_the_tools_import_only_modules_that_exist():
    """onnx_inspect's --suite imported suites.<suite>.analysis, which no longer exists: the flag is gone (the
    onnxruntime-vs-PyTorch comparison of a suite's model is the runner's ort_minus_qat), and every module the tools
    import exists."""
    import importlib.util
    root = TOOL.parents[1]
    files = [*(root / "tools").glob("*.py"), *(root / "core" / "ts_qat_cli").glob("*.py")]
    missing = {f"{f.relative_to(root)}: {name}" for f in files for name in _imported_modules(f)
               if importlib.util.find_spec(name) is None}
    assert not missing, sorted(missing)
    out = subprocess.run([sys.executable, str(TOOL), "m.onnx", "--suite", "imagenet"], capture_output=True, text=True)
    assert out.returncode == 2 and "unrecognized arguments: --suite" in out.stderr and "Traceback" not in out.stderr
