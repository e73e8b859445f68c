#!/usr/bin/env python3
"""`ts-qat-inspect` from a checkout (the program: core/ts_qat_cli/onnx_inspect.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from ts_qat_cli.onnx_inspect import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
