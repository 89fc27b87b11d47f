"""The pipeline on the real local Slurm of ``slurm/local-cluster.sh up --nodes 2``: submitit chain, sbatch
scripts, pre-emption -> checkpoint -> requeue -> resume, failure propagation, and DDP in a job.

Skipped (with the reason) when ``sinfo`` is missing or the cluster is not usable, unless
``LESION_VQ_REQUIRE_SLURM=1`` is set, in which case those situations FAIL instead.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TERMINAL_STATES, FinishedRun, need_slurm, run_quiet, stage_env, tiny_config

from runtime.checkpoint import list_checkpoints
from runtime.config import build_config, save_config
from runtime.stages import downstream

pytestmark = pytest.mark.slurm

PIPELINE = [sys.executable, "launch/pipeline.py"]


# ----- job helpers ---------------------------------------------------------------------------------
def _sacct(job_id: str) -> list[tuple[str, str, str]]:
    """(JobID, State, Reason) rows of a job (one per array task)."""
    out = run_quiet(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,Reason"])
    return [tuple(line.split("|")[:3]) for line in out.stdout.splitlines() if line.count("|") >= 2]  # type: ignore


def _state(job_id: str) -> str:
    rows = _sacct(job_id)
    if not rows:
        return ""
    states = [r[1].split()[0] for r in rows]
    live = [s for s in states if not s.startswith(TERMINAL_STATES)]
    return live[0] if live else ("COMPLETED" if set(states) == {"COMPLETED"} else
                                 next(s for s in states if s != "COMPLETED"))


FINISH_LIMIT_S = 600
"""How long a test job may take to finish: a hang guard, not a speed check. The jobs take about a minute
on an idle machine; on a loaded one the 300-step preempt/requeue jobs ran past an earlier 200 s."""


def _wait(predicate, what: str, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _wait_terminal(job_id: str, timeout: float) -> str:
    try:
        return _wait(lambda: (s := _state(job_id)).startswith(TERMINAL_STATES) and s, f"job {job_id} to finish",
                     timeout)
    except BaseException:
        run_quiet(["scancel", job_id])
        raise


def _sbatch(*args: str, env: dict[str, str]) -> str:
    out = run_quiet(["sbatch", "--parsable", *args], cwd=REPO, env=env)
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def _pipeline(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return run_quiet([*PIPELINE, *args], timeout=timeout, cwd=REPO, env=stage_env())
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"pipeline {' '.join(args)} did not return in {timeout:.0f}s:\n{exc.stdout}\n{exc.stderr}")


def _submitted(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^submitted (\w+)\s+job (\d+)", stdout, flags=re.M))


def _checkpoints(run_dir: Path, stage: str = "vqvae") -> list[Path]:
    return list_checkpoints(run_dir / stage / "checkpoints")  # complete ones only, never a *.tmp-* being written


# ----- 1. a failing stage of a chain through submitit (the whole chain: tests/test_multinode.py) ------
@pytest.fixture(autouse=True)
def _cluster_up() -> None:
    need_slurm()


@pytest.mark.timeout(FINISH_LIMIT_S + 240)  # above the jobs' own hang guard, which names the job state
def test_failing_stage_cancels_dependants_and_rerun_submits_only_missing(finished_run: FinishedRun,
                                                                         tmp_path: Path) -> None:
    # A run directory of its own, with data/vqvae/encode/classifier already complete (copied from the session's
    # finished run) and a short prior to make.
    src, run_dir = finished_run.run_dir, tmp_path / "run"
    for name in ("data", "vqvae", "codes", "classifier"):
        shutil.copytree(src / name, run_dir / name)
    base = json.loads((src / "config.json").read_text())
    save_config(build_config(base=base, overrides=[f"run_dir={run_dir}", "prior_train.max_steps=20"]),
                run_dir / "config.json")
    config = str(run_dir / "config.json")

    # prior_train.lr=1e30 passes validation, but the loss becomes non-finite: the prior job fails.
    t0 = time.monotonic()
    first = _pipeline("--cluster", "--config", config, "prior_train.lr=1e30", timeout=90)
    assert first.returncode == 0, first.stderr[-2000:]
    assert time.monotonic() - t0 < 60, "--cluster without --wait must return at once"
    ids = _submitted(first.stdout)
    remade = downstream({"prior"})  # prior, sample and every stage after them, in pipeline order
    assert list(ids) == remade, first.stdout
    for stage in ("data", "vqvae", "encode", "classifier"):
        assert re.search(rf"stage {stage}\s+skip: up to date, not submitted", first.stdout), first.stdout
    # The chain, as Slurm records it: sample waits on prior, evaluate on sample, report on evaluate.
    show = run_quiet(["scontrol", "show", "job", ids["report"]]).stdout
    assert f"afterok:{ids['evaluate']}" in show or _state(ids["report"]).startswith("CANCELLED"), show
    show = run_quiet(["scontrol", "show", "job", ids["sample"]]).stdout
    assert f"afterok:{ids['prior']}" in show or _state(ids["sample"]).startswith("CANCELLED"), show

    assert _wait_terminal(ids["prior"], FINISH_LIMIT_S).startswith("FAILED")
    for stage in remade[1:]:
        state = _wait_terminal(ids[stage], 60)
        # sacct's Reason is not reliable here ("Dependency" or "None"); the state and "never ran" are.
        assert state.startswith("CANCELLED"), f"{stage}: {state}"
    assert not (run_dir / "samples" / "manifest.json").exists()
    err = next((run_dir / "slurm" / "prior" / ids["prior"]).glob("*_log.err")).read_text()
    assert "loss became" in err, err[-2000:]
    # What `--wait` reports for it: the failed and cancelled stages, their logs, exit status 1.
    report = run_quiet([sys.executable, "-c", "import sys; from launch.cluster import follow; "
                   "from runtime.config import load_config; from pathlib import Path; "
                   f"sys.exit(follow(load_config(Path({config!r})), {ids!r}, poll_s=0.5))"], cwd=REPO, timeout=60)
    assert report.returncode == 1, report.stdout + report.stderr
    assert "stage prior: FAILED" in report.stderr and "stage sample: CANCELLED" in report.stderr, report.stderr
    assert f"slurm/prior/{ids['prior']}" in report.stderr, report.stderr

    # Fixed: only what is missing is submitted, and it completes.
    second = _pipeline("--cluster", "--wait", "--config", config, "prior_train.lr=0.002", timeout=300)
    assert second.returncode == 0, f"{second.stdout}\n{second.stderr[-3000:]}"
    assert list(_submitted(second.stdout)) == remade, second.stdout
    assert (run_dir / "samples" / "manifest.json").is_file()



# ----- 2./3./5. the sbatch scripts -----------------------------------------------------------------
@pytest.mark.timeout(FINISH_LIMIT_S + 240)  # above the jobs' own hang guard, which names the job state
def test_sbatch_train_vqvae_by_hand(tiny_run) -> None:
    cfg, config = tiny_run()
    job = _sbatch("slurm/train_vqvae.sh", "--config", str(config), env=stage_env())
    log = REPO / "logs" / f"lvq-train-vqvae-{job}.out"
    try:
        state = _wait_terminal(job, FINISH_LIMIT_S)
        text = log.read_text() if log.is_file() else "(no log)"
        assert state == "COMPLETED", f"job {job}: {state}\n{text[-3000:]}"
        assert f"job {job} SLURM_RESTART_COUNT=0" in text, text[-2000:]
        manifest = json.loads((Path(cfg.run_dir) / "vqvae" / "manifest.json").read_text())
        assert manifest["steps"] == cfg.vqvae_train.max_steps and manifest["world_size"] == 1
        log.unlink()  # kept for inspection when the test fails
    finally:
        run_quiet(["scancel", job])


def _preempt_when_checkpointed(job: str, run_dir: Path, *signal_args: str) -> int:
    """Wait for the first checkpoint, send the warning signal; returns the step it had reached."""
    _wait(lambda: _state(job) == "RUNNING" and _checkpoints(run_dir), f"job {job} to save a checkpoint", 150, 0.3)
    sent = run_quiet(["scancel", *signal_args, "--signal=USR2", job])
    assert sent.returncode == 0, sent.stderr
    return int(_checkpoints(run_dir)[-1].name.split("-")[1])


def _resumed_step(text: str) -> int:
    steps = [int(s) for s in re.findall(r"resumed from \S+ \(step (\d+)\)", text)]
    assert steps, f"no resume in the log:\n{text[-3000:]}"
    return steps[-1]


# ----- 3. pre-emption through submitit (pipeline --cluster) ----------------------------------------
@pytest.mark.timeout(FINISH_LIMIT_S + 240)  # above the jobs' own hang guard, which names the job state
def test_submitit_preempt_checkpoint_requeue_resume(tiny_run) -> None:
    cfg, config = tiny_run("vqvae_train.max_steps=120")  # signalled after its first checkpoint (step 5)
    run_dir = Path(cfg.run_dir)
    result = _pipeline("--cluster", "--only", "vqvae", "--config", str(config), timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    job = _submitted(result.stdout)["vqvae"]
    try:
        _preempt_when_checkpointed(job, run_dir)
        out_log = run_dir / "slurm" / "vqvae" / job / f"{job}_0_log.out"
        err_log = out_log.with_suffix(".err")
        _wait(lambda: out_log.is_file() and "SLURM_RESTART_COUNT=1" in out_log.read_text(),
              f"job {job} requeued", 150)
        state = _wait_terminal(job, FINISH_LIMIT_S)
        out, err = out_log.read_text(), err_log.read_text()
        assert state == "COMPLETED", f"job {job}: {state}\n{out[-2000:]}\n{err[-3000:]}"
        assert "workers exited after the stop signal; requeueing" in out, out[-3000:]
        assert re.search(r"stop requested \((SIG)?USR2\)", err), err[-3000:]
        assert _resumed_step(err) > 0
        assert json.loads((run_dir / "vqvae" / "manifest.json").read_text())["steps"] == 120
        assert json.loads((run_dir / ".pipeline" / "vqvae.timing.json").read_text())["seconds"] > 0
    finally:
        run_quiet(["scancel", job])


# ----- one cluster truth: the sbatch path takes resources and the warning signal from the config -------
def test_emitted_job_script_carries_the_configs_resources_and_signal(tmp_path: Path) -> None:
    need = ["cluster.train_vqvae.mem_gb=3", "cluster.train_vqvae.time_min=17", "cluster.signal=USR1",
            "cluster.signal_delay_s=45", "cluster.train_vqvae.nodes=2", "cluster.sample.array_parallelism=3"]
    tiny_config(tmp_path / "run", *need)
    config = str(tmp_path / "run" / "config.json")
    vq = run_quiet([*PIPELINE, "--config", config, "--emit-sbatch", "vqvae"], cwd=REPO, timeout=60)
    assert vq.returncode == 0, vq.stderr
    for line in ("#SBATCH --mem=3G", "#SBATCH --time=17", "#SBATCH --signal=USR1@45", "#SBATCH --nodes=2",
                 "#SBATCH --job-name=lvq-train-vqvae"):
        assert line in vq.stdout.splitlines(), vq.stdout
    assert re.search(r'slurm/stage.sh" vqvae --config \S+config.json$', vq.stdout.strip()), vq.stdout
    sample = run_quiet([*PIPELINE, "--config", config, "--emit-sbatch", "sample"], cwd=REPO, timeout=60).stdout
    assert "#SBATCH --array=0-1%3" in sample.splitlines() and "#SBATCH --nodes=1" in sample.splitlines()


@pytest.mark.timeout(FINISH_LIMIT_S + 240)  # above the jobs' own hang guard, which names the job state
def test_job_script_with_2_process_ddp_checkpoints_on_usr1_requeues_and_resumes(tiny_run) -> None:
    """slurm/train_vqvae.sh submits itself with the config's time limit and warning signal (USR1 here); the
    signal reaches both DDP ranks, which agree on one checkpoint, and the requeued job resumes from it."""
    steps = 120  # the signal comes after the first checkpoint (step 5), well before the last step
    cfg, config = tiny_run(f"vqvae_train.max_steps={steps}", "cluster.signal=USR1", "cluster.signal_delay_s=30")
    run_dir = Path(cfg.run_dir)
    out = run_quiet(["slurm/train_vqvae.sh", "--config", str(config)], cwd=REPO,
                    env=stage_env(LESION_VQ_PROCS_PER_NODE="2"))
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    log = REPO / "logs" / f"lvq-train-vqvae-{job}.out"
    try:
        show = run_quiet(["scontrol", "show", "job", job]).stdout
        assert "TimeLimit=01:00:00" in show, show  # cluster.train_vqvae.time_min, not a hard-coded value
        _wait(lambda: _state(job) == "RUNNING" and _checkpoints(run_dir), f"job {job} to save a checkpoint", 150, 0.3)
        assert run_quiet(["scancel", "--signal=USR1", job]).returncode == 0
        _wait(lambda: log.is_file() and "SLURM_RESTART_COUNT=1" in log.read_text(), f"job {job} requeued", 150)
        state = _wait_terminal(job, FINISH_LIMIT_S)
        text = log.read_text()
        assert state == "COMPLETED", f"job {job}: {state}\n{text[-3000:]}"
        assert re.search(r"stop requested \((SIG)?USR1\)", text), text[-3000:]
        assert "checkpoint saved on signal; requeueing" in text and _resumed_step(text) > 0, text[-3000:]
        manifest = json.loads((run_dir / "vqvae" / "manifest.json").read_text())
        assert manifest["steps"] == steps
        assert manifest["world_size"] == 2 and manifest["distributed_type"] == "MULTI_CPU", manifest
        digests = manifest["rank_state_digests"]
        assert len(digests) == 2 and len(set(digests)) == 1, digests
        log.unlink()  # kept for inspection when the test fails
    finally:
        run_quiet(["scancel", job])
