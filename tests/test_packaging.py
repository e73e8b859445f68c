"""The wheel a user installs: the library and its command-line programs under project names, with their data files
and licence; no generic top-level package (the suites and tools/ run from a checkout). `nox -s wheel` installs it
into a fresh virtualenv; this builds it the way pip does (setuptools' PEP 517 hook) from a copy of the tree."""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ts_qat_pytorch", "ts_qat_cli")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("PEP 639 licence metadata needs setuptools >= 77 (pyproject.toml's build requirement)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "checkpoint", "*.onnx", "*.pth")
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for name in ("core", "suites", "tools", "tests"):  # all of it, so a discovery that picked up more would show
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    r = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                        "print(build_meta.build_wheel(sys.argv[1]))", str(tmp / "dist")],
                       cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with zipfile.ZipFile(tmp / "dist" / r.stdout.strip().splitlines()[-1]) as z:
        yield z


def _dist_info(z: zipfile.ZipFile, name: str) -> str:
    return z.read(next(n for n in z.namelist() if n.endswith(f".dist-info/{name}"))).decode()


def test_only_project_named_packages_are_installed(wheel):
    top = {n.split("/")[0] for n in wheel.namelist() if ".dist-info/" not in n}
    assert top == set(PACKAGES)
    assert sorted(_dist_info(wheel, "top_level.txt").split()) == sorted(PACKAGES)


def test_every_module_and_data_file_of_the_packages_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    for pkg in PACKAGES:
        for f in (REPO / "core" / pkg).rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts and not f.name.endswith((".pyc", ".swp", "~")):
                assert f.relative_to(REPO / "core").as_posix() in names, f"{f} is not in the wheel"


def test_the_fused_kernels_c_source_is_package_data(wheel):
    # fake_quantize/cpu_kernels.py compiles it on first use; without it QAT on the CPU falls back to torch's kernels
    source = "ts_qat_pytorch/fake_quantize/cpu_kernels.c"
    assert source in wheel.namelist() and b"tsq_forward" in wheel.read(source)


def test_licence_and_dependencies(wheel):
    meta = _dist_info(wheel, "METADATA")
    assert "License-Expression: Apache-2.0" in meta and "License-File: LICENSE" in meta
    assert "Apache License" in _dist_info(wheel, "licenses/LICENSE")
    requires = [ln.split(": ", 1)[1] for ln in meta.splitlines() if ln.startswith("Requires-Dist: ")]
    base = {r.split(">")[0].split("=")[0].strip() for r in requires if "extra ==" not in r}
    assert base == {"torch", "numpy", "onnx", "onnxscript", "onnxruntime"}
    assert "torch>=2.9" in requires  # convert_export's default (dynamo) exporter keeps the quantizers' names
    extras = {ln.split(": ", 1)[1] for ln in meta.splitlines() if ln.startswith("Provides-Extra: ")}
    assert {"imagenet", "segmentation", "yolov5", "transformers", "timm", "mixed-precision", "all"} <= extras
    assert any(r.startswith("scipy") and '"mixed-precision"' in r for r in requires)
    assert any(r.startswith("torchvision") and '"yolov5"' in r for r in requires)


def test_console_scripts_point_at_main_functions(wheel, monkeypatch):
    section = _dist_info(wheel, "entry_points.txt").partition("[console_scripts]")[2].partition("\n[")[0]
    scripts = dict(ln.replace(" ", "").split("=") for ln in section.splitlines() if "=" in ln)
    assert set(scripts) == {"ts-qat-inspect", "ts-qat-checkpoint", "ts-qat-mixed-precision", "ts-qat-deploy-check"}
    monkeypatch.syspath_prepend(str(REPO / "core"))
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), target
