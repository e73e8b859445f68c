"""Every job is a session: `python3 -m nox -l` lists them.

All sessions share one environment (.nox/shared-env): torch alone is 5.5 GB, so one install serves
every session. It is created on first use and re-installed only when pyproject.toml changes.
Suites add their own sessions in suites/<name>/sessions.py, found here without edits.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import sys

import nox

ROOT = pathlib.Path(__file__).resolve().parent
ENV = ROOT / ".nox" / "shared-env"
EXTRAS = "test,imagenet,yolov5,transformers"

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


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (core and suites' smoke tests). Extra args go to pytest."""
    run_py(session, "-m", "pytest", *(session.posargs or ["-q", "-n", "auto", "--durations=15", "tests"]))


@nox.session
def bench(session: nox.Session) -> None:
    """Core benchmark (QAT vs float train step, peak memory, ORT int8 vs fp32) and each suite's ORT latency."""
    run_py(session, str(ROOT / "tools" / "bench_core.py"), *session.posargs)
    run_py(session, str(ROOT / "tools" / "bench_suites.py"))


@nox.session
def regression(session: nox.Session) -> None:
    """Every suite's regression run (suites/*/regression.json) against its baselines.json: one table."""
    run_py(session, str(ROOT / "tools" / "regression_gate.py"), *session.posargs)


@nox.session
def new_suite(session: nox.Session) -> None:
    """Copy a suite under a new name: nox -s new_suite -- NAME --from imagenet."""
    run_py(session, str(ROOT / "tools" / "new_suite.py"), *session.posargs)


# Suite sessions: each suites/<name>/sessions.py registers its own.
for _path in sorted(ROOT.glob("suites/*/sessions.py")):
    _spec = importlib.util.spec_from_file_location(f"_suite_sessions_{_path.parent.name}", _path)
    _mod = importlib.util.module_from_spec(_spec)
    _mod.run_py = run_py
    _mod.ROOT = ROOT
    _spec.loader.exec_module(_mod)
