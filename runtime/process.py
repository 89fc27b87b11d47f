"""Process hygiene: stage processes die with whatever started them, and one writer per folder.

Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) is delivered by the kernel when the parent
dies, SIGKILL included, so no orphan keeps training after its pipeline or launcher is gone. The
pipeline asks for SIGTERM on its direct children (the launcher then checkpoints through its workers);
processes started by our launchers ask for SIGKILL (their parent died without passing anything on).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from runtime.errors import UserError

WATCH_ENV = "LESION_VQ_DIE_WITH_PARENT"
"""Set (to a signal name) for processes that must not outlive their parent; read in :func:`run_cli`."""
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> None:
    """Ask the kernel to send ``sig`` when the parent process exits (no-op off Linux)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return
    if os.getppid() != parent or parent == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def preexec_die_with_parent() -> None:
    """For ``subprocess.Popen(preexec_fn=...)``: runs in the child between fork and exec."""
    die_with_parent(signal.SIGTERM)


def honour_parent_watch() -> None:
    """In a stage process: die with the parent when the launcher that started us asked for it."""
    name = os.environ.get(WATCH_ENV)
    if name:
        die_with_parent(getattr(signal, f"SIG{name}", signal.SIGKILL))


class BusyError(UserError):
    pass


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (released by the kernel when the process dies, however it
    dies), or fail at once with ``busy`` and the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise BusyError(f"{busy} ({holder}); wait for it to finish or stop it first") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
