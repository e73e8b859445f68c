"""The one entry point of every suite: ``python -m suites NAME [flags]`` runs ``suites/NAME/suite.py``'s ``SUITE`` on
the runner (suites/common/runner.py). A suite's own script (``python suites/imagenet/main.py``, yolov5's
``train_qat.py``) is a five-line shim over :func:`entry`."""
from __future__ import annotations

import importlib
import os
import sys


def suite_of(name: str):
    """``suites.<name>.suite.SUITE``, or SystemExit naming the suites there are."""
    here = os.path.dirname(os.path.abspath(__file__))
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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m suites NAME [flags] (python -m suites NAME --help: the suite's flags)", file=sys.stderr)
        return 2
    return run_suite(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
