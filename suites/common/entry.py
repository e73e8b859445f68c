"""The one entry point of every suite: ``suites/NAME/suite.py``'s ``SUITE`` on the runner (suites/common/runner.py).
``python -m suites NAME [flags]`` (suites/__main__.py) and a suite's own script (``python suites/imagenet/main.py``,
yolov5's ``train_qat.py``, a five-line shim over :func:`entry`) both come here."""
from __future__ import annotations

import importlib
import os


def suite_of(name: str):
    """``suites.<name>.suite.SUITE``, or SystemExit naming the suites there are."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    have = sorted(d for d in os.listdir(here) if os.path.isfile(os.path.join(here, d, "suite.py")))
    if name not in have:
        raise SystemExit(f"no suite '{name}' under {here}; suites: {', '.join(have)}")
    return importlib.import_module(f"suites.{name}.suite").SUITE


def run_suite(name: str, argv=None) -> int:
    from suites.common import runner
    return runner.main(suite_of(name), argv)


def entry(script: str):
    """``main(argv=None) -> exit code`` of the suite whose folder holds ``script``."""
    name = os.path.basename(os.path.dirname(os.path.abspath(script)))
    return lambda argv=None: run_suite(name, argv)
