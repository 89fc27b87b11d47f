"""vqvae/train.py end to end: learning, real 2-process DDP through accelerate launch, wandb offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, stage_env

from runtime.launcher import accelerate_command


def _metrics(run_dir: Path, stage: str = "vqvae") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_loss_goes_down_and_validation_is_measured(tiny_run: Callable[..., Any]) -> None:
    cfg, config = tiny_run("vqvae_train.max_steps=40", "vqvae_train.eval_every=20")
    result = subprocess.run([sys.executable, "vqvae/train.py", "--config", str(config)], cwd=REPO, env=stage_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _metrics(cfg.run_dir)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    val = [r for r in rows if "val/psnr" in r]
    assert [r["step"] for r in val] == [20, 40]
    assert val[-1]["val/psnr"] > val[0]["val/psnr"]
    for key in ("val/mse", "val/ssim", "val/perplexity", "val/code_usage", "val/dead_codes"):
        assert key in val[-1]
    assert (cfg.run_dir / "vqvae" / "recon-step-0000040.png").is_file()
    manifest = json.loads((cfg.run_dir / "vqvae" / "manifest.json").read_text())
    assert manifest["steps"] == 40 and manifest["world_size"] == 1


@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_weights_and_codebooks(tiny_run: Callable[..., Any]) -> None:
    cfg, config = tiny_run()
    argv, env = accelerate_command("vqvae/train.py", ["--config", str(config)], processes=2)
    result = subprocess.run(argv, cwd=REPO, env=stage_env(**env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((cfg.run_dir / "vqvae" / "manifest.json").read_text())
    # Check what actually ran, not the launch flags: accelerate without ACCELERATE_USE_CPU would
    # have started two independent single-process runs.
    assert manifest["distributed_type"] == "MULTI_CPU"
    assert manifest["world_size"] == 2
    digests = manifest["rank_state_digests"]  # every parameter and buffer, EMA codebook included
    assert len(digests) == 2 and digests[0] == digests[1]
    assert "2 processes (DistributedType.MULTI_CPU)" in result.stderr


@pytest.mark.slow
def test_two_process_ddp_of_the_seed_model_ends_identical_batchnorm_included(tiny_run: Callable[..., Any]) -> None:
    """The report's model has BatchNorm: each rank's last forward updates its own running statistics, so
    the ranks used to end different (training then failed its own digest check)."""
    cfg, config = tiny_run("vqvae.arch=seed", "vqvae.channels=[8,16]", "vqvae.code_dim=4", "vqvae_train.max_steps=4")
    argv, env = accelerate_command("vqvae/train.py", ["--config", str(config)], processes=2)
    result = subprocess.run(argv, cwd=REPO, env=stage_env(**env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = json.loads((cfg.run_dir / "vqvae" / "manifest.json").read_text())["rank_state_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


@pytest.mark.slow
def test_wandb_runs_offline_by_default(tiny_run: Callable[..., Any]) -> None:
    cfg, config = tiny_run("wandb=offline", "vqvae_train.max_steps=10")
    env = stage_env()
    env.pop("WANDB_MODE")
    result = subprocess.run([sys.executable, "vqvae/train.py", "--config", str(config)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((cfg.run_dir / "vqvae" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, os.listdir(cfg.run_dir / "vqvae")
    assert any(runs[0].rglob("*.wandb"))  # the offline log that `wandb sync` would upload

