"""Process hygiene: stage processes die with whatever started them, and one writer per folder.

Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) is delivered by the kernel when the parent
dies, SIGKILL included, so no orphan keeps training after its pipeline or launcher is gone. The
pipeline asks for SIGTERM on its direct children (the launcher then checkpoints through its workers);
processes started by our launchers ask for SIGKILL (their parent died without passing anything on).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from runtime.errors import UserError
from runtime.files import open_in_place

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


LOCK_ENV = "LESION_VQ_LOCK"
"""How run and stage folders are locked: ``flock`` (default; released by the kernel however the holder dies) or
``create`` (a ``LOCK.held`` file created exclusively and removed at exit, for file systems without flock: NFS
mounted ``nolock``, Lustre without ``-o flock``). A ``.held`` file left by a killed run on this host is removed
by the next one once its process is gone; on another host it names its holder."""
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def _holder() -> str:
    return f"pid {os.getpid()} on {os.uname().nodename}"


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (see :data:`LOCK_ENV`), or fail at once with ``busy`` and the holder.
    The lock file is written in place, so never through a symbolic link (runtime.files.open_in_place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = os.environ.get(LOCK_ENV, "flock")
    if kind not in ("flock", "create"):
        raise BusyError(f"{LOCK_ENV}={kind!r}; allowed: flock (default) or create (for file systems without flock)")
    if kind == "create":
        with _created_lock(path.with_name(path.name + ".held"), busy):
            yield
        return
    with open_in_place(path, "rb+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = fh.read().decode(errors="replace").strip() or "unknown"
            raise BusyError(f"{busy} ({holder}); wait for it to finish or stop it first") from None
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                raise
            raise BusyError(f"{path}: the file system does not support flock locks ({errno.errorcode[err.errno]}: "
                            "NFS mounted nolock, or Lustre without -o flock?); rerun with LESION_VQ_LOCK=create "
                            "(a lock file created exclusively, removed at exit) or use a run_dir on a file system "
                            "with locks") from None
        fh.truncate()
        fh.write(_holder().encode())
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _created_lock(held: Path, busy: str) -> Iterator[None]:
    """LESION_VQ_LOCK=create: ``held`` created with O_EXCL (atomic on NFS v3+ and Lustre) holding the holder."""
    for attempt in (1, 2):
        try:
            with open_in_place(held, "xb") as fh:
                fh.write(_holder().encode())
            break
        except FileExistsError:
            holder = held.read_text(errors="replace").strip() if not held.is_symlink() else "a symbolic link"
            pid, _, host = holder.removeprefix("pid ").partition(" on ")
            if attempt == 1 and host == os.uname().nodename and pid.isdigit() and not _alive(int(pid)):
                held.unlink(missing_ok=True)  # left by a killed run of ours on this host
                continue
            raise BusyError(f"{busy} ({holder or 'unknown'}; lock file {held}): wait for it to finish, or delete "
                            "the file if that process is gone") from None
    try:
        yield
    finally:
        held.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
