"""tools/zoo.py on a short subset of the zoo list (the full sweep is `nox -s zoo`, in the regression session): each
model in its own process, through prepare -> calibrate -> convert_export -> onnxruntime, as a user would."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "tools" / "zoo.py"
# one model per capability the sweep needs: same padding + timm norm-act layers, shape-dependent Python (traced
# with the input's shapes), BatchNorm1d over tokens + attention, a torchvision classic
SUBSET = ["tf_efficientnet_lite0", "mobilevit_xxs", "levit_128s", "tv:squeezenet1_0"]


def _sweep(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ZOO), "--out", str(out), "--timeout", "600", *args],
                          capture_output=True, text=True, timeout=900)


def test_the_model_list_is_the_shared_one():
    names = [ln.strip() for ln in (ROOT / "tools" / "zoo_models.txt").read_text().splitlines() if ln.strip()]
    assert len(names) == 49 and set(SUBSET) <= set(names)


@pytest.mark.parametrize("model", SUBSET)
def test_a_zoo_model_reaches_integer_kernels_on_the_current_exporter(model, tmp_path):
    run = _sweep(tmp_path, "--models", model)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (record,) = [json.loads(ln) for ln in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert record["stage"] == "onnxruntime" and record["error"] is None
    assert record["exporter"] == "dynamo"
    assert record["integer_fraction"] == 1.0, record["float_ops"]
    # a float BatchNorm left in the graph is one the export names, with its reason
    assert record["batch_norms"] <= len(record["float_batch_norms"]), record
    assert f"| {model} | onnxruntime | dynamo | 1.00 |" in (tmp_path / "zoo.md").read_text()


def test_resume_skips_what_is_done_and_a_failure_is_recorded(tmp_path):
    first = _sweep(tmp_path, "--models", "no_such_model_xyz")
    assert first.returncode == 1  # a model that fails makes the sweep fail, with its record written
    (record,) = [json.loads(ln) for ln in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert record["stage"] is None and "no_such_model_xyz" in record["error"]
    again = _sweep(tmp_path, "--models", "no_such_model_xyz", "--resume")
    assert "1 already done" in again.stdout
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1
    assert "no_such_model_xyz | - ✗" in (tmp_path / "zoo.md").read_text()
