"""Fault injection, pipeline: a crash mid-stage, two pipelines on one run dir, a config changed between runs.

One run directory goes through kill -9 of the whole pipeline during VQ-VAE training (a second pipeline
started meanwhile must be refused at once; fixture ``crashed``), then a rerun that resumes the training and
completes (fixture ``completed``); after it, a rerun with a setting that changes no output, and one with a
changed prior on a copy of the run (so the tests hold in any order). Stage outputs are compared by manifest
bytes, mtimes and the final weights' sha256. The cluster-side "stage failing" case is in tests/test_cluster.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import REPO, assert_ok, copy_run, run_pipeline, stage_env, tiny_config

MANIFESTS = {"data": "data/manifest.json", "vqvae": "vqvae/manifest.json", "encode": "codes/manifest.json",
             "prior": "prior/manifest.json", "sample": "samples/manifest.json"}
EXTRA = ["vqvae_train.max_steps=40", "vqvae_train.checkpoint_every=2", "vqvae_train.eval_every=100"]


def _state(run_dir: Path) -> dict[str, tuple[int, str]]:
    """(mtime, sha256) of every stage manifest that exists."""
    out = {}
    for stage, rel in MANIFESTS.items():
        path = run_dir / rel
        if path.is_file():
            out[stage] = (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def _processes_using(run_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(run_dir) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A pipeline killed with SIGKILL (whole process group: like a node dying) during VQ-VAE training,
    with a second pipeline started on the same run dir while the first was running."""
    run_dir = tmp_path_factory.mktemp("faults-pipeline") / "run"
    config = run_dir.parent / "tiny.json"
    tiny_config(run_dir, *EXTRA)
    (run_dir / "config.json").rename(config)
    log = run_dir.parent / "first.log"
    first = subprocess.Popen([sys.executable, "launch/pipeline.py", "--config", str(config)], cwd=REPO,
                             env=stage_env(), stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True,
                             start_new_session=True)
    lock = run_dir / ".pipeline" / "lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().startswith("pid ")):
        assert first.poll() is None and time.monotonic() < deadline, "first pipeline never took the lock"
        time.sleep(0.01)
    started = time.monotonic()
    second = run_pipeline(config)
    second_s = time.monotonic() - started
    assert first.poll() is None, "the first pipeline ended while the second was checked"

    ckpts = run_dir / "vqvae" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (ckpts.is_dir() and any(re.fullmatch(r"step-\d{8}", n) for n in os.listdir(ckpts))):
        assert first.poll() is None, f"pipeline ended early: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(first.pid, signal.SIGKILL)  # the pipeline's group: its stages run in groups of their own
    first.wait(timeout=60)
    # The kernel's parent-death signal reaches the launcher, which passes SIGTERM on: the worker saves a
    # checkpoint at its next step and exits. Seconds, not "whenever the training ends".
    deadline = time.monotonic() + 30
    while (survivors := _processes_using(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in survivors:  # do not leave anything running, whatever the assertions below say
        proc.kill()
    return {"run_dir": run_dir, "config": config, "second": second, "second_s": second_s,
            "survivors": [p.pid for p in survivors], "killed_at": sorted(os.listdir(ckpts)),
            "before_rerun": _state(run_dir)}


@pytest.mark.slow
def test_second_pipeline_on_the_same_run_dir_fails_at_once_with_a_lock_message(crashed):
    second = crashed["second"]
    assert second.returncode == 2, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    assert "another pipeline is already running on" in second.stderr and str(crashed["run_dir"]) in second.stderr
    assert re.search(r"\(pid \d+ on ", second.stderr), "the message should say who holds the lock"
    assert crashed["second_s"] < 60  # python + torch import time; it does not wait for the lock


@pytest.mark.slow
def test_kill9_of_the_pipeline_leaves_no_process_and_nothing_complete_looking(crashed):
    assert crashed["survivors"] == [], "a stage process outlived its killed pipeline"
    run_dir = crashed["run_dir"]
    assert set(crashed["before_rerun"]) == {"data"}  # vqvae was running: no manifest, nothing after it
    assert json.loads((run_dir / ".pipeline" / "vqvae.timing.json").read_text())["seconds"] is None


@pytest.fixture(scope="module")
def completed(crashed: dict) -> dict:
    """The crashed run, run again to the end."""
    result = run_pipeline(crashed["config"])
    return {**crashed, "rerun": result, "complete": _state(crashed["run_dir"])}


@pytest.mark.slow
def test_rerun_after_the_crash_resumes_training_and_completes(completed):
    run_dir, result = completed["run_dir"], completed["rerun"]
    assert result.returncode == 0, result.stderr[-4000:]
    assert "stage data: skip: up to date" in result.stderr
    assert "stage vqvae: resume" in result.stderr
    resumed = re.search(r"resumed from \S+step-(\d{8}) \(step (\d+)\)", result.stderr)
    assert resumed and int(resumed.group(2)) >= 2, "training started over instead of resuming"
    after = completed["complete"]
    assert after["data"] == completed["before_rerun"]["data"]
    assert set(after) == set(MANIFESTS)
    assert json.loads((run_dir / "vqvae" / "manifest.json").read_text())["steps"] == 40
    assert (run_dir / "report" / "report.html").is_file()


@pytest.mark.slow
def test_changed_setting_that_affects_no_output_redoes_nothing(completed):
    run_dir, before = completed["run_dir"], completed["complete"]
    assert_ok(completed["rerun"])
    result = run_pipeline(completed["config"], "vqvae_train.log_every=3", "prior_train.eval_every=9")
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in MANIFESTS:
        assert f"stage {stage}: skip: up to date" in result.stderr
    assert _state(run_dir) == before


@pytest.mark.slow
def test_changed_prior_config_redoes_prior_and_sampling_only(completed, tmp_path):
    assert_ok(completed["rerun"])
    run_dir, before = copy_run(completed["run_dir"], tmp_path / "run"), completed["complete"]
    weights = (run_dir / "vqvae" / "final" / "model.safetensors").read_bytes()
    # --until sample: the stages after it (judge, augment, export, report) have tests of their own.
    result = run_pipeline(run_dir / "config.json", "prior.filters=24", "--until", "sample")
    assert result.returncode == 0, result.stderr[-4000:]
    after = _state(run_dir)
    for stage in ("data", "vqvae", "encode"):
        assert after[stage] == before[stage], f"{stage} was redone although its inputs did not change"
        assert f"stage {stage}: skip: up to date" in result.stderr
    for stage in ("prior", "sample"):
        assert after[stage] != before[stage], f"{stage} was kept although its inputs changed"
    assert "stage prior: run: changed since it was made (prior.filters: 16 -> 24)" in result.stderr
    assert "resumed from" not in result.stderr
    assert list((run_dir / ".history").glob("prior@*")), "the old prior must be kept, not deleted"
    assert (run_dir / "vqvae" / "final" / "model.safetensors").read_bytes() == weights
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["prior"]["filters"] == 24
    assert json.loads((run_dir / "prior" / "manifest.json").read_text())["settings"]["prior.filters"] == 24
