"""Atomic writes leave no temporaries behind (SIGTERM, SIGKILL), give files the usual mode, and the float
checkpoint + JSON pair is written only when both can be."""
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ts_qat_pytorch.prepare_by_platform import prepare_by_platform
from ts_qat_pytorch.utils.state import enable_quantization
from ts_qat_pytorch.utils.utils import atomic_torch_save, atomic_write_bytes, save_checkpoint

from .test_prepare import Block

pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals, umask and file locks are POSIX")

# A writer that stops inside the write (the fsync) and says so, for the test to signal it there.
_SLOW_WRITER = textwrap.dedent("""
    import os, sys, time
    from ts_qat_pytorch.utils.utils import atomic_write_bytes
    def slow_fsync(fd):
        print("writing", flush=True)
        time.sleep(60)
    os.fsync = slow_fsync
    atomic_write_bytes(sys.argv[1], b"new" * 1000)
""")


def _temporaries(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def _interrupted_write(tmp_path, sig):
    target = tmp_path / "model.pth"
    target.write_bytes(b"old")
    p = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        assert len(_temporaries(tmp_path)) == 1  # mid-write: the temporary exists
        p.send_signal(sig)
        assert p.wait(timeout=30) == -sig
    finally:
        p.kill()
        p.stdout.close()
    assert target.read_bytes() == b"old"
    return target


def test_sigterm_mid_save_leaves_no_temporary(tmp_path):
    _interrupted_write(tmp_path, signal.SIGTERM)
    assert _temporaries(tmp_path) == []


def test_the_next_save_removes_temporaries_of_a_killed_write_and_only_those(tmp_path):
    target = _interrupted_write(tmp_path, signal.SIGKILL)  # cannot be caught: the temporary stays ...
    (stale,) = _temporaries(tmp_path)
    other = tmp_path / ".other.pth.abcd1234.tmp"  # another file's temporary
    other.write_bytes(b"x")
    live = tmp_path / ".model.pth.live0001.tmp"  # a writer still at work holds its lock
    live.write_bytes(b"x")
    past = time.time() - 60
    for p in (tmp_path / stale, other, live):
        os.utime(p, (past, past))
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        atomic_write_bytes(target, b"new")  # ... until the next save to the same path
    assert target.read_bytes() == b"new"
    assert _temporaries(tmp_path) == sorted([other.name, live.name])


def test_files_get_the_mode_a_plain_write_gives(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_torch_save({"w": torch.ones(2)}, tmp_path / "a.pth")
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "b.json", b"{}")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "a.pth").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(tmp_path / "a.json").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(tmp_path / "b.json").st_mode & 0o777) == oct(0o600)
    os.chmod(tmp_path / "a.json", 0o640)  # replacing a file keeps its mode, as open(path, "wb") does
    atomic_write_bytes(tmp_path / "a.json", b"[]")
    assert oct(os.stat(tmp_path / "a.json").st_mode & 0o777) == oct(0o640)


def test_save_checkpoint_of_an_uncalibrated_model_writes_neither_file(tmp_path):
    q = prepare_by_platform(Block())
    enable_quantization(q)
    with pytest.raises(RuntimeError, match="never calibrated"):
        save_checkpoint(q, str(tmp_path / "a.pth"), str(tmp_path / "a.json"))
    assert os.listdir(tmp_path) == []
