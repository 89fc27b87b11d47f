"""Fault injection, processes: kill -9, stop signals, a dying DDP rank and a diverging loss.

Every kill is a real signal to a real training process. After each one the newest checkpoint must
load, nothing half-written may look complete, and the resumed run must end with weights bitwise equal
to one uninterrupted reference run (same config digest, same data), compared by the sha256 of the
final safetensors file and the state digest of every parameter and buffer.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from helpers import REPO, stage_env, tiny_config
from safetensors.torch import load_file

from bench.common import free_port
from runtime.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, verify_checkpoint
from runtime.config import load_config
from runtime.launcher import accelerate_command
from runtime.signals import EXIT_REQUEUE
from vqvae.models import build_vqvae

# checkpoint_every / eval_every do not change the weights (nor the config digest), so every run below
# is comparable with the reference; checkpoint_every=1 makes checkpoint writes frequent (kill windows).
BASE = ["vqvae_train.max_steps=40", "vqvae_train.eval_every=100", "vqvae_train.checkpoint_every=1"]
DDP_END_LIMIT_S = 120


def _make_run(root: Path, tiny_data: Path, name: str, *extra: str) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    tiny_config(run_dir, *BASE, *extra)
    (run_dir / "data").symlink_to(tiny_data, target_is_directory=True)
    return run_dir


def _train_argv(run_dir: Path) -> list[str]:
    return [sys.executable, "vqvae/train.py", "--config", str(run_dir / "config.json")]


def _start(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, env=env or stage_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _run(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    return _finish(_start(argv, env))


def _ckpt_names(run_dir: Path) -> list[str]:
    folder = run_dir / "vqvae" / "checkpoints"
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _newest_step(names: list[str]) -> int:
    steps = [int(n[5:13]) for n in names if re.fullmatch(r"step-\d{8}", n)]
    return max(steps, default=-1)


def _wait_for(proc: subprocess.Popen, run_dir: Path, ready: Callable[[list[str]], bool], limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not ready(_ckpt_names(run_dir)):
        assert proc.poll() is None, f"training ended (exit {proc.returncode}) before the fault could be injected"
        assert time.monotonic() < deadline, "fault never became injectable"
        time.sleep(0.001)


def _final(run_dir: Path) -> dict[str, Any]:
    manifest = json.loads((run_dir / "vqvae" / "manifest.json").read_text())
    return {"sha": manifest["weights_sha256"], "state": manifest["rank_state_digests"][0], "steps": manifest["steps"]}


def _assert_consistent_after_kill(run_dir: Path) -> Path:
    """The newest checkpoint loads; every listed one verifies; nothing claims the stage is complete."""
    ckpt_dir = run_dir / "vqvae" / "checkpoints"
    for path in list_checkpoints(ckpt_dir):
        verify_checkpoint(path)  # raises if a listed checkpoint is half-written
    latest = latest_checkpoint(ckpt_dir)
    assert latest is not None and latest == list_checkpoints(ckpt_dir)[-1]
    cfg = load_config(run_dir / "config.json")
    model = build_vqvae(cfg.vqvae)
    state = load_checkpoint(latest, model, torch.optim.Adam(model.parameters()))
    assert state.step == int(latest.name[5:])
    assert all(torch.isfinite(t.float()).all() for t in load_file(str(latest / "model.safetensors")).values())
    assert not (run_dir / "vqvae" / "manifest.json").exists(), "an interrupted stage looks complete"
    return latest


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, Any]:
    """One uninterrupted run, shared by every comparison in this module."""
    run_dir = _make_run(tmp_path_factory.mktemp("faults-ref"), tiny_data, "ref")
    code, err = _run(_train_argv(run_dir))
    assert code == 0, err[-3000:]
    return _final(run_dir)


@pytest.mark.slow
def test_kill9_at_random_steps_and_mid_checkpoint_write_resumes_bitwise(reference, tmp_path, tiny_data):
    run_dir = _make_run(tmp_path, tiny_data, "killed")
    rng = random.Random(20240611)
    a, b, c = sorted(rng.sample(range(3, 37), 3))
    plans = [
        ("after a checkpoint", lambda names: _newest_step(names) >= a),
        # the checkpoint of step >= b is being written: its *.tmp-* directory exists
        ("during a checkpoint write", lambda names: _newest_step(names) >= b - 1
         and any(".tmp-" in n for n in names)),
        ("mid-step", lambda names: _newest_step(names) >= c),
    ]
    resumed_from = []
    for label, ready in plans:
        proc = _start(_train_argv(run_dir))
        _wait_for(proc, run_dir, ready)
        if label == "mid-step":
            time.sleep(rng.uniform(0.0, 0.03))
        os.kill(proc.pid, signal.SIGKILL)
        code, err = _finish(proc)
        assert code == -signal.SIGKILL, f"{label}: not killed ({code}): {err[-2000:]}"
        if resumed_from:
            assert f"resumed from {resumed_from[-1]}" in err  # each restart resumed, did not start over
        latest = _assert_consistent_after_kill(run_dir)
        resumed_from.append(latest)
    code, err = _run(_train_argv(run_dir))
    assert code == 0, err[-3000:]
    assert f"resumed from {resumed_from[-1]}" in err
    assert _final(run_dir) == reference
    leftovers = [n for n in _ckpt_names(run_dir) if ".tmp-" in n]
    assert leftovers == [], f"stale temporary checkpoints kept: {leftovers}"


@pytest.mark.slow
def test_stop_signal_checkpoints_exits_75_and_resume_is_bitwise_identical(reference, tmp_path, tiny_data):
    # SIGTERM here, Slurm's USR2 to the whole group below: one handler, each signal tried once.
    sig = signal.SIGTERM
    run_dir = _make_run(tmp_path, tiny_data, "stopped", "vqvae_train.checkpoint_every=7")
    proc = _start(_train_argv(run_dir))
    _wait_for(proc, run_dir, lambda names: _newest_step(names) >= 7)
    os.kill(proc.pid, sig)
    code, err = _finish(proc)
    assert code == EXIT_REQUEUE, err[-3000:]
    match = re.search(rf"stop requested \({sig.name}\): checkpoint at step (\d+) saved, exiting 75", err)
    assert match, err[-3000:]
    step = int(match.group(1))
    assert latest_checkpoint(run_dir / "vqvae" / "checkpoints").name == f"step-{step:08d}"
    _assert_consistent_after_kill(run_dir)
    code, err = _run(_train_argv(run_dir))
    assert code == 0 and f"step-{step:08d} (step {step})" in err, err[-3000:]
    assert _final(run_dir) == reference


@pytest.mark.slow
def test_stop_signal_to_every_process_loader_workers_included_still_checkpoints(reference, tmp_path, tiny_data):
    """Slurm's time limit, ``scancel`` and ``--signal`` reach every process of the step, the DataLoader's workers
    too: a worker killed by the signal must not turn the main process's checkpoint-and-exit into a crash."""
    sig = signal.SIGUSR2
    run_dir = _make_run(tmp_path, tiny_data, "group", "vqvae_train.checkpoint_every=7", "vqvae_train.num_workers=2")
    proc = _start(_train_argv(run_dir))
    _wait_for(proc, run_dir, lambda names: _newest_step(names) >= 7)
    loader_workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(loader_workers) >= 2, "the run has no DataLoader workers to signal"
    os.killpg(proc.pid, sig)  # the group: the trainer and its loader workers (started in a session of its own)
    code, err = _finish(proc)
    assert code == EXIT_REQUEUE and "Traceback" not in err, err[-3000:]
    step = int(re.search(rf"stop requested \({sig.name}\): checkpoint at step (\d+) saved", err).group(1))
    assert latest_checkpoint(run_dir / "vqvae" / "checkpoints").name == f"step-{step:08d}"
    deadline = time.monotonic() + 30
    while not _gone(loader_workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(loader_workers), "a DataLoader worker outlived its trainer"
    code, err = _run(_train_argv(run_dir))
    assert code == 0 and f"(step {step})" in err, err[-3000:]
    assert _final(run_dir) == reference  # the workers' batches are the unbroken run's


# ----- 2-process DDP through accelerate launch ----------------------------------------------------
def _ddp(run_dir: Path) -> tuple[list[str], dict[str, str]]:
    argv, env = accelerate_command("vqvae/train.py", ["--config", str(run_dir / "config.json")], processes=2,
                                   main_port=free_port())
    return argv, stage_env(**env)


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if any("vqvae/train.py" in part for part in p.cmdline())]


def _gone(procs: list[psutil.Process]) -> bool:
    return not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _ddp_after_first_checkpoint(tmp_path, tiny_data, name: str) -> tuple[Path, subprocess.Popen, list[psutil.Process]]:
    """A 2-process DDP training run, returned once its first checkpoint (step 5) exists."""
    run_dir = _make_run(tmp_path, tiny_data, name, "vqvae_train.checkpoint_every=5")
    argv, env = _ddp(run_dir)
    proc = _start(argv, env)
    _wait_for(proc, run_dir, lambda names: _newest_step(names) >= 5)
    workers = _workers(proc)
    assert len(workers) == 2
    return run_dir, proc, workers


@pytest.mark.slow
def test_ddp_usr2_to_every_process_checkpoints_exits_75_and_resumes(tmp_path, tiny_data):
    """What ``scancel --signal=USR2`` / ``sbatch --signal=USR2@120`` do: every process of the step gets it."""
    run_dir, proc, workers = _ddp_after_first_checkpoint(tmp_path, tiny_data, "ddp-usr2")
    for p in [psutil.Process(proc.pid), *workers]:
        p.send_signal(signal.SIGUSR2)
    code, err = _finish(proc, timeout=DDP_END_LIMIT_S)
    assert code == EXIT_REQUEUE, err[-3000:]
    step = int(re.search(r"checkpoint at step (\d+) saved, exiting 75", err).group(1))
    assert latest_checkpoint(run_dir / "vqvae" / "checkpoints").name == f"step-{step:08d}"
    _assert_consistent_after_kill(run_dir)
    argv, env = _ddp(run_dir)
    code, err = _run(argv, env)
    assert code == 0 and f"(step {step})" in err, err[-3000:]
    manifest = json.loads((run_dir / "vqvae" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["steps"] == 40
    assert len(set(manifest["rank_state_digests"])) == 1


@pytest.mark.slow
def test_ddp_one_rank_killed_the_others_exit_with_an_error_in_bounded_time(tmp_path, tiny_data):
    run_dir, proc, workers = _ddp_after_first_checkpoint(tmp_path, tiny_data, "ddp-kill")
    started = time.monotonic()
    workers[1].send_signal(signal.SIGKILL)
    code, err = _finish(proc, timeout=DDP_END_LIMIT_S)
    took = time.monotonic() - started
    assert code != 0 and took < DDP_END_LIMIT_S, err[-3000:]
    deadline = time.monotonic() + 30
    while not _gone(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(workers), "a worker outlived the launcher (orphan)"
    _assert_consistent_after_kill(run_dir)
    print(f"launcher ended {took:.1f} s after a rank was killed, exit {code}")


@pytest.mark.slow
def test_ddp_sigterm_to_every_process_exits_75(tmp_path, tiny_data):
    """What ``scancel`` / pre-emption does: SIGTERM to every process, launcher included."""
    run_dir, proc, workers = _ddp_after_first_checkpoint(tmp_path, tiny_data, "ddp-term")
    for p in [psutil.Process(proc.pid), *workers]:
        p.send_signal(signal.SIGTERM)
    code, err = _finish(proc, timeout=DDP_END_LIMIT_S)
    _assert_consistent_after_kill(run_dir)  # holds either way: the workers checkpointed
    assert code == EXIT_REQUEUE, err[-2000:]


@pytest.mark.slow
def test_nonfinite_loss_exits_3_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data):
    run_dir = _make_run(tmp_path, tiny_data, "nan", "vqvae_train.lr=1e30")
    code, err = _run(_train_argv(run_dir))
    assert code == 3, err[-3000:]
    assert "Traceback" not in err
    match = re.search(r"error: vqvae: loss became (nan|inf|-inf) at step (\d+) .*Last good checkpoint: (\S+)\.", err)
    assert match, err[-3000:]
    assert "vqvae_train.lr=1e+30" in err
    step, last = int(match.group(2)), Path(match.group(3))
    assert last.name == f"step-{step:08d}"  # the state right before the step whose loss diverged
    assert _assert_consistent_after_kill(run_dir) == last
    code, err = _run(_train_argv(run_dir))  # a rerun fails the same way; it never ends "complete"
    assert code == 3 and "loss became" in err
    assert not (run_dir / "vqvae" / "manifest.json").exists()


@pytest.mark.slow
def test_a_diverging_critic_is_named_in_the_nonfinite_hint(tmp_path, tiny_data):
    # Only the discriminator's learning rate is absurd: the hint must point at the critic's settings too.
    run_dir = _make_run(tmp_path, tiny_data, "nan-critic", "vqvae_train.adversarial.enabled=true",
                        "vqvae_train.adversarial.disc_layers=1", "vqvae_train.adversarial.lr=1e30")
    code, err = _run(_train_argv(run_dir))
    assert code == 3, err[-3000:]
    assert "Traceback" not in err and "loss became" in err
    assert "vqvae_train.adversarial.lr / .weight" in err
    assert not (run_dir / "vqvae" / "manifest.json").exists()
