"""Every job is a session: `python3 -m nox -l` lists them.

All sessions share one environment (.nox/shared-env): torch alone is 5.5 GB, so one install serves
every session. It is created on first use and re-installed only when pyproject.toml changes.
Each suite's sessions (<name>_float_eval, _qat, _export, _regression) are generated from its
suites/<name>/regression.json, found here without edits.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import shutil
import sys
import zipfile

import nox

ROOT = pathlib.Path(__file__).resolve().parent
ENV = ROOT / ".nox" / "shared-env"
EXTRAS = "all,test"

nox.options.default_venv_backend = "none"
nox.options.sessions = ["tests"]


def shared_python(session: nox.Session) -> str:
    """The shared environment's interpreter, created / updated as needed."""
    py = ENV / "bin" / "python"
    stamp = ENV / ".installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + EXTRAS.encode()).hexdigest()
    if not py.exists():
        session.run(sys.executable, "-m", "venv", str(ENV), external=True)
    if not stamp.exists() or stamp.read_text() != want:
        session.run(str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e",
                    f"{ROOT}[{EXTRAS}]", external=True)
        stamp.write_text(want)
    return str(py)


def run_py(session: nox.Session, *args: str, **env: str) -> None:
    session.run(shared_python(session), *args, external=True, env={"PYTHONUNBUFFERED": "1", **env})


# rknn-toolkit2 (Rockchip's NPU converter and simulator) pins numpy <= 1.26.4, onnx <= 1.18, protobuf <= 4.25.4 and
# torch <= 2.4: it gets its own environment. Its ONNX path never calls torch (the worker stands in for it), so torch,
# a multi-GB download, is left out (--no-deps for the toolkit itself).
RKNN_ENV = ROOT / ".nox" / "rknn-env"
RKNN_TOOLKIT = "rknn-toolkit2==2.5.0"
RKNN_DEPS = ["numpy==1.26.4", "onnx==1.18.0", "protobuf==4.25.4", "onnxruntime==1.20.1", "scipy==1.17.1",
             "opencv-python-headless==4.11.0.86", "fast-histogram==0.14", "psutil", "ruamel.yaml", "tqdm"]


def rknn_python(session: nox.Session) -> str:
    """The rknn-toolkit2 environment's interpreter, created on first use."""
    py = RKNN_ENV / "bin" / "python"
    stamp = RKNN_ENV / ".installed"
    want = " ".join([RKNN_TOOLKIT, *RKNN_DEPS])
    if not py.exists():
        session.run(sys.executable, "-m", "venv", str(RKNN_ENV), external=True)
    if not stamp.exists() or stamp.read_text() != want:
        pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        session.run(*pip, "--no-deps", RKNN_TOOLKIT, external=True)
        session.run(*pip, *RKNN_DEPS, external=True)
        stamp.write_text(want)
    return str(py)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (core and suites' smoke tests; the rknn-toolkit2 import test in its own environment). Extra
    args go to pytest."""
    run_py(session, "-m", "pytest", *(session.posargs or ["-q", "-n", "auto", "--durations=15", "tests"]),
           TS_QAT_RKNN_PYTHON=rknn_python(session))


@nox.session
def deploy_check(session: nox.Session) -> None:
    """A deployment toolchain imports an exported file and runs it (rknn-toolkit2's NPU simulator, own environment):
    `-- imagenet` (a suite: its export session plus --deploy rknn: QAT / onnxruntime / RKNN on its evaluation set,
    under "deploy" in the metrics JSON), `-- model.onnx [tools/deploy_check.py flags]`, or `-- --smoke`."""
    env = {"TS_QAT_RKNN_PYTHON": rknn_python(session)}
    if not session.posargs:
        session.error(f"name a suite ({', '.join(sorted(SUITES))}), an ONNX file or --smoke: nox -s deploy_check -- "
                      "imagenet")
    first, rest = session.posargs[0], list(session.posargs[1:])
    if first in SUITES:
        run_py(session, *SUITES[first].export_command(rest), "--deploy", "rknn", *rest, **env)
    else:
        run_py(session, str(ROOT / "tools" / "deploy_check.py"), *session.posargs, **env)


@nox.session
def bench(session: nox.Session) -> None:
    """Core benchmark (QAT vs float train step, peak memory, ORT int8 vs fp32) and each suite's ORT latency."""
    run_py(session, str(ROOT / "tools" / "bench_core.py"), *session.posargs)
    run_py(session, str(ROOT / "tools" / "bench_suites.py"))


@nox.session
def regression(session: nox.Session) -> None:
    """Every suite's regression run (suites/*/regression.json) against its baselines.json: one table; then the
    full architecture sweep (the zoo session)."""
    run_py(session, str(ROOT / "tools" / "regression_gate.py"), *session.posargs)
    run_py(session, str(ROOT / "tools" / "zoo.py"), "--out", str(ROOT / "checkpoint" / "zoo"))


@nox.session
def zoo(session: nox.Session) -> None:
    """The 49 architectures of tools/zoo_models.txt through prepare -> calibrate -> export -> onnxruntime, each in
    its own process: checkpoint/zoo/results.jsonl and the table checkpoint/zoo/zoo.md. -- --resume goes on,
    -- --models NAME ... sweeps others (timm names, tv:<torchvision name>)."""
    run_py(session, str(ROOT / "tools" / "zoo.py"), "--out", str(ROOT / "checkpoint" / "zoo"), *session.posargs)


@nox.session
def new_suite(session: nox.Session) -> None:
    """Start a suite: nox -s new_suite -- NAME [--from classifier (the minimal template) | yolov5 | transformers]."""
    run_py(session, str(ROOT / "tools" / "new_suite.py"), *session.posargs)


def readme_library_example() -> str:
    """The first python block of README.md's "The library" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## The library"):]
    return section[section.index("```python\n") + 10:section.index("\n```", section.index("```python"))] + "\n"


# the fused CPU fake-quant kernels' C source, which fake_quantize/cpu_kernels.py compiles on first use
KERNEL_SOURCE = "ts_qat_pytorch/fake_quantize/cpu_kernels.c"


def wheel_contents(path: pathlib.Path) -> tuple[list[str], list[str], list[str]]:
    """(top-level packages, package data files, console scripts) of a wheel."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        entry_points = next((n for n in names if n.endswith(".dist-info/entry_points.txt")), None)
        scripts_section = z.read(entry_points).decode().partition("[console_scripts]")[2] if entry_points else ""
    top = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
    data = sorted(n for n in names if not n.endswith(".py") and ".dist-info/" not in n)
    scripts = [line.split("=")[0].strip() for line in scripts_section.partition("\n[")[0].splitlines() if "=" in line]
    return top, data, scripts


@nox.session
def wheel(session: nox.Session) -> None:
    """The wheel as a user gets it: built from a copy of this checkout, installed into a fresh virtualenv with its base
    dependencies (every console script's --help runs there, and no `suites` / `tools` package is importable), then
    with the imagenet extra (torchvision), under which README.md's library example runs as a script."""
    work = ROOT / ".nox" / "wheel"
    shutil.rmtree(work, ignore_errors=True)
    src, dist, venv = work / "src", work / "dist", work / "venv"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".nox", ".venv", "build", "dist", "checkpoint", "runs", "__pycache__", "*.egg-info", "*.onnx",
        "*.onnx.data", "*.pth"))
    session.run(sys.executable, "-m", "venv", str(venv), external=True)
    py, bin_dir = str(venv / "bin" / "python"), venv / "bin"
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    session.run(*pip, "wheel", "-q", "--no-deps", "-w", str(dist), str(src), external=True)
    whl = next(dist.glob("*.whl"))
    top, data, scripts = wheel_contents(whl)
    session.log(f"{whl.name}: top-level packages {top}; package data {data or 'none'}; console scripts {scripts}")
    if sorted(top) != ["ts_qat_cli", "ts_qat_pytorch"]:
        session.error(f"the wheel's top-level packages are {top}: expected ts_qat_cli and ts_qat_pytorch only")
    if KERNEL_SOURCE not in data:  # without it QAT on the CPU runs on torch's slower kernels, with a warning
        session.error(f"the wheel lacks {KERNEL_SOURCE}: pyproject.toml's package-data must include *.c")
    session.run(*pip, "install", "-q", str(whl), external=True)  # base dependencies only
    with session.chdir(work):  # not the checkout: nothing importable from it
        session.run(py, "-c", "import importlib.util as u, sys; found = [m for m in ('suites', 'tools') if "
                    "u.find_spec(m)]; sys.exit(f'importable from the wheel: {found}' if found else 0)", external=True)
        for name in scripts:
            session.run(str(bin_dir / name), "--help", external=True, silent=True)
            session.log(f"{name} --help: ok")
        session.run(py, "-c", "import ts_qat_pytorch as tq; print('ts_qat_pytorch', tq.__version__, "
                    "tq.prepare_by_platform.__module__, tq.convert_export.__module__)", external=True)
        session.run(*pip, "install", "-q", f"{whl}[imagenet]", external=True)
        (work / "readme_example.py").write_text(readme_library_example())
        session.run(py, "readme_example.py", external=True)
        for f in ("r18.pth", "r18_qparams.json", "r18.onnx"):
            if not (work / f).is_file():
                session.error(f"the README example did not write {f}")
    session.log("the README example ran; removing the virtualenv")
    shutil.rmtree(work, ignore_errors=True)


# Suite sessions, generated from each suites/<name>/regression.json: <name>_float_eval, <name>_qat, <name>_export,
# <name>_regression (its "sessions": the flags of each, "{out}" standing for checkpoint/<name>; its "arch": the
# prefix of the checkpoint the export session picks up).
JOBS = {
    "float_eval": "the float model (fine-tuned once on the embedded default, cached) evaluated",
    "qat": "the embedded default end to end: float -> calibration -> QAT -> export -> onnxruntime",
    "export": "the last QAT checkpoint (from <name>_qat) exported to int8 ONNX and evaluated in onnxruntime; without "
              "it the calibrated float model (PTQ)",
    "regression": "the default run checked against the suite's baselines.json",
}


class SuiteSessions:
    """The commands of one suite's sessions; ``export_command`` is also what `nox -s deploy_check -- <suite>` runs."""

    def __init__(self, folder: pathlib.Path):
        import json
        self.name, self.folder = folder.name, folder
        self.spec = json.loads((folder / "regression.json").read_text())
        self.out = ROOT / "checkpoint" / self.name

    def flags(self, job: str) -> list[str]:
        return [a.replace("{out}", str(self.out)) for a in self.spec.get("sessions", {}).get(job, [])]

    def command(self, job: str, posargs) -> list[str]:
        """The script and the flags of ``job``; the session adds its posargs after them (they win)."""
        if job == "export":
            return self.export_command(posargs)
        cmd = [str(self.folder / self.spec["script"]), "--output-dir", str(ROOT / "checkpoint"), *self.flags(job)]
        if job == "regression":
            cmd += ["--baselines", str(self.folder / "baselines.json"), "--metrics",
                    str(self.out / "regression_metrics.json")]
        return cmd

    def export_command(self, posargs) -> list[str]:
        ckpt = self.out / f"{self.spec.get('sessions', {}).get('arch', self.name)}_checkpoint.pth"
        resume = ["--resume", str(ckpt)] if ckpt.exists() and "--resume" not in posargs else []
        return [str(self.folder / self.spec["script"]), "--output-dir", str(ROOT / "checkpoint"), *self.flags("export"),
                *resume]


def _suite_session(suite: SuiteSessions, job: str):
    def session(session: nox.Session) -> None:
        run_py(session, *suite.command(job, session.posargs), *session.posargs)
    session.__doc__ = f"{suite.name}: {JOBS[job].replace('<name>', suite.name)}."
    session.__name__ = f"{suite.name}_{job}"
    return nox.session(name=f"{suite.name}_{job}")(session)


SUITES = {}
for _folder in sorted(p.parent for p in ROOT.glob("suites/*/regression.json")):
    SUITES[_folder.name] = SuiteSessions(_folder)
    for _job in JOBS:
        globals()[f"{_folder.name}_{_job}"] = _suite_session(SUITES[_folder.name], _job)
