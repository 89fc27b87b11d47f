"""Crash-safe file writing: everything that looks complete was written completely.

Writers go to a temporary name in the same directory, fsync, then ``os.replace`` to the final
name, so a kill at any moment leaves either the old file, no file, or a ``*.tmp-*`` leftover that
no reader ever opens.

Files and folders made here get the modes ordinary creation would give them (0o666 / 0o777 minus the
umask), not mkstemp's private 0o600 / 0o700: on a shared cluster, colleagues whose umask lets them read
our outputs must be able to read reports, manifests, shards and weights.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

from runtime.errors import UserError

TMP_MARK = ".tmp-"


def _current_umask() -> int:
    """The process umask. POSIX can only read it by setting it, and the umask is process-wide: a
    thread creating a file between the two calls would create it with umask 0. So this runs once,
    at import, when no other thread of ours is creating files; later umask changes are not seen."""
    old = os.umask(0)
    os.umask(old)
    return old


_UMASK = _current_umask()
FILE_MODE = 0o666 & ~_UMASK
"""Mode of the files written here, as ``open()`` would create them."""
DIR_MODE = 0o777 & ~_UMASK
"""Mode for directories made with ``tempfile.mkdtemp`` (0o700) that become visible outputs."""


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Attach ``path`` to OS errors raised without one: a failed ``write()`` (disk full) names no file."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{path.name}{TMP_MARK}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with naming(path):
            yield tmp
            with open(tmp, "rb+") as fh:
                # After the writer: mkstemp made the file 0o600, and so may a writer that recreates it.
                os.fchmod(fh.fileno(), FILE_MODE)
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


class InPlaceWriteError(UserError):
    """A file to be written in place is a symbolic link or not a regular file: refused, never followed."""


_IN_PLACE_FLAGS = {"ab": os.O_WRONLY | os.O_APPEND, "rb+": os.O_RDWR, "xb": os.O_WRONLY | os.O_EXCL}


def open_in_place(path: Path, mode: Literal["ab", "rb+", "xb"]) -> BinaryIO:
    """``path`` opened for writing without a temporary name (a lock, a log appended to, a file just made):
    created with FILE_MODE if missing (``xb``: must not exist yet), never truncated, never through a symbolic
    link (O_NOFOLLOW: a link planted there could point at any file of the user), and only if it is a regular
    file (O_NONBLOCK while checking: a FIFO planted there would block the open forever)."""
    flags = _IN_PLACE_FLAGS[mode] | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, FILE_MODE)
    except OSError as err:
        if err.errno == errno.ELOOP or (err.errno == errno.EEXIST and Path(path).is_symlink()):
            raise InPlaceWriteError(f"{path} is a symbolic link; lesion-vq never writes through one (it could point "
                                    "at any file): remove the link and rerun") from None
        if err.errno == errno.ENXIO:  # a FIFO without a reader
            raise InPlaceWriteError(f"{path} is a FIFO, not a regular file; remove it and rerun") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InPlaceWriteError(f"{path} is not a regular file (a FIFO, device or socket?); lesion-vq writes only "
                                "its own regular files: remove it and rerun")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return os.fdopen(fd, "wb" if mode == "xb" else mode)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete leftovers of writes killed mid-way (never read, but they waste space)."""
    stale = [p for p in Path(directory).glob(f"*{TMP_MARK}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
