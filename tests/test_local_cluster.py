"""Smoke tests against the real Slurm started by ``slurm/local-cluster.sh up [--nodes N]`` (1 node or more).

Skipped (with the reason) when ``sinfo`` is not on PATH or the cluster is not usable, unless
``LESION_VQ_REQUIRE_SLURM=1`` is set, in which case those situations FAIL the tests instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO, TERMINAL_STATES, need_slurm, run_quiet, usable_slurm_nodes

pytestmark = pytest.mark.slurm

def _sbatch(*args: str) -> str:
    out = run_quiet(["sbatch", "--parsable", *args])
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def _sacct_state(job_id: str) -> str:
    out = run_quiet(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _wait_terminal(job_id: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = _sacct_state(job_id)
        if state.startswith(TERMINAL_STATES):
            return state
        time.sleep(0.3)
    subprocess.run(["scancel", job_id], check=False, capture_output=True)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f}s (last sacct state: {state!r})")


@pytest.mark.timeout(90)
def test_sbatch_hostname_completes(tmp_path: Path) -> None:
    need_slurm()
    out_file = tmp_path / "hostname.out"
    job_id = _sbatch("-J", "lvq-hostname", "-o", str(out_file), "--wrap", "hostname")
    state = _wait_terminal(job_id)
    assert state == "COMPLETED", f"job {job_id}: {state}"
    assert out_file.read_text().strip(), "batch output is empty"


@pytest.mark.timeout(90)
def test_failed_afterok_dependency_cancels_dependant(tmp_path: Path) -> None:
    need_slurm()
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
    need_slurm()
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


@pytest.mark.timeout(90)
def test_status_lists_every_node_and_its_own_slurmd() -> None:
    need_slurm()
    if os.geteuid() != 0:  # status recognises its daemons by their /proc environment: root's to read
        pytest.skip("slurm/local-cluster.sh status needs root")
    out = run_quiet([str(REPO / "slurm" / "local-cluster.sh"), "status"], timeout=60)
    assert out.returncode == 0 and "status: UP" in out.stdout, out.stdout + out.stderr
    nodes = usable_slurm_nodes()
    listed = re.search(r"^nodes: (.*)$", out.stdout, flags=re.M)
    assert listed and sorted(listed.group(1).split()) == nodes, out.stdout
    pids = [re.search(rf"slurmd\.{re.escape(n)}\s+running \(pid (\d+)\)", out.stdout) for n in nodes]
    assert all(pids) and len({m.group(1) for m in pids if m}) == len(nodes), out.stdout  # one slurmd per node
