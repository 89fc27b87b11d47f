"""One lineage: what a stage's outputs are made from, computed one way, checked by every stage.

A stage's **identity** is a hash of (its name and manifest format, its config sections without the settings
marked as changing no output (runtime/schema.py), the tokens of its upstream outputs, and for the data stage a content
fingerprint of the input images). Never a path: a moved data set or run directory keeps its identity.
A finished output's **token** is ``identity/content``, where ``content`` hashes the bytes it produced
(shard and weights sha256), so two trainings of one config that ended with different weights are told
apart downstream.

Every manifest records ``identity``, ``content``, ``settings`` (the config values hashed, so a change
can be named), ``upstream`` (tokens read) and ``lineage`` (the token of itself and of every ancestor).
The pipeline's up-to-date check, the trainer's resume guard, array-task markers and pack idempotency
all compare identities from :func:`identity`; :func:`begin_stage` refuses inputs from two lineages.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import UserError
from runtime.integrity import recorded_problems
from runtime.log import get_logger
from runtime.ownership import (
    MARKER,
    OwnershipError,
    foreign_entries,
    move_aside,
    read_marker,
    refuse_dangerous_output,
    write_marker,
)
from runtime.schema import identity_values
from runtime.stages import MANIFEST, STAGE_NAMES, RunLayout, read_stage_manifest, stage, write_manifest

log = get_logger(__name__)

class LineageError(UserError):
    """Inputs that do not belong together (or to this config)."""


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings(cfg: Any, name: str) -> dict[str, Any]:
    """The config values a stage's outputs depend on, as ``{"section.key": value}`` (nested sections as dicts):
    what :func:`runtime.schema.identity_values` keeps of each of its sections (fields marked as changing no
    output, and added settings at their old-behaviour value, are left out)."""
    return {f"{section}.{key}": value for section in stage(name).sections
            for key, value in identity_values(getattr(cfg, section)).items()}


def identity(cfg: Any, name: str, upstream: dict[str, str], inputs: Any = None) -> str:
    return _digest({"stage": name, "format": stage(name).manifest_format, "settings": settings(cfg, name),
                    "upstream": upstream, "inputs": inputs})


def content_digest(parts: Any) -> str:
    """Hash of what an output holds (e.g. a list of shard sha256s, or a weights file's sha256)."""
    return _digest(parts)


def token(manifest: dict[str, Any]) -> str:
    return f"{manifest['identity']}/{manifest['content']}"


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs (for messages)."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old[k]!r} -> (not a setting of this kind: no longer part of the identity)" if k not in new
            else f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in keys if old.get(k) != new.get(k)]


def expected_identity(cfg: Any, name: str, manifest: dict[str, Any]) -> str:
    """The identity this config gives an existing output, from the upstream tokens it was made from."""
    return identity(cfg, name, manifest.get("upstream", {}), manifest.get("inputs_fingerprint"))


def mismatch_reason(cfg: Any, name: str, manifest: dict[str, Any]) -> str:
    changed = changed_settings(manifest.get("settings", {}), settings(cfg, name))
    return "; ".join(changed[:4]) + (" ..." if len(changed) > 4 else "") if changed else "its inputs differ"


@dataclass
class StageRun:
    """A stage process's view of its inputs and output, after every check passed."""

    name: str
    out_dir: Path
    identity: str
    upstream: dict[str, str]
    lineage: dict[str, str]
    settings: dict[str, Any] = field(default_factory=dict)
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs_fingerprint: Any = None

    def claim(self) -> Path:
        """Create the output folder with our marker (once every check has passed: a refusal changes nothing)."""
        if read_marker(self.out_dir) is None:
            write_marker(self.out_dir, "stage", stage=self.name, identity=self.identity)
        return self.out_dir

    def finish(self, content: Any, body: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest (last): body + identity, content, settings, upstream and lineage."""
        content_id = content_digest(content)
        manifest = {"format": stage(self.name).manifest_format, "stage": self.name, **body,
                    "identity": self.identity, "content": content_id, "settings": self.settings,
                    "upstream": self.upstream,
                    "lineage": {**self.lineage, self.name: f"{self.identity}/{content_id}"},
                    "inputs_fingerprint": self.inputs_fingerprint}
        write_manifest(self.out_dir, manifest)
        return manifest


def _check_upstream(cfg: Any, layout: RunLayout | None, name: str,
                    folders: dict[str, Path]) -> tuple[dict, dict, dict]:
    """Upstream manifests, their tokens and the merged lineage; refuses outputs of another config or lineage."""
    def where(stage_name: str) -> Path | None:
        if stage_name in folders:
            return folders[stage_name]
        return None if layout is None else layout.stage_dir(stage_name)

    manifests, tokens, lineage, seen_from = {}, {}, {}, {}
    for up in stage(name).upstream:
        folder = where(up)
        if folder is None:
            raise LineageError(f"{name}: no folder given for its input {up}")
        manifest = read_stage_manifest(folder, up)
        if manifest.get("identity") != expected_identity(cfg, up, manifest):
            raise LineageError(
                f"{folder} was made with other settings than this config ({mismatch_reason(cfg, up, manifest)}); "
                f"refusing to use it for {name}. Rerun {up} first (python launch/pipeline.py re-makes what "
                "changed), or use the config it was made with")
        damaged = recorded_problems(folder, manifest, limit=1)  # weights / shards: the bytes that were recorded
        if damaged:
            shards = f" Check with `python -m shards inspect {folder}`." if "splits" in manifest else ""
            raise LineageError(f"{name}: refusing to {'train' if stage(name).kind == 'training' else 'run'} on its "
                               f"input {up}, which cannot be trusted: {damaged[0]}.{shards}")
        manifests[up], tokens[up] = manifest, token(manifest)
        for ancestor, value in {**manifest.get("lineage", {}), up: token(manifest)}.items():
            if lineage.setdefault(ancestor, value) != value:
                raise LineageError(
                    f"{name}: inputs from two lineages: {folder} was made from {ancestor} {value}, but "
                    f"{seen_from[ancestor]} from {ancestor} {lineage[ancestor]}. Rerun the stages after "
                    f"{ancestor} (python launch/pipeline.py --from {ancestor})")
            seen_from.setdefault(ancestor, folder)
    # An ancestor present in this run dir must be the one the inputs were made from (e.g. code shards
    # copied in from a run with another VQ-VAE are refused, not decoded with the wrong decoder). Direct
    # inputs were read above and are their own tokens: only the further ancestors are read here.
    for ancestor, value in lineage.items():
        on_disk = where(ancestor) if ancestor in STAGE_NAMES and ancestor not in manifests else None
        if on_disk is None or not (on_disk / MANIFEST).is_file():
            continue
        here = token(read_stage_manifest(on_disk, ancestor))
        if here != value:
            raise LineageError(
                f"{name}: its inputs were made from {ancestor} {value}, but {on_disk} holds {ancestor} {here} "
                f"(outputs of another run?). Rerun the stages after {ancestor} "
                f"(python launch/pipeline.py --from {ancestor})")
    return manifests, tokens, lineage


def completed_inputs(cfg: Any, name: str) -> dict[str, dict[str, Any]]:
    """The manifests of stage ``name``'s inputs in the run directory, checked as the stage itself checks them
    (complete, made with this config, one lineage), claiming and writing nothing: for read-only consumers
    such as ``judge/evaluate.py --images``."""
    return _check_upstream(cfg, RunLayout.of(cfg), name, {})[0]


def claim_run_dir(cfg: Any) -> RunLayout:
    """Make sure the run directory is ours (or new), never the repository, never around the inputs."""
    layout = RunLayout.of(cfg)
    root = layout.root
    refuse_dangerous_output(root, "run_dir", {"images": cfg.data.isic_images, "CSV": cfg.data.isic_csv})
    if root.exists() and not root.is_dir():
        raise OwnershipError(f"run_dir {root} exists and is not a folder; choose another run_dir")
    marker = read_marker(root) if root.is_dir() else None
    if marker is not None and marker.get("kind") != "run":
        raise OwnershipError(f"run_dir {root} is a lesion-vq {marker.get('kind')} folder, not a run directory; "
                             "choose another run_dir")
    if marker is None:
        foreign = foreign_entries(root, {"config.json"}) if root.is_dir() else []
        if foreign:
            raise OwnershipError(
                f"run_dir {root} already holds files lesion-vq did not create ({', '.join(foreign[:5])}"
                f"{' ...' if len(foreign) > 5 else ''}); nothing was changed. Choose a new or empty folder")
        write_marker(root, "run")
    return layout


def claim_stage_dir(folder: Path, name: str, ident: str, *, create: bool = True, replace: bool = False) -> None:
    """Accept (and with ``create``, make) a stage's output folder; refuse foreign content, or outputs of
    another identity unless ``replace``: then they are kept in ``.history/`` beside it, never deleted."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OwnershipError(f"{folder} exists and is not a folder; the {name} stage cannot write there")
    marker = read_marker(folder) if folder.is_dir() else None
    if marker is not None and replace and (marker.get("stage"), marker.get("identity")) != (name, ident):
        kept = move_aside(folder, str(marker.get("identity")))
        log.warning("%s held outputs of other settings: kept in %s", folder, kept)
        marker = None
    if marker is None:
        if folder.is_dir() and foreign_entries(folder, set()):
            raise OwnershipError(
                f"{folder} already holds files lesion-vq did not create (no {MARKER}); nothing was changed. "
                "Move them elsewhere or choose another run_dir / output folder")
        if create:
            write_marker(folder, "stage", stage=name, identity=ident)
        return
    if marker.get("stage") != name or marker.get("identity") != ident:
        raise OwnershipError(
            f"{folder} holds {marker.get('stage')} outputs of another configuration or input "
            f"(identity {marker.get('identity')}; this run: {ident}); nothing was changed. "
            "python launch/pipeline.py keeps them under RUN_DIR/.history/ and re-makes the stage; "
            "or use another run_dir")


def begin_stage(cfg: Any, name: str, *, folders: dict[str, Path] | None = None, out_dir: Path | None = None,
                inputs_fingerprint: Any = None, replace: bool = False) -> StageRun:
    """Everything a stage checks before work: run dir ours, inputs of one lineage and of this config,
    output folder ours and of this identity. ``folders`` overrides where upstream outputs are read;
    ``out_dir`` writes outside any run directory (``python -m shards pack --out DIR``); ``replace`` keeps an
    output of other settings aside instead of refusing. The output folder is created by
    :meth:`StageRun.claim`, after the stage's own checks."""
    folders = folders or {}
    layout = claim_run_dir(cfg) if out_dir is None else None  # an explicit output folder: no run dir
    manifests, tokens, lineage = _check_upstream(cfg, layout, name, folders)
    ident = identity(cfg, name, tokens, inputs_fingerprint)
    out = Path(out_dir) if layout is None else layout.stage_dir(name)
    claim_stage_dir(out, name, ident, create=False, replace=replace)
    return StageRun(name, out, ident, tokens, lineage, settings(cfg, name), manifests, inputs_fingerprint)
