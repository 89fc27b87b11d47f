"""Trust a recorded file only after checking it: inside its folder, and the bytes its producer recorded.

A stage's manifest names the files it made (weights, shards) by a path relative to its own folder and
records each one's sha256. A consumer never opens such a file on the manifest's word alone:
:func:`verified_file` refuses a recorded path that is absolute, contains ``..`` or resolves (symlinks
followed) outside the folder, and a file whose sha256 differs from the recorded one (a copied-over
checkpoint, a file edited or truncated after the fact). Every consumer goes through it: the stages'
input check (runtime/lineage.py), the pipeline's up-to-date and restore checks (launch/plan.py), and the
code that loads weights or reads shards by a recorded name.

    weights = verified_file(folder, manifest["weights"], manifest["weights_sha256"], manifest=folder / "manifest.json")
    problems = recorded_problems(folder, manifest)      # every file a stage manifest records, [] when intact
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from runtime.errors import UserError
from runtime.files import sha256_file
from runtime.stages import MANIFEST


class IntegrityError(UserError):
    """A recorded file that is missing, outside its folder, or not the bytes its manifest recorded."""


def recorded_path(folder: Path, recorded: Any, *, manifest: Path) -> Path:
    """``folder / recorded`` for a path a manifest recorded, refused (one line naming ``manifest``) when it is
    not a plain relative path, contains ``..``, or resolves outside ``folder`` (through a symlink, say)."""
    if not isinstance(recorded, str) or not recorded or "\x00" in recorded:
        raise IntegrityError(f"{manifest}: recorded file {recorded!r} is not a relative path; refusing to follow it "
                             "(a hand-edited or foreign manifest?)")
    parts = PurePosixPath(recorded).parts
    if PurePosixPath(recorded).is_absolute() or ".." in parts or "\\" in recorded:
        raise IntegrityError(f"{manifest}: recorded file {recorded!r} is absolute or contains '..'; refusing to "
                             f"follow it outside {folder} (a hand-edited or foreign manifest?)")
    path = Path(folder) / recorded
    root = Path(folder).resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise IntegrityError(f"{manifest}: recorded file {recorded!r} resolves to {resolved}, outside {root}; "
                             "refusing to follow it")
    return path


def verified_file(folder: Path, recorded: Any, sha256: Any, *, manifest: Path, size: Any = None) -> Path:
    """The file a manifest recorded as ``recorded`` (relative to ``folder``) with content ``sha256`` (and ``size``
    bytes, when recorded: a cheap first check), after checking all (:func:`recorded_path`, then the bytes);
    raises :class:`IntegrityError` naming what differs and how to re-make it. The one check every consumer of a
    recorded file uses."""
    path = recorded_path(folder, recorded, manifest=manifest)
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise IntegrityError(f"{manifest}: {recorded} has no recorded sha256 ({sha256!r}), so it cannot be "
                             "verified; re-make it (python launch/pipeline.py re-makes what is damaged)")
    if not path.is_file():
        raise IntegrityError(f"{path}: missing (or not a file), though {manifest} records it; re-make it "
                             "(python launch/pipeline.py re-makes what is damaged)")
    if isinstance(size, int) and path.stat().st_size != size:
        raise IntegrityError(f"{path}: size {path.stat().st_size} != {size} bytes that {manifest} recorded (cut "
                             "short or changed after it was made); re-make it (python launch/pipeline.py re-makes "
                             "what is damaged)")
    found = sha256_file(path)
    if found != sha256:
        raise IntegrityError(f"{path}: sha256 differs from the one {manifest} recorded ({found[:12]}... vs "
                             f"{sha256[:12]}...): not the file that was made; refusing to use it. Re-make it "
                             "(python launch/pipeline.py re-makes what is damaged)")
    return path


def recorded_files(folder: Path, manifest: dict[str, Any]) -> list[tuple[Path, Any, Any, Path, Any]]:
    """(folder, recorded path, recorded sha256, manifest path, recorded size or None) of every file a stage
    manifest records: its ``weights`` (+ ``weights_sha256``), each entry of its ``shards`` list (``name`` +
    ``sha256`` + ``bytes``), and the same in the manifest of each of its ``splits`` (a sub-folder of that name)."""
    folder = Path(folder)
    where = folder / MANIFEST
    found: list[tuple[Path, Any, Any, Path, Any]] = []
    if "weights" in manifest:
        found.append((folder, manifest["weights"], manifest.get("weights_sha256"), where, None))
    shards = manifest.get("shards")
    if isinstance(shards, list):
        found += [(folder, s.get("name"), s.get("sha256"), where, s.get("bytes")) if isinstance(s, dict)
                  else (folder, s, None, where, None) for s in shards]
    splits = manifest.get("splits")
    if isinstance(splits, dict):
        for split in splits:
            split_dir = recorded_path(folder, split, manifest=where)
            try:
                inner = json.loads((split_dir / MANIFEST).read_text())
            except (OSError, ValueError) as err:
                raise IntegrityError(f"{split_dir / MANIFEST} is missing or unreadable ({err}), though {where} "
                                     "records it; re-make it (python launch/pipeline.py re-makes what is damaged)"
                                     ) from None
            if not isinstance(inner, dict):
                raise IntegrityError(f"{split_dir / MANIFEST} is not a manifest object")
            found += recorded_files(split_dir, inner)
    return found


def recorded_problems(folder: Path, manifest: dict[str, Any], limit: int = 3) -> list[str]:
    """Why the files ``manifest`` records in ``folder`` cannot be trusted (at most ``limit`` reasons; [] when
    every one is inside the folder and has its recorded sha256)."""
    problems: list[str] = []
    try:
        entries = recorded_files(folder, manifest)
    except IntegrityError as err:
        return [str(err)]
    for base, recorded, sha256, where, size in entries:
        try:
            verified_file(base, recorded, sha256, manifest=where, size=size)
        except IntegrityError as err:
            problems.append(str(err))
            if len(problems) >= limit:
                break
    return problems


def verify_recorded(folder: Path, manifest: dict[str, Any]) -> None:
    """Raise :class:`IntegrityError` (the first problem) unless every file ``manifest`` records is intact."""
    problems = recorded_problems(folder, manifest, limit=1)
    if problems:
        raise IntegrityError(problems[0])


def stage_weights(folder: Path, manifest: dict[str, Any]) -> Path:
    """A training stage's final weights file (its manifest's ``weights`` and ``weights_sha256``), verified."""
    return verified_file(folder, manifest.get("weights"), manifest.get("weights_sha256"),
                         manifest=Path(folder) / MANIFEST)
