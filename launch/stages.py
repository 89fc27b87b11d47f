"""The pipeline's stages: their commands, inputs, and whether their outputs are up to date.

A stage is up to date when its ``manifest.json`` exists and the pipeline's record of it
(``RUN_DIR/.pipeline/STAGE.json``) says it was made from the same config sections and the same
upstream manifests (by hash). Changing a config section or an upstream output therefore redoes that
stage and everything after it, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.config import RunConfig, SlurmResources
from runtime.files import atomic_write_json, read_json
from runtime.launcher import accelerate_command
from runtime.stages import STAGES, manifest_hash, stage_dir
from runtime.trainer import NOT_AFFECTING_WEIGHTS

# Which config sections and upstream stages each stage's outputs depend on.
_SECTIONS = {"data": ("data",), "vqvae": ("vqvae", "vqvae_train"), "encode": ("encode",),
             "prior": ("prior", "prior_train"), "sample": ("sample",), "report": ()}
UPSTREAM = {"data": (), "vqvae": ("data",), "encode": ("vqvae", "data"), "prior": ("encode",),
            "sample": ("prior", "vqvae"), "report": ("sample",)}
SCRIPTS = {"vqvae": "vqvae/train.py", "encode": "vqvae/encode.py", "prior": "prior/train.py",
           "sample": "prior/sample.py"}
TRAINING = ("vqvae", "prior")


@dataclass
class StageSpec:
    name: str
    resources: SlurmResources
    tasks: int = 1
    """>1: an array of independent tasks (encode over shards, sample over seeds)."""
    depends: tuple[str, ...] = field(default_factory=tuple)


def stage_specs(cfg: RunConfig) -> list[StageSpec]:
    tasks = {"encode": cfg.encode.num_tasks, "sample": cfg.sample.num_tasks}
    return [StageSpec(name, getattr(cfg.cluster, _resource_key(name)), tasks.get(name, 1), UPSTREAM[name])
            for name in STAGES]


def _resource_key(stage: str) -> str:
    return {"vqvae": "train_vqvae", "prior": "train_prior"}.get(stage, stage)


def stage_command(cfg: RunConfig, stage: str, config_path: Path, *, processes: int = 1,
                  num_machines: int = 1, machine_rank: int = 0, main_address: str = "127.0.0.1",
                  main_port: int = 29500, use_gpu: bool | None = None) -> tuple[list[str], dict[str, str]]:
    """argv + extra env for one task of a stage (array tasks add --shard-index/--num-shards)."""
    config_args = ["--config", str(config_path)]
    if stage == "data":
        return [sys.executable, "-m", "shards", "pack" if cfg.data.source == "isic" else "synth",
                *config_args, "--out", str(stage_dir(cfg, "data"))], {}
    if stage == "report":
        return [sys.executable, "-m", "launch.report", str(cfg.run_dir)], {}
    if stage in TRAINING:
        gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
        optim = cfg.vqvae_train if stage == "vqvae" else cfg.prior_train
        return accelerate_command(SCRIPTS[stage], config_args, processes=processes, num_machines=num_machines,
                                  machine_rank=machine_rank, main_address=main_address, main_port=main_port,
                                  use_gpu=gpu, mixed_precision=optim.mixed_precision,
                                  stop_signal=cfg.cluster.signal)
    return [sys.executable, SCRIPTS[stage], *config_args], {}


def _section_payload(cfg: RunConfig, stage: str) -> dict[str, Any]:
    dumped = cfg.model_dump(mode="json")
    payload = {s: dumped[s] for s in _SECTIONS[stage]}
    for section in ("vqvae_train", "prior_train"):
        if section in payload:
            payload[section] = {k: v for k, v in payload[section].items() if k not in NOT_AFFECTING_WEIGHTS}
    return payload


def fingerprint(cfg: RunConfig, stage: str) -> str | None:
    """Hash of what the stage's outputs depend on; None while an upstream stage is incomplete."""
    upstream = {}
    for up in UPSTREAM[stage]:
        if not (stage_dir(cfg, up) / "manifest.json").is_file():
            return None
        upstream[up] = manifest_hash(cfg, up)
    blob = json.dumps({"sections": _section_payload(cfg, stage), "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _record_path(cfg: RunConfig, stage: str, kind: str) -> Path:
    return Path(cfg.run_dir) / ".pipeline" / f"{stage}.{kind}.json"


def is_up_to_date(cfg: RunConfig, stage: str) -> bool:
    if stage == "report":
        return False  # cheap, and it should always show the latest state
    fp = fingerprint(cfg, stage)
    record = _record_path(cfg, stage, "done")
    manifest = stage_dir(cfg, stage) / "manifest.json"
    if fp is None or not (record.is_file() and manifest.is_file()):
        return False
    done = read_json(record)
    return done.get("fingerprint") == fp and done.get("manifest") == manifest_hash(cfg, stage)


def prepare_stage(cfg: RunConfig, stage: str, *, force: bool) -> str:
    """Before running a stage: wipe outputs made from other inputs (or all, when forced), so a
    half-finished run of the SAME inputs is resumed and anything else starts clean. Returns a status."""
    fp = fingerprint(cfg, stage)
    started = _record_path(cfg, stage, "started")
    out = stage_dir(cfg, stage)
    previous = read_json(started).get("fingerprint") if started.is_file() else None
    status = "start"
    if out.exists() and (force or previous != fp):
        shutil.rmtree(out)
        status = "redo"
    elif out.exists():
        status = "resume"
    _record_path(cfg, stage, "done").unlink(missing_ok=True)
    atomic_write_json(started, {"fingerprint": fp, "time": time.time()})
    return status


def mark_stage_done(cfg: RunConfig, stage: str) -> None:
    started = _record_path(cfg, stage, "started")
    began = read_json(started).get("time") if started.is_file() else None
    now = time.time()
    atomic_write_json(_record_path(cfg, stage, "done"), {
        "fingerprint": fingerprint(cfg, stage),
        "manifest": manifest_hash(cfg, stage) if (stage_dir(cfg, stage) / "manifest.json").is_file() else None,
        "time": now, "seconds": None if began is None else now - began})


def stage_timings(cfg: RunConfig) -> dict[str, float]:
    """Wall seconds from start to completion of each completed stage (requeues included)."""
    out = {}
    for stage in STAGES:
        record = _record_path(cfg, stage, "done")
        if record.is_file() and read_json(record).get("seconds") is not None:
            out[stage] = read_json(record)["seconds"]
    return out
