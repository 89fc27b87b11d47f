"""Helpers shared by test modules (import as ``from helpers import ...``; fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.config import RunConfig, build_config, save_config

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "wandb=disabled",
    "data.num_images=96", "data.image_size=32", "data.shard_max_count=20", "data.workers=1",
    "vqvae.channels=[16,32]", "vqvae.res_blocks=1", "vqvae.codebook_size=32", "vqvae.code_dim=16",
    "vqvae_train.batch_size=8", "vqvae_train.max_steps=20", "vqvae_train.checkpoint_every=5",
    "vqvae_train.eval_every=10", "vqvae_train.eval_batches=2", "vqvae_train.log_every=5",
    "vqvae_train.num_workers=0", "vqvae_train.warmup_steps=0",
    "prior.filters=16", "prior.layers=2", "prior.kernel_size=3", "prior.embed_dim=8",
    "prior_train.batch_size=8", "prior_train.max_steps=20", "prior_train.checkpoint_every=5",
    "prior_train.eval_every=10", "prior_train.eval_batches=2", "prior_train.log_every=5",
    "prior_train.num_workers=0", "prior_train.warmup_steps=0",
    "sample.per_class=1", "sample.num_tasks=2", "encode.num_tasks=2",
]
"""Overrides (on the smoke preset) for runs whose stages each take seconds."""


def tiny_config(run_dir: Path, *extra: str) -> RunConfig:
    """A validated tiny config for ``run_dir``, saved as ``run_dir/config.json``."""
    cfg = build_config("smoke", [*TINY, f"run_dir={run_dir}", *extra])
    save_config(cfg, Path(run_dir) / "config.json")
    return cfg



def stage_env(**extra: str) -> dict[str, str]:
    """Environment for stage subprocesses: quiet, single-threaded math so 2 processes share 2 cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}
