"""Resuming training: with another number of processes the epoch continues from the recorded sample (logged
and recorded in the manifest), and a run killed after its last checkpoint only writes its outputs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, assert_ok, run_cli, stage_env

from runtime.launcher import accelerate_command


@pytest.mark.slow
def test_resuming_with_another_world_size_continues_the_epoch_and_is_recorded(tmp_path: Path, tiny_run) -> None:
    """Old code resumed a checkpoint of another world size silently, by global step (another data order)."""
    cfg, config = tiny_run("vqvae_train.max_steps=10", "vqvae_train.eval_every=100", "vqvae_train.checkpoint_every=5")
    out = Path(cfg.run_dir) / "vqvae"
    argv, env = accelerate_command("vqvae/train.py", ["--config", str(config)], processes=2)
    assert_ok(subprocess.run(argv, cwd=REPO, env=stage_env(**env), capture_output=True, text=True, timeout=300))
    meta = json.loads((out / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert meta["extra"]["world_size"] == 2
    assert json.loads((out / "manifest.json").read_text())["world_size_changes"] == []
    shutil.rmtree(out / "checkpoints" / "step-00000010")
    (out / "manifest.json").unlink()
    resumed = assert_ok(run_cli("vqvae/train.py", "--config", str(config)))
    assert "with 1 processes instead of 2" in resumed.stderr and "no sample repeated or skipped" in resumed.stderr
    changes = json.loads((out / "manifest.json").read_text())["world_size_changes"]
    assert changes == [{"step": 5, "from": 2, "to": 1, "epoch": meta["epoch"], "position": meta["position"]}]
    assert (meta["epoch"], meta["position"]) != (0, 0)
    # Killed after its last checkpoint, before the manifest: a rerun writes the outputs and trains no further.
    (out / "manifest.json").unlink()
    assert_ok(run_cli("vqvae/train.py", "--config", str(config)))
    assert json.loads((out / "manifest.json").read_text())["steps"] == 10
    assert not (out / "checkpoints" / "step-00000011").exists()
