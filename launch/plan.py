"""What a pipeline run will do, decided once before anything runs: the same plan drives ``--dry-run``,
the local run and ``--cluster``, so the dry run prints exactly what a real run does.

Per stage, in registry order: **skip** (outputs complete, same identity), **resume** (same identity,
unfinished: a training continues from its checkpoint, an array redoes missing tasks), **restore** (a
complete output of this identity is kept in ``RUN_DIR/.history/``: renamed back, nothing recomputed),
or **run**. Outputs of another identity (settings changed, an upstream re-made, or ``--from``/``--only``)
are never deleted: they are moved to ``RUN_DIR/.history/FOLDER@IDENTITY`` first. A folder lesion-vq did
not create stops the whole run before anything changes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from runtime.config import RunConfig
from runtime.errors import UserError
from runtime.files import atomic_write_json, read_json
from runtime.integrity import recorded_problems
from runtime.lineage import identity, mismatch_reason, token
from runtime.ownership import MARKER, OwnershipError, checked_history, foreign_entries, move_aside, read_marker
from runtime.stages import MANIFEST, STAGES, RunLayout, Stage, read_manifest, read_stage_manifest

Action = Literal["skip", "resume", "restore", "run"]


class PlanError(UserError):
    pass


@dataclass
class Step:
    stage: Stage
    action: Action
    reason: str
    identity: str | None
    """Known when every upstream output is known now (None: an upstream stage is re-made first)."""
    keep_aside: str | None = None
    """Label under which the current outputs are moved to .history/ before the stage runs."""
    restore_from: Path | None = None

    def describe(self, layout: RunLayout) -> str:
        folder = layout.stage_dir(self.stage.name)
        text = f"{self.action}: {self.reason}"
        if self.keep_aside:
            text += f"; current outputs kept in {folder.parent / '.history' / f'{folder.name}@{self.keep_aside}'}"
        if self.restore_from:
            text += f"; restored from {self.restore_from}"
        return text


def _complete(folder: Path, name: str) -> dict[str, Any] | None:
    if not (folder / MANIFEST).is_file():
        return None
    try:
        return read_stage_manifest(folder, name)
    except UserError:
        return None


def _earlier_format(folder: Path, spec: Stage) -> str:
    """For complete outputs of an earlier manifest format: why they are re-made, in one line ("" otherwise)."""
    try:
        found = read_manifest(folder).get("format")
    except UserError:
        return ""
    if found == spec.manifest_format:
        return ""
    return (f"made by an earlier lesion-vq (manifest {found}, now {spec.manifest_format}"
            f"{': ' + spec.format_change if spec.format_change else ''})")


def _history_match(layout: RunLayout, spec: Stage, ident: str) -> tuple[Path | None, str]:
    """A complete, intact folder of ``ident`` kept in .history/ (None if there is none), and why the kept
    folders of ``ident`` that were found cannot be restored ("" if none was refused)."""
    history = layout.root / ".history"
    refused = ""
    for candidate in sorted(history.glob(f"{spec.folder}@{ident}*")) if history.is_dir() else []:
        manifest = _complete(candidate, spec.name)
        if candidate.is_symlink() or manifest is None or manifest.get("identity") != ident \
                or read_marker(candidate) is None:
            continue
        damaged = recorded_problems(candidate, manifest, limit=1)  # restored only as it was recorded
        if not damaged:
            return candidate, ""
        refused = f"; the outputs kept in {candidate} cannot be restored ({damaged[0]})"
    return None, refused


def _data_fingerprint(cfg: RunConfig) -> str:
    from shards.fingerprint import input_fingerprint

    return input_fingerprint(cfg.data)


def make_plan(cfg: RunConfig, selected: list[str], forced: set[str]) -> list[Step]:
    """One step per selected stage; raises (before anything changes) on foreign folders or missing inputs."""
    layout = RunLayout.of(cfg)
    tokens: dict[str, str | None] = {}  # each stage's output token once its step has run (None: not known yet)
    steps: list[Step] = []
    remade: set[str] = set()
    for spec in STAGES:
        folder = layout.stage_dir(spec.name)
        current = _complete(folder, spec.name)
        if spec.name not in selected:
            tokens[spec.name] = token(current) if current else None
            continue
        marker = read_marker(folder) if folder.is_dir() else None
        if (folder.exists() or folder.is_symlink()) and marker is None and not _empty_dir(folder):
            raise OwnershipError(f"{folder} already holds files lesion-vq did not create (no {MARKER}); nothing "
                                 "was changed. Move them elsewhere or choose another run_dir")
        step = _step(cfg, spec, folder, current, marker, tokens, remade, forced, layout)
        if step.keep_aside or step.restore_from:
            checked_history(layout.root)  # refused now, before any step moves anything
        steps.append(step)
        if step.action in ("run", "resume"):
            remade.add(spec.name)
            tokens[spec.name] = None
        else:
            manifest = current if step.action == "skip" else _complete(step.restore_from, spec.name)  # type: ignore[arg-type]
            tokens[spec.name] = token(manifest) if manifest else None
    return steps


def _empty_dir(folder: Path) -> bool:
    return folder.is_dir() and not foreign_entries(folder, set())


def _step(cfg: RunConfig, spec: Stage, folder: Path, current: dict[str, Any] | None, marker: dict[str, Any] | None,
          tokens: dict[str, str | None], remade: set[str], forced: set[str], layout: RunLayout) -> Step:
    has_outputs = marker is not None and any(p.name != MARKER for p in folder.iterdir())
    old_label = str(marker.get("identity")) if marker else None
    if spec.always_rerun:
        return Step(spec, "run", "always re-made (a summary of the stages before it)", None)
    waiting = [u for u in spec.upstream if u in remade]
    if waiting:
        return Step(spec, "run", f"upstream {', '.join(waiting)} is re-made first", None,
                    keep_aside=old_label if has_outputs else None)
    missing = [u for u in spec.upstream if tokens.get(u) is None]
    if missing:
        raise PlanError(f"stage {spec.name} needs {', '.join(missing)}, which has not completed in {layout.root}; "
                        f"run it first (python launch/pipeline.py --from {missing[0]})")
    upstream = {u: str(tokens[u]) for u in spec.upstream}
    ident = identity(cfg, spec.name, upstream, _data_fingerprint(cfg) if spec.name == "data" else None)
    forced_now = spec.name in forced
    damaged: list[str] = []
    if marker is not None and old_label == ident and not forced_now:
        if current is not None and current.get("identity") == ident:
            damaged = recorded_problems(folder, current, limit=1)  # "up to date" only as it was recorded
            if not damaged:
                return Step(spec, "skip", "up to date", ident)
        elif has_outputs:
            return Step(spec, "resume", "unfinished outputs of these settings are continued", ident)
    if forced_now:
        reason = "forced (--from/--only)"
    elif damaged:
        reason = f"its files changed after they were made ({damaged[0]})"
    elif current is not None:
        reason = f"changed since it was made ({mismatch_reason(cfg, spec.name, current)})"
    elif has_outputs:
        reason = _earlier_format(folder, spec) or "unfinished outputs are of other settings"
    else:
        reason = "not made yet"
    keep = old_label if has_outputs else None
    kept, refused = (None, "") if forced_now else _history_match(layout, spec, ident)
    if kept is not None:
        return Step(spec, "restore", reason + "; outputs of these settings were kept", ident, keep, kept)
    return Step(spec, "run", reason + refused, ident, keep)


def prepare(layout: RunLayout, step: Step) -> Path | None:
    """Before a step runs: keep the current outputs aside, restore kept ones. Returns where they went."""
    folder = layout.stage_dir(step.stage.name)
    kept = None
    if step.keep_aside and (folder.exists() or folder.is_symlink()):
        kept = move_aside(folder, step.keep_aside)
    if step.restore_from is not None:
        os.replace(step.restore_from, folder)
    return kept


# ----- timings (for the report) -----------------------------------------------------------------------
def record_start(layout: RunLayout, name: str) -> None:
    atomic_write_json(layout.timing(name), {"started": time.time(), "seconds": None})


def record_done(layout: RunLayout, name: str) -> None:
    path = layout.timing(name)
    began = read_json(path).get("started") if path.is_file() else None
    atomic_write_json(path, {"started": began, "seconds": None if began is None else time.time() - began})


def stage_timings(layout: RunLayout) -> dict[str, float]:
    """Wall seconds from start to completion of each completed stage (requeues included)."""
    out = {}
    for spec in STAGES:
        path = layout.timing(spec.name)
        if path.is_file() and read_json(path).get("seconds") is not None:
            out[spec.name] = read_json(path)["seconds"]
    return out
