"""Processes die with their pipeline: SIGKILL of the pipeline or the launcher group leaves no worker, Ctrl-C and
SIGTERM checkpoint and exit with one line, and two trainers never share one output folder."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import REPO, assert_one_line_error, run_cli, run_pipeline, stage_env, tiny_config

PIPELINE = [sys.executable, "launch/pipeline.py"]


# ----- 8. one lineage -----------------------------------------------------------------------------------
# A vqvae identity fixed before vqvae_train.adversarial.ramp_steps existed (tiny config, no upstream): adding
# an option must not make outputs of the old behaviour stale, or every upgrade would retrain every stage.
IDENTITY_BEFORE_RAMP_STEPS = "d18fd603ad70cf20"


ENCODE_IDENTITY_BEFORE_TRAIN_VIEWS = "f68e0843571f6430"  # the smoke encode stage's, no upstream


# ----- 5./6. processes die with their pipeline; Ctrl-C checkpoints; one trainer per folder ---------------
def _run_with_training(tmp_path: Path, tiny_data: Path, *extra: str) -> tuple[Path, subprocess.Popen]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "data").symlink_to(tiny_data, target_is_directory=True)
    tiny_config(run_dir, "vqvae_train.max_steps=400", "vqvae_train.checkpoint_every=2",
                "vqvae_train.eval_every=1000")
    proc = subprocess.Popen([*PIPELINE, "--config", str(run_dir / "config.json"), *extra], cwd=REPO,
                            env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = run_dir / "vqvae" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts.is_dir() and any(re.fullmatch(r"step-\d{8}", p.name) for p in ckpts.iterdir())):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training never checkpointed"
        time.sleep(0.1)
    return run_dir, proc


def _stage_processes(pipeline: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(pipeline.pid).children(recursive=True)


def _all_gone(procs: list[psutil.Process], limit: float = 30) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=limit)
    for proc in alive:
        proc.kill()
    return not alive


@pytest.mark.slow
def test_sigkill_of_the_pipeline_and_of_the_launcher_group_leaves_no_worker(tmp_path: Path, tiny_data: Path) -> None:
    run_dir, proc = _run_with_training(tmp_path, tiny_data, "--processes", "2")
    procs = _stage_processes(proc)
    launcher = next(p for p in procs if p.ppid() == proc.pid)
    assert len([p for p in procs if "vqvae/train.py" in " ".join(p.cmdline())]) >= 3  # launcher + 2 workers
    proc.kill()  # SIGKILL of the pipeline: nothing can be passed on by it ...
    psutil.Process(launcher.pid).wait(timeout=30)  # ... the kernel's parent-death signal stops the launcher
    assert _all_gone(procs), "a stage process outlived its killed pipeline"
    rerun = run_pipeline(run_dir / "config.json", "--only", "vqvae", "vqvae_train.max_steps=6", timeout=400)
    # Another max_steps is another identity: the killed run's checkpoints are kept aside, not resumed or lost.
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert list((run_dir / ".history").glob("vqvae@*/checkpoints/step-*"))


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_130_with_one_line(tmp_path: Path, tiny_data: Path) -> None:
    run_dir, proc = _run_with_training(tmp_path, tiny_data)
    procs = _stage_processes(proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert re.search(r"stop requested \(SIGINT\): checkpoint at step (\d+) saved, exiting 130", err), err[-3000:]
    assert "pipeline: stage vqvae stopped on a signal" in err
    assert _all_gone(procs, limit=5)
    assert not (run_dir / "vqvae" / "manifest.json").exists()


@pytest.mark.slow
def test_sigterm_to_the_single_process_launcher_checkpoints_the_worker(tmp_path: Path, tiny_data: Path) -> None:
    _, proc = _run_with_training(tmp_path, tiny_data)
    procs = _stage_processes(proc)
    launcher = next(p for p in procs if p.ppid() == proc.pid)
    launcher.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert re.search(r"stop requested \(SIGTERM\): checkpoint at step \d+ saved, exiting 75", err), err[-3000:]
    assert _all_gone(procs, limit=5)


@pytest.mark.slow
def test_two_trainers_never_share_one_output_folder(tmp_path: Path, tiny_data: Path) -> None:
    run_dir, proc = _run_with_training(tmp_path, tiny_data)
    try:
        second = run_cli("vqvae/train.py", "--config", str(run_dir / "config.json"))
        # After the data check's progress line: the lock is taken once the inputs are known to be good.
        assert_one_line_error(second, f"another vqvae training is writing to {run_dir / 'vqvae'}", "(pid ")
    finally:
        procs = _stage_processes(proc)
        proc.kill()
        _all_gone(procs)
