"""`import ts_qat_pytorch as tq`: the manual's functions flat on the package, beside the manual's module paths."""
import subprocess
import sys

import ts_qat_pytorch as tq
from ts_qat_pytorch.convert_export import convert_export
from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
from ts_qat_pytorch.utils.calibrate import calibrate
from ts_qat_pytorch.utils.utils import save_checkpoint


def test_flat_names_are_the_functions_after_the_module_imports():
    # prepare_by_platform and convert_export are modules too: importing them first must not shadow the functions
    assert tq.prepare_by_platform is prepare_by_platform and tq.convert_export is convert_export
    assert tq.BackendType is BackendType and tq.calibrate is calibrate and tq.save_checkpoint is save_checkpoint
    assert sys.modules["ts_qat_pytorch.prepare_by_platform"].BackendType is BackendType
    assert set(tq.__all__) <= set(dir(tq))
    for name in tq.__all__:
        assert getattr(tq, name) is not None


def test_flat_names_first_then_the_module_paths():
    code = """
import sys
import ts_qat_pytorch as tq
assert "torch" not in sys.modules, "import ts_qat_pytorch alone must stay light"
pbp, ce = tq.prepare_by_platform, tq.convert_export
from ts_qat_pytorch.prepare_by_platform import prepare_by_platform, BackendType
from ts_qat_pytorch.convert_export import convert_export
import ts_qat_pytorch.utils.state
assert pbp is prepare_by_platform is tq.prepare_by_platform and ce is convert_export is tq.convert_export
assert tq.BackendType is BackendType and callable(tq.enable_calibration)
try:
    tq.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("an unknown name must be an AttributeError")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
