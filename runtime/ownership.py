"""What lesion-vq may touch: folders it created carry a marker file, and nothing else is ever moved or deleted.

A run directory and every stage folder we create hold ``.lesion-vq.json`` (``{"owner": "lesion-vq",
"kind": "run"|"stage", "stage": ..., "identity": ...}``). A folder without it is somebody else's:
we refuse to write into it (one line, exit 2) rather than guess. Replacing a stage's outputs never
deletes them: they are moved aside into ``RUN_DIR/.history/`` (see :func:`move_aside`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from runtime.errors import UserError
from runtime.files import TMP_MARK, atomic_write_json

MARKER = ".lesion-vq.json"
OWNER = "lesion-vq"
REPO_ROOT = Path(__file__).resolve().parents[1]


class OwnershipError(UserError):
    """A folder we were asked to write into, or to replace, is not ours."""


def read_marker(folder: Path) -> dict[str, Any] | None:
    """Our marker in ``folder``, or None when it has none (or an unreadable one: then it is not ours)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("owner") == OWNER else None


def write_marker(folder: Path, kind: str, **info: Any) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(folder) / MARKER, {"owner": OWNER, "kind": kind, **info})


def is_within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved, symlinks followed)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def refuse_dangerous_output(out: Path, what: str, inputs: dict[str, Path | None]) -> None:
    """An output must not be (or contain) the repository or any input: writing there could overwrite or, on a
    rerun, replace them; nor lie inside an input folder: what it writes (reconstruction PNGs, samples, shards)
    would be read back as input on the next run. ``inputs`` names each input path (None: not used)."""
    if is_within(REPO_ROOT, out):
        raise OwnershipError(f"{what} {out} is or contains the lesion-vq repository ({REPO_ROOT}); "
                             "choose a folder of its own, e.g. runs/NAME")
    for name, path in inputs.items():
        if path is not None and is_within(path, out):
            raise OwnershipError(f"{what} {out} contains the input {name} {path}; choose another output folder "
                                 "(outputs and inputs must not overlap)")
        if path is not None and Path(path).is_dir() and is_within(out, path):
            raise OwnershipError(f"{what} {out} is inside the input {name} {path}: its outputs would be read "
                                 "back as input on the next run; choose an output folder outside it "
                                 "(outputs and inputs must not overlap)")


def owned_or_empty(folder: Path) -> bool:
    """True when ``folder`` does not exist, is empty, or carries our marker."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return True
    if not folder.is_dir():
        return False
    return read_marker(folder) is not None or not any(folder.iterdir())


def foreign_entries(folder: Path, allowed: set[str]) -> list[str]:
    """Entries of ``folder`` that are neither in ``allowed``, nor our marker (or another rank's marker being
    written), nor folders carrying our marker."""
    out = []
    for entry in sorted(Path(folder).iterdir()):
        if entry.name in allowed or entry.name == MARKER or entry.name.startswith(MARKER + TMP_MARK):
            continue
        if entry.is_dir() and read_marker(entry) is not None:
            continue
        out.append(entry.name)
    return out


def checked_history(parent: Path) -> Path:
    """``parent/.history``, where superseded outputs are kept, refused (one line, before anything moves) when it
    cannot take a rename from ``parent``: a dangling link, not a folder, or on another file system (a link to
    another disk, a quota workaround): outputs are kept by renaming, never by copying and deleting."""
    history = Path(parent) / ".history"
    if history.is_symlink() and not history.exists():
        raise OwnershipError(f"{history} is a symbolic link to {os.readlink(history)!r}, which does not exist; "
                             "create that folder or remove the link (outputs replaced by a rerun are kept there)")
    if history.exists() and not history.is_dir():
        raise OwnershipError(f"{history} exists and is not a folder; move it away (outputs replaced by a rerun are "
                             "kept in .history/)")
    if history.is_dir() and history.stat().st_dev != Path(parent).stat().st_dev:
        raise OwnershipError(f"{history} is on another file system than {parent} (it leads to {history.resolve()}); "
                             "outputs are kept aside by renaming, never by copying and deleting, so it must be on "
                             f"the same file system: move it away (mv {history} {history}.old) and rerun")
    return history


def history_path(folder: Path, label: str) -> Path:
    """A free name under ``folder.parent/.history`` for a superseded folder."""
    base = checked_history(folder.parent) / f"{folder.name}@{label}"
    candidate, n = base, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = base.with_name(f"{base.name}.{n}")
    return candidate


def move_aside(folder: Path, label: str) -> Path:
    """Keep a superseded folder of ours under ``.history/`` (one rename: nothing is copied or deleted)."""
    folder = Path(folder)
    if read_marker(folder) is None:
        raise OwnershipError(f"{folder} was not created by lesion-vq (no {MARKER}); it is left alone. "
                             "Move it away yourself or choose another run_dir")
    target = history_path(folder, label)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder, target)
    return target
