#!/usr/bin/env python3
"""`ts-qat-mixed-precision` from a checkout (the program: core/ts_qat_cli/mixed_precision.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from ts_qat_cli.mixed_precision import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
