"""The classifier suite end to end on its embedded default (--smoke), and its checks."""
import re

import pytest

from suites.classifier import main as suite_main
from suites.classifier.suite import SUITE
from suites.common.metrics import load_metrics


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("classifier")
    rc = suite_main.main(["--smoke", "--threads", "2", "--output-dir", str(out), "--cache-dir", str(out / "cache")])
    return rc, out


def test_smoke_pipeline_runs_every_stage(smoke_run):
    rc, out = smoke_run
    assert rc == 0
    arch = SUITE.recipes["embedded"]["arch"]
    m = load_metrics(out / "classifier" / f"{arch}_metrics.json")
    assert (m["suite"], m["arch"], m["metric"]) == ("classifier", arch, "top1")
    assert all(m[k] is not None for k in ("float", "qat", "ort", "quantized_layers"))
    for name in ("checkpoint.pth", "onnx_quantization.onnx", "qparams.json", "results.csv"):
        assert (out / "classifier" / f"{arch}_{name}").is_file(), name


def test_an_unknown_arch_is_an_error_before_any_work(tmp_path, capsys):
    assert suite_main.main(["--smoke", "-a", "resnet_18", "--output-dir", str(tmp_path)]) == 2
    assert re.search(r"error: unknown --arch 'resnet_18'", capsys.readouterr().err)
