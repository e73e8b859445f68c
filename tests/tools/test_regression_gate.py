import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "regression_gate.py"

# a suite's run: the metrics file in the suites' one schema (suites/common/metrics.py)
FAKE_MAIN = f"""
import argparse, json, sys
sys.path.insert(0, {str(REPO / "core")!r}); sys.path.insert(0, {str(REPO)!r})
from suites.common.metrics import RunMetrics
from suites.common.suite import Metric
p = argparse.ArgumentParser(); p.add_argument("--metrics"); p.add_argument("--acc", type=float)
p.add_argument("--schema", default="ok")
a = p.parse_args()
if a.schema != "ok":  # an old-style flat file
    json.dump({{"top1": a.acc}}, open(a.metrics, "w"))
    sys.exit(0)
m = RunMetrics(a.metrics, "fake", "net", "TSQAT", Metric("top1"), log=lambda s: None)
m.score("qat", {{"top1": a.acc}})
m.data["integer_kernels"] = {{"QLinearConv": 5}}
m.write()
"""


def _suite(root: Path, name: str, acc: float, baseline: float, *extra: str):
    d = root / name
    d.mkdir(parents=True)
    (d / "main.py").write_text(FAKE_MAIN)
    (d / "regression.json").write_text(json.dumps({"script": "main.py", "args": ["--acc", str(acc), *extra]}))
    (d / "baselines.json").write_text(json.dumps([
        {"metric": "scores.qat.top1", "value": baseline, "tolerance": 0.5, "direction": "higher"},
        {"metric": "integer_kernels.QLinearConv", "value": 5, "tolerance": 0}]))


def test_gate_discovers_suites_and_passes(tmp_path):
    _suite(tmp_path, "alpha", 91.0, 91.2)
    _suite(tmp_path, "beta", 80.0, 80.0)
    (tmp_path / "common").mkdir()  # not a suite: no baselines
    r = subprocess.run([sys.executable, str(TOOL), "--suites-root", str(tmp_path), "--out", str(tmp_path / "r.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "alpha" in r.stdout and "beta" in r.stdout and "regression gate: PASS" in r.stdout
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True


def test_doctored_baseline_fails_the_gate_with_a_table(tmp_path):
    _suite(tmp_path, "alpha", 91.0, 91.2)
    _suite(tmp_path, "beta", 80.0, 85.0)  # baseline claims 85: measured 80 is a regression
    r = subprocess.run([sys.executable, str(TOOL), "--suites-root", str(tmp_path), "--out", str(tmp_path / "r.json")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    line = next(l for l in r.stdout.splitlines() if l.startswith("beta") and "top1" in l)
    assert "85" in line and "80" in line and "FAIL" in line
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {(x["suite"], x["verdict"]) for x in rows if x["metric"] == "scores.qat.top1"} == \
        {("alpha", "PASS"), ("beta", "FAIL")}


def test_a_metrics_file_outside_the_schema_fails_its_suite(tmp_path):
    _suite(tmp_path, "alpha", 91.0, 91.2)
    _suite(tmp_path, "old", 80.0, 80.0, "--schema", "flat")
    r = subprocess.run([sys.executable, str(TOOL), "--suites-root", str(tmp_path), "--out", str(tmp_path / "r.json")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "regression gate: FAIL" in r.stdout
    assert "old: metrics file" in r.stdout and "is not a suite metrics file of schema 1" in r.stdout


def test_extra_runs_run_only_when_asked_with_their_own_baselines(tmp_path):
    _suite(tmp_path, "alpha", 91.0, 91.2)
    cfg = json.loads((tmp_path / "alpha" / "regression.json").read_text())
    cfg["extra"] = [{"name": "low_bit", "args": ["--acc", "70.0"], "baselines": "baselines_low_bit.json"},
                    {"name": "other", "args": ["--acc", "60.0"], "baselines": "baselines_other.json"}]
    (tmp_path / "alpha" / "regression.json").write_text(json.dumps(cfg))
    for name, value in (("low_bit", 70.2), ("other", 65.0)):  # "other" claims 65: measured 60 fails
        (tmp_path / "alpha" / f"baselines_{name}.json").write_text(json.dumps(
            [{"metric": "scores.qat.top1", "value": value, "tolerance": 0.5, "direction": "higher"}]))

    def gate(*extra):
        out = tmp_path / "r.json"
        r = subprocess.run([sys.executable, str(TOOL), "--suites-root", str(tmp_path), "--out", str(out), *extra],
                           capture_output=True, text=True)
        return r, {x["suite"]: x["verdict"] for x in json.loads(out.read_text())["rows"]} if out.exists() else {}

    r, rows = gate()  # the default run only
    assert r.returncode == 0 and rows == {"alpha": "PASS"}, r.stdout + r.stderr
    r, rows = gate("--extra", "low_bit")
    assert r.returncode == 0 and rows == {"alpha": "PASS", "alpha/low_bit": "PASS"}, r.stdout + r.stderr
    r, rows = gate("--extra")  # all of them: the failing one fails the gate
    assert r.returncode == 1 and rows["alpha/other"] == "FAIL" and rows["alpha/low_bit"] == "PASS"
    assert "3 runs" in r.stdout
    r, _ = gate("--extra", "nope")
    assert r.returncode == 2 and "--extra nope: no such run" in r.stderr
