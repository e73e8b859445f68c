"""Atomic writes: a crash leaves either the old file or the new one, never a torn one.

The data goes to a hidden temporary next to the target (``.<name>.XXXXXXXX.tmp``), is flushed to disk and
renamed over the target. Around that:

- SIGTERM during the write (the main thread, default SIGTERM action) removes the temporary, then the
  signal is delivered again with its default action; SIGKILL cannot be caught, so the next write to the same
  path removes the temporaries that earlier writers left behind (those no live writer holds).
- The file gets the mode a plain ``open(path, "wb")`` would give it (the umask for a new file, the old
  file's mode for a replaced one), not ``mkstemp``'s 0600.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import stat
import tempfile
import threading
import time
from typing import Any

import torch

try:  # a lock that dies with its process (even under SIGKILL): how the next writer tells live from stale
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger(__name__)

# A temporary younger than this may belong to a writer that has not taken its lock yet: left alone.
_MIN_AGE_S = 2.0
# Where locks are unavailable, a temporary this much older than its last write counts as stale.
_STALE_AFTER_S = 3600.0
# tempfile.mkstemp's random part: 8 characters of [a-z0-9_]
_RANDOM_PART = r"[a-z0-9_]{8}"

__all__ = ["atomic_write_bytes", "atomic_torch_save"]


def _temp_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


def _is_own_temporary(path: str, name: str) -> bool:
    return re.fullmatch(re.escape(_temp_prefix(path)) + _RANDOM_PART + r"\.tmp", name) is not None


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _held_by_a_live_writer(tmp: str) -> bool | None:
    """Whether a writer holds ``tmp``'s lock; None where locks are unavailable (Windows, some network file
    systems)."""
    if fcntl is None:
        return None
    with open(tmp, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
    return False


def _lock(f) -> None:
    if fcntl is not None:
        with contextlib.suppress(OSError):  # no locks on this file system: stale files then go by age
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove the temporaries of earlier, crashed writes to ``path`` (only that path's own pattern, and only
    those no live writer holds). Returns the removed paths."""
    folder = os.path.dirname(os.path.abspath(path))
    removed = []
    for name in os.listdir(folder):
        if not _is_own_temporary(path, name):
            continue
        tmp = os.path.join(folder, name)
        try:
            age = time.time() - os.path.getmtime(tmp)
            if age < _MIN_AGE_S:
                continue
            held = _held_by_a_live_writer(tmp)
            if held or (held is None and age < _STALE_AFTER_S):
                continue
            os.unlink(tmp)
        except OSError:  # gone meanwhile, or another user's: cleaning up must never fail a save
            continue
        removed.append(tmp)
    if removed:
        logger.warning("removed %d temporary file(s) left by an interrupted write of %s: %s", len(removed), path,
                       ", ".join(os.path.basename(r) for r in removed))
    return removed


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, which races with other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: str) -> int:
    """The mode ``open(path, "wb")`` would leave: the existing file's, else 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def _removed_on_sigterm(tmp: str):
    """While writing ``tmp``: a SIGTERM with the default action removes it first, then terminates as before.
    Only the main thread can install signal handlers; a custom handler keeps running (if it raises, the
    writer's cleanup removes the temporary; if it returns, the write goes on)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return

    def on_sigterm(signum, frame):
        _unlink_quietly(tmp)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # the original behaviour: terminate

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never a torn one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(path)
    mode = _final_mode(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        with _removed_on_sigterm(tmp), os.fdopen(fd, "wb") as f:
            _lock(f)  # released when the file closes or the process dies, SIGKILL included
            f.write(data)
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
