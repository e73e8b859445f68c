"""Subprocesses of the tests that can hang (torchrun, distributed runs, a suite's script): started in their own
session, and on timeout killed with every process they started, so that no worker outlives its test.

    r = run_group([sys.executable, "-m", "torch.distributed.run", ...], timeout=240)   # a CompletedProcess

torchrun starts each worker in a session of its own (torch.distributed.elastic's subprocess handler), so killing
torchrun's process group alone would leave the workers running: the descendants are found first and each one's
group is killed too.
"""
from __future__ import annotations

import os
import signal
import subprocess


def _children() -> dict[int, list[int]]:
    """{parent pid: child pids} of every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and parentheses
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and the group of each of its descendants (and the descendants themselves)."""
    pids = [pid, *descendants(pid)]
    groups = set()
    for p in pids:
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            pass
    for g in groups:
        if g != os.getpgrp():  # never the test's own group
            try:
                os.killpg(g, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_group(cmd: list[str], timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`` in a new session; on timeout every
    process it started is killed, then subprocess.TimeoutExpired is raised with the output so far."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         **popen_kwargs)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, err = p.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    except BaseException:  # KeyboardInterrupt, a pytest timeout: nothing is left behind either
        kill_tree(p.pid)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)
