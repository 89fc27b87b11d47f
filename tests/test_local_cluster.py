"""Smoke tests against the real single-node Slurm started by ``slurm/local-cluster.sh up``.

Skipped (with the reason) when ``sinfo`` is not on PATH or the cluster is not usable, unless
``LESION_VQ_REQUIRE_SLURM=1`` is set, in which case those situations FAIL the tests instead.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REQUIRE = os.environ.get("LESION_VQ_REQUIRE_SLURM") == "1"
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}
TERMINAL_PREFIXES = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
)


def _run(cmd: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@functools.cache
def _cluster_problem() -> str | None:
    """None when the cluster is usable, else a human-readable reason."""
    for tool in ("sinfo", "sbatch", "sacct"):
        if shutil.which(tool) is None:
            return f"`{tool}` not on PATH"
    try:
        info = _run(["sinfo", "-h", "-o", "%T"])
        if info.returncode != 0:
            detail = " | ".join((info.stderr or info.stdout).strip().splitlines())
            return f"`sinfo` failed: {detail[-300:]}"
        states = info.stdout.split()
        if not any(s in USABLE_NODE_STATES for s in states):  # "idle*" = not responding
            return f"no usable node (sinfo states: {states or 'none'})"
        acct = _run(["sacct", "-n", "-X", "-S", "now-1minutes"])
        if acct.returncode != 0:
            return f"`sacct` failed: {(acct.stderr or acct.stdout).strip()[:300]}"
    except subprocess.TimeoutExpired as exc:
        return f"`{' '.join(exc.cmd)}` timed out"
    return None


def _need_cluster() -> None:
    problem = _cluster_problem()
    if problem is None:
        return
    msg = f"local Slurm cluster not usable: {problem} (start it: slurm/local-cluster.sh up)"
    if REQUIRE:
        pytest.fail(f"{msg} [LESION_VQ_REQUIRE_SLURM=1]", pytrace=False)
    pytest.skip(msg)


def _sbatch(*args: str) -> str:
    out = _run(["sbatch", "--parsable", *args])
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def _sacct_state(job_id: str) -> str:
    out = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _wait_terminal(job_id: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = _sacct_state(job_id)
        if state.startswith(TERMINAL_PREFIXES):
            return state
        time.sleep(0.3)
    subprocess.run(["scancel", job_id], check=False, capture_output=True)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f}s (last sacct state: {state!r})")


@pytest.mark.timeout(90)
def test_sbatch_hostname_completes(tmp_path: Path) -> None:
    _need_cluster()
    out_file = tmp_path / "hostname.out"
    job_id = _sbatch("-J", "lvq-hostname", "-o", str(out_file), "--wrap", "hostname")
    state = _wait_terminal(job_id)
    assert state == "COMPLETED", f"job {job_id}: {state}"
    assert out_file.read_text().strip(), "batch output is empty"


@pytest.mark.timeout(90)
def test_failed_afterok_dependency_cancels_dependant(tmp_path: Path) -> None:
    _need_cluster()
    failing = _sbatch("-J", "lvq-fails", "-o", str(tmp_path / "fail.out"), "--wrap", "exit 3")
    # No --kill-on-invalid-dep here: the cluster config (kill_invalid_depend) must do it.
    dependant = _sbatch(
        "-J",
        "lvq-dependant",
        "-d",
        f"afterok:{failing}",
        "-o",
        str(tmp_path / "dep.out"),
        "--wrap",
        "echo must-not-run",
    )
    assert _wait_terminal(failing).startswith("FAILED")
    state = _wait_terminal(dependant)
    assert state.startswith("CANCELLED"), f"dependant {dependant}: {state}"
    assert not (tmp_path / "dep.out").exists(), "dependant ran although its dependency failed"


@pytest.mark.timeout(120)
def test_submitit_roundtrip(tmp_path: Path) -> None:
    _need_cluster()
    submitit = pytest.importorskip("submitit")

    # Nested functions are pickled by value, so the job does not need to import this module.
    def add(a: int, b: int) -> int:
        return a + b

    def boom() -> None:
        raise ValueError("expected failure from test_submitit_roundtrip")

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=5, cpus_per_task=1, name="lvq-submitit")
    ok_job = executor.submit(add, 2, 3)
    bad_job = executor.submit(boom)
    assert ok_job.result() == 5

    # A failing job must raise promptly (submitit learns the state from sacct), not hang.
    t0 = time.monotonic()
    with pytest.raises(submitit.core.utils.FailedJobError, match="expected failure"):
        bad_job.result()
    assert time.monotonic() - t0 < 60
