"""Where each pipeline stage lives inside a run directory, and how a stage finds its inputs.

Every stage reads the previous stage's ``manifest.json`` (never a guessed path); a manifest is
written last and atomically, so its presence means the stage finished.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from runtime.config import RunConfig
from runtime.errors import UserError
from runtime.files import read_json

STAGES = ("data", "vqvae", "encode", "prior", "sample", "report")
_DIRS = {"data": "data", "vqvae": "vqvae", "encode": "codes", "prior": "prior", "sample": "samples",
         "report": "report"}
_MAKERS = {
    "data": "python -m shards synth --config RUN_DIR/config.json (or python launch/pipeline.py --only data)",
    "vqvae": "python vqvae/train.py --config RUN_DIR/config.json",
    "encode": "python vqvae/encode.py --config RUN_DIR/config.json",
    "prior": "python prior/train.py --config RUN_DIR/config.json",
    "sample": "python prior/sample.py --config RUN_DIR/config.json",
}


class MissingStageError(UserError):
    pass


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    return Path(cfg.run_dir) / _DIRS[stage]


def require_manifest(cfg: RunConfig, stage: str, path: Path | None = None) -> dict[str, Any]:
    """The completed manifest of ``stage`` (or of an explicit directory), or a clear error."""
    manifest = (path or stage_dir(cfg, stage)) / "manifest.json"
    if not manifest.is_file():
        raise MissingStageError(
            f"{manifest} not found: the {stage} stage has not completed for this run. "
            f"Run it first: {_MAKERS.get(stage, 'python launch/pipeline.py')}")
    return read_json(manifest)


_VOLATILE = frozenset({"created", "config", "inputs"})
"""Manifest keys that say when or where, not what: creation time; and, in training manifests, the full
config (with its run_dir) and input paths, whose relevant parts the ``digest`` entry already covers.
Left out of a manifest's identity, so the same inputs give the same downstream digests (and
byte-identical weights files) in every run directory."""


def _content(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _content(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_content(v) for v in value]
    return value


def manifest_hash(cfg: RunConfig, stage: str, path: Path | None = None) -> str:
    """Identity of a stage's outputs as seen by its consumers: sha256 of its manifest's content."""
    manifest = read_json((path or stage_dir(cfg, stage)) / "manifest.json")
    return hashlib.sha256(json.dumps(_content(manifest), sort_keys=True).encode()).hexdigest()[:16]
