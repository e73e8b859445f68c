"""tests/processes.py: a subprocess that times out is killed with everything it started."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.processes import run_group

# a parent that starts a child in a session of its own (as torchrun starts its workers), prints its pid, and waits
_LAUNCHER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, waiting to be reaped
    except OSError:
        return False


def test_a_timed_out_run_leaves_no_process_behind():
    with pytest.raises(subprocess.TimeoutExpired) as info:
        run_group([sys.executable, "-c", _LAUNCHER], timeout=5)
    child = int(info.value.output.split()[0])
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), f"process {child} outlived the timeout"


def test_a_finished_run_is_a_completed_process():
    r = run_group([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                  timeout=60, env={**os.environ})
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
