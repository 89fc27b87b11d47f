"""Shared command-line behaviour: config arguments, and expected failures as one-line errors."""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from runtime.config import add_config_args
from runtime.errors import UserError
from runtime.files import TMP_MARK

EXIT_USAGE = 2
EXIT_NONFINITE = 3

_HINTS = {
    errno.ENOSPC: "free some space or choose another run_dir, then rerun (finished work is kept)",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another run_dir, then rerun",
    errno.EFBIG: "the file system refuses a file this large; choose another run_dir",
    errno.EROFS: "the file system is mounted read-only; choose a writable run_dir / output folder",
    errno.EACCES: "check the permissions, or choose another run_dir / output folder",
    errno.EPERM: "check the permissions, or choose another run_dir / output folder",
    errno.ENAMETOOLONG: "use a shorter path (at most 255 bytes per name)",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "a folder is where a file is expected",
    errno.ENOENT: "check the path (moved or deleted while running?)",
    errno.ELOOP: "too many symbolic links (a loop?)",
    errno.EMFILE: "too many open files; raise `ulimit -n`",
    errno.ENFILE: "too many open files on this machine",
    errno.EIO: "input/output error: check the disk",
}
"""Errors the OS reports about the user's files and disks: one line each, never a traceback. Other
errnos (EBADF, EINVAL, connection errors, ...) point at a bug and keep their traceback."""

_LIBRARY_WRITE_FAILURE = re.compile(r"unexpected pos \d+ vs \d+|file write failed|\(os error (\d+)\)")
"""torch.save reports a full disk as ``[enforce fail at inline_container.cc] . unexpected pos N vs M`` or
``PytorchStreamWriter failed writing file ...: file write failed``; safetensors as ``... (os error 28)``."""


def _shown(name: object) -> str:
    """A path for a message: a temporary ``name.tmp-XXXX`` is shown as the ``name`` it was going to become."""
    text = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)
    head, sep, _ = text.rpartition(TMP_MARK)
    return head if sep and "/" not in text[len(head):] else text


def os_error_line(err: BaseException) -> str | None:
    """``<path>: <cause> [ENAME]; <what to do>`` for an OS error about the user's files or disks (also when
    torch or safetensors wrap one in a RuntimeError), None for anything else (a bug: keep its traceback)."""
    if isinstance(err, OSError):
        code, cause = err.errno, err.strerror or str(err)
        paths = [p for p in (err.filename, err.filename2) if p is not None]
    else:
        wrapped = isinstance(err, RuntimeError) or type(err).__name__ == "SafetensorError"
        match = _LIBRARY_WRITE_FAILURE.search(str(err)) if wrapped else None
        if match is None:
            return None
        if not match.group(1):  # torch names neither the file nor the errno
            return f"a write failed ({str(err).strip()[:160]}): is the disk full? {_HINTS[errno.ENOSPC]}"
        code, cause, paths = int(match.group(1)), os.strerror(int(match.group(1))), []
    if code not in _HINTS:
        return None
    where = " -> ".join(dict.fromkeys(_shown(p) for p in paths))  # a rename names source and target
    return f"{where + ': ' if where else ''}{cause} [{errno.errorcode[code]}]; {_HINTS[code]}"


def stage_parser(description: str, *, training: bool = False, array_task: bool = False) -> argparse.ArgumentParser:
    """Config arguments, plus ``--resume`` for training stages or the task slot for array stages."""
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser)
    if training:
        parser.add_argument("--resume", default="auto",
                            help="auto (newest good checkpoint), none, or a checkpoint directory")
    if array_task:
        from runtime.array_task import add_task_args

        add_task_args(parser)
    return parser


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser) -> NoReturn:
    """Parse, run, and turn the errors a user can fix into a message and a status, not a traceback:
    :class:`UserError` and OS errors about files and disks (disk full, read-only, name too long, ...).
    A process started by one of our launchers dies with it (runtime/process.py)."""
    from runtime.errors import NonFiniteLossError
    from runtime.process import honour_parent_watch
    from runtime.signals import EXIT_INTERRUPTED

    honour_parent_watch()
    # A path or id with bytes that are not UTF-8 is printed escaped, never a UnicodeEncodeError after the work.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    args = parser.parse_args()
    try:
        sys.exit(main(args))
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which checkpoints and exits 130 itself)
        print(f"interrupted: {parser.prog} stopped; rerun the same command to continue", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except Exception as err:
        line = os_error_line(err)
        if line is None:
            raise
    # Printed after the except block, whose end frees the failed call's frames: a progress bar still open
    # there closes (and prints its last state) first, so the error is the last line.
    print(f"error: {line}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
