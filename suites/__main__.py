"""``python -m suites NAME [flags]``: runs ``suites/NAME/suite.py``'s ``SUITE`` (suites/common/entry.py)."""
from __future__ import annotations

import sys

from suites.common.entry import run_suite


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m suites NAME [flags] (python -m suites NAME --help: the suite's flags)", file=sys.stderr)
        return 2
    return run_suite(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
