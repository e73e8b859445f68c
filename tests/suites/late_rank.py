"""Run a suite's script under torchrun with rank 1 late, as a slow node or a slow data set makes it:

    python -m torch.distributed.run --nproc_per_node 2 tests/suites/late_rank.py CACHE_DIR SCRIPT [FLAGS ...]

Rank 1 joins the process group, then waits until rank 0 has written the fine-tuned float model into CACHE_DIR (at most
$LATE_RANK_WAIT_S seconds, 20: a runner that decides on rank 0 holds rank 0 back until rank 1 arrives, so the file
never comes first), then runs the script. A rank that then decided on its own would see the cache and skip the
barrier rank 0 waits in.
"""
from __future__ import annotations

import glob
import os
import runpy
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from suites.common import distributed as D  # noqa: E402

cache_dir, script = sys.argv[1], sys.argv[2]
join = D.init_process


def late_init(*args, **kwargs) -> None:
    join(*args, **kwargs)
    if D.rank() == 1:
        deadline = time.time() + float(os.environ.get("LATE_RANK_WAIT_S", "20"))
        while time.time() < deadline and not glob.glob(os.path.join(cache_dir, "*_float_*.pth")):
            time.sleep(0.1)
        print(f"late rank 1: starting after the float cache appeared: "
              f"{bool(glob.glob(os.path.join(cache_dir, '*_float_*.pth')))}", flush=True)


D.init_process = late_init
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
