"""Multi-node for real: training as 2-node CPU DDP (gloo) on the 2-node Slurm of
``slurm/local-cluster.sh up --nodes 2`` (two slurmd on this machine), through submitit and through sbatch.

Every trained model is compared with a 2-process run on this machine (accelerate, same config, same data,
same threads per process), which must give bit-identical weights. One ``--cluster --wait`` chain and one
local reference are shared by the tests (module fixtures).

Skipped without a usable 2-node cluster, unless ``LESION_VQ_REQUIRE_SLURM=1``: then they fail (as errors
in the shared ``nodes`` fixture, before any job is submitted).
"""

from __future__ import annotations

import hashlib
import json
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
from helpers import REPO, TERMINAL_STATES, need_slurm_nodes, run_quiet, stage_env, tiny_config

from runtime.checkpoint import list_checkpoints
from runtime.launcher import accelerate_command
from runtime.lineage import claim_run_dir
from runtime.stages import STAGE_NAMES

pytestmark = pytest.mark.slurm

PIPELINE = [sys.executable, "launch/pipeline.py"]
# Both training stages on 2 nodes, one process each (the arrays and single stages stay 1-node jobs).
TWO_NODES = ["cluster.train_vqvae.nodes=2", "cluster.train_vqvae.processes_per_node=1",
             "cluster.train_prior.nodes=2", "cluster.train_prior.processes_per_node=1"]
# Long enough (about 20 s on 2 cores) to be signalled or killed after its first checkpoint (step 5).
LONG = ["vqvae_train.max_steps=60"]
LAUNCH_LINE = re.compile(r"runtime\.launcher: node (\d+) of (\d+) \((\S+)\), rendezvous at (\S+):(\d+)")


# ----- Slurm helpers ---------------------------------------------------------------------------------
def _sacct(job: str, fields: str = "JobID,State,NodeList") -> list[list[str]]:
    """Rows of ``sacct -X`` for a job (one per array task)."""
    out = run_quiet(["sacct", "-n", "-X", "-P", "-j", job, "-o", fields])
    return [line.split("|") for line in out.stdout.splitlines() if line.strip()]


def _state(job: str) -> str:
    """One state for a job or array: the first live one, else COMPLETED only when every task completed."""
    states = [row[1].split()[0] for row in _sacct(job)]
    live = [s for s in states if not s.startswith(TERMINAL_STATES)]
    if live or not states:
        return live[0] if live else ""  # "": sacct does not know the job yet
    return "COMPLETED" if set(states) == {"COMPLETED"} else next(s for s in states if s != "COMPLETED")


def _wait(predicate: Callable[[], Any], what: str, timeout: float, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _wait_terminal(job: str, timeout: float) -> str:
    try:
        return _wait(lambda: (s := _state(job)).startswith(TERMINAL_STATES) and s, f"job {job} to finish", timeout)
    except BaseException:
        run_quiet(["scancel", job])
        raise


def _hostnames(nodelist: str) -> list[str]:
    return run_quiet(["scontrol", "show", "hostnames", nodelist]).stdout.split()


def _node_addr(node: str) -> str:
    show = run_quiet(["scontrol", "show", "node", "--oneliner", node]).stdout
    return re.search(r"\bNodeAddr=(\S+)", show).group(1)  # type: ignore[union-attr]


def _sbatch_two_nodes(script: str, config: Path) -> tuple[str, Path]:
    """``sbatch --nodes=2 slurm/SCRIPT --config C`` by hand; the job id and its log."""
    out = run_quiet(["sbatch", "--parsable", "--nodes=2", script, "--config", str(config)], cwd=REPO,
                    env=stage_env())
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    job = out.stdout.strip().split(";")[0]
    return job, REPO / "logs" / f"lvq-train-vqvae-{job}.out"


def _pipeline(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return run_quiet([*PIPELINE, *args], timeout=timeout, cwd=REPO, env=stage_env())
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"pipeline {' '.join(args)} did not return in {timeout:.0f}s:\n{exc.stdout}\n{exc.stderr}")


# ----- what a 2-node training must show --------------------------------------------------------------
def _assert_two_node_manifest(manifest: dict[str, Any], nodes: list[str]) -> None:
    """World size 2 over gloo, one rank on each node, identical weights on both ranks."""
    assert manifest["world_size"] == 2 and manifest["distributed_type"] == "MULTI_CPU", manifest
    assert sorted(manifest["nodes"]) == sorted(nodes), f"ranks ran on {manifest['nodes']}, job had {nodes}"
    digests = manifest["rank_state_digests"]
    assert len(digests) == 2 and len(set(digests)) == 1, digests


def _assert_rendezvous(log: str, nodes: list[str]) -> None:
    """Each node launched with its own machine rank (SLURM_NODEID read in the task, not expanded once
    on the first node), and both met at the first node's NodeAddr (not its name, not their own)."""
    launches = LAUNCH_LINE.findall(log)
    assert launches, f"no launcher line in the log:\n{log[-3000:]}"
    assert {(int(rank), node) for rank, _, node, _, _ in launches} == {(0, nodes[0]), (1, nodes[1])}, launches
    assert {(total, addr) for _, total, _, addr, _ in launches} == {("2", _node_addr(nodes[0]))}, launches
    assert len({port for *_, port in launches}) == 1, launches


def _same_weights(manifest: dict[str, Any], reference: dict[str, Any]) -> None:
    for key in ("rank_state_digests", "weights_sha256", "steps"):
        assert manifest[key] == reference[key], f"{key}: 2 nodes {manifest[key]} != 2 local processes {reference[key]}"


def _manifest(run_dir: Path, stage: str) -> dict[str, Any]:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def _file_digests(run: Path) -> dict[str, str]:
    """Data, code and sample shards by name: what the arrays and the data job must reproduce."""
    out: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for shard in json.loads((run / "data" / split / "manifest.json").read_text())["shards"]:
            out[f"data/{split}/{shard['name']}"] = shard["sha256"]
    for tar in [*sorted((run / "codes").rglob("*.tar")), *sorted((run / "samples").glob("*.tar"))]:
        out[str(tar.relative_to(run))] = hashlib.sha256(tar.read_bytes()).hexdigest()
    return out


# ----- shared runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nodes() -> list[str]:
    """The two nodes every test needs (each test takes this fixture: it fails or skips them all)."""
    return need_slurm_nodes(2)[:2]


@pytest.fixture(scope="module")
def cores_per_task(nodes: list[str]) -> int:  # nodes: the cluster is checked first
    """The cores a task of a job sees (its affinity), from which the launcher gives each process its
    intra-op threads. The local references use the same count: CPU float sums split over another
    number of threads differ in the last bits, and so would the weights."""
    out = run_quiet(["srun", "-N1", "-n1", sys.executable, "-c", "import os; print(len(os.sched_getaffinity(0)))"],
                    timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def _train_locally(script: str, config: Path, threads: int) -> None:
    """2-process DDP (gloo) on this machine, with ``threads`` per process as each cluster process had."""
    argv, env = accelerate_command(script, ["--config", str(config)], processes=2, threads=threads)
    out = run_quiet(argv, timeout=300, cwd=REPO, env=stage_env(**env))
    assert out.returncode == 0, f"local {script} failed:\n{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, nodes: list[str]  # nodes: the cluster is checked first
          ) -> tuple[Path, subprocess.CompletedProcess[str], dict[str, str]]:
    """``pipeline.py --cluster --wait`` from scratch, both training stages on 2 nodes."""
    run_dir = tmp_path_factory.mktemp("multinode-chain") / "run"
    tiny_config(run_dir, *TWO_NODES)
    result = _pipeline("--cluster", "--wait", "--config", str(run_dir / "config.json"), timeout=480)
    return run_dir, result, dict(re.findall(r"^submitted (\w+)\s+job (\d+)", result.stdout, flags=re.M))


def _local_stage(stage: str, config: Path) -> None:
    out = _pipeline("--only", stage, "--config", str(config), timeout=300)
    assert out.returncode == 0, f"local {stage} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cores_per_task: int) -> Path:
    """The same config on this machine: data (local pipeline) and the VQ-VAE as 2-process DDP."""
    run_dir = tmp_path_factory.mktemp("multinode-reference") / "run"
    tiny_config(run_dir, *TWO_NODES)
    _local_stage("data", run_dir / "config.json")
    _train_locally("vqvae/train.py", run_dir / "config.json", cores_per_task)
    return run_dir


@pytest.fixture(scope="module")
def reference_chain(reference: Path, cores_per_task: int) -> Path:
    """The reference continued to the samples: encode and sample as the local pipeline, the prior as 2-process
    DDP (a fixture of its own, so the tests that only train the VQ-VAE do not depend on the prior)."""
    config = reference / "config.json"
    _local_stage("encode", config)
    _train_locally("prior/train.py", config, cores_per_task)
    _local_stage("sample", config)
    return reference


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory: pytest.TempPathFactory, reference: Path, cores_per_task: int) -> Path:
    """An uninterrupted 2-process VQ-VAE run of the LONG config, on the reference's data."""
    run_dir = tmp_path_factory.mktemp("multinode-long-reference") / "run"
    _long_run(run_dir, reference)
    _train_locally("vqvae/train.py", run_dir / "config.json", cores_per_task)
    return run_dir


def _run_on_reference_data(run_dir: Path, reference: Path, *overrides: str) -> Path:
    """A run dir whose data stage is the reference's (so the weights can be compared), claimed as the pipeline
    claims one before its first stage (a stage by hand runs where the pipeline ran, README). Its config path."""
    cfg = tiny_config(run_dir, *overrides)
    (run_dir / "data").symlink_to(reference / "data", target_is_directory=True)
    claim_run_dir(cfg)
    return run_dir / "config.json"


def _long_run(run_dir: Path, reference: Path, *extra: str) -> Path:
    """The LONG config on the reference's data (what long_reference trained without interruption)."""
    return _run_on_reference_data(run_dir, reference, *LONG, *extra)


def _checkpoints(run_dir: Path) -> list[Path]:
    return list_checkpoints(run_dir / "vqvae" / "checkpoints")


# ----- 1. + 4. the pipeline through submitit -----------------------------------------------------------
@pytest.mark.timeout(900)
def test_pipeline_trains_on_two_nodes_like_two_local_processes(chain, reference_chain: Path,
                                                              nodes: list[str]) -> None:
    run_dir, result, ids = chain
    assert result.returncode == 0, f"cluster chain failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    for stage in ("vqvae", "prior"):
        rows = _sacct(ids[stage])
        assert len(rows) == 1 and rows[0][1] == "COMPLETED", f"{stage}: {rows}"
        assert _hostnames(rows[0][2]) == nodes, f"{stage} job {ids[stage]} ran on {rows[0][2]}"
        manifest = _manifest(run_dir, stage)
        _assert_two_node_manifest(manifest, nodes)
        _same_weights(manifest, _manifest(reference_chain, stage))
        # submitit: one task per node, each with its own log (JOBID_0_log.err on node 0, _1 on node 1).
        logs = sorted((run_dir / "slurm" / stage / ids[stage]).glob("*_log.err"))
        assert len(logs) == 2, logs
        _assert_rendezvous("".join(p.read_text() for p in logs), nodes)


@pytest.mark.timeout(900)
def test_every_stage_of_the_chain_is_a_completed_job_in_order(chain) -> None:
    run_dir, result, ids = chain
    assert result.returncode == 0, f"cluster chain failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    assert list(ids) == list(STAGE_NAMES), result.stdout
    assert "array of 2" in result.stdout
    for stage, job in ids.items():
        rows = _sacct(job)
        assert rows and all(r[1] == "COMPLETED" for r in rows), f"{stage} {job}: {rows}"
    assert (run_dir / "report" / "report.html").is_file() and (run_dir / "samples" / "samples.png").is_file()
    assert list((run_dir / "slurm" / "data").glob("*/*_log.out")), "submitit logs missing"


@pytest.mark.timeout(900)
def test_array_tasks_run_on_the_cluster_nodes_and_match_a_local_run(chain, reference_chain: Path,
                                                                   nodes: list[str]) -> None:
    run_dir, result, ids = chain
    assert result.returncode == 0, "the shared chain failed (see test_pipeline_trains_on_two_nodes_...)"
    for stage in ("encode", "sample"):
        rows = _sacct(ids[stage])
        assert len(rows) == 2 and all(r[1] == "COMPLETED" for r in rows), f"{stage}: {rows}"
        # Which node each task gets is Slurm's choice (least loaded when it is placed: a task that ends before the
        # next is placed frees its node), so only membership is checked; two-node jobs are tested above.
        assert {r[2] for r in rows} <= set(nodes), f"{stage} array tasks ran outside the cluster: {rows}"
    cluster, local = _file_digests(run_dir), _file_digests(reference_chain)
    assert len(cluster) > 10 and cluster.keys() == local.keys(), (sorted(cluster), sorted(local))
    differ = {k: (v, local[k]) for k, v in cluster.items() if local[k] != v}
    assert not differ, f"cluster != local: {differ}"


# ----- 2. sbatch by hand --------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_sbatch_two_nodes_by_hand(reference: Path, nodes: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job, log = _sbatch_two_nodes("slurm/train_vqvae.sh", _run_on_reference_data(run_dir, reference, *TWO_NODES[:2]))
    try:
        state = _wait_terminal(job, 200)
        text = log.read_text() if log.is_file() else "(no log)"
        assert state == "COMPLETED", f"job {job}: {state}\n{text[-3000:]}"
        assert _hostnames(_sacct(job)[0][2]) == nodes
        _assert_rendezvous(text, nodes)
        manifest = _manifest(run_dir, "vqvae")
        _assert_two_node_manifest(manifest, nodes)
        _same_weights(manifest, _manifest(reference, "vqvae"))
        log.unlink()  # kept for inspection when the test fails
    finally:
        run_quiet(["scancel", job])


# ----- 3. the warning signal on 2 nodes -------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_usr2_on_two_nodes_checkpoints_once_requeues_and_resumes(long_reference: Path, reference: Path,
                                                                 nodes: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job, log = _sbatch_two_nodes("slurm/train_vqvae.sh", _long_run(run_dir, reference))
    try:
        _wait(lambda: _state(job) == "RUNNING" and _checkpoints(run_dir), f"job {job} to checkpoint", 150, 0.3)
        # Without --batch/--full: every step of the job, on every node, gets it (not one node only).
        sent = run_quiet(["scancel", "--signal=USR2", job])
        assert sent.returncode == 0, sent.stderr
        _wait(lambda: log.is_file() and "SLURM_RESTART_COUNT=1" in log.read_text(), f"job {job} requeued", 150)
        state = _wait_terminal(job, 240)
        text = log.read_text()
        assert state == "COMPLETED", f"job {job}: {state}\n{text[-3000:]}"
        first, _, second = text.partition("SLURM_RESTART_COUNT=1")
        # Both nodes stopped at one agreed step: both tasks exited 75 ("checkpoint saved"), and the
        # requeued run resumed from exactly that step.
        stop = re.search(r"stop requested \((?:SIG)?USR2\): checkpoint at step (\d+) saved", first)
        assert stop, first[-3000:]
        exited = re.findall(r"srun: error: (\S+): task \d+: Exited with exit code (\d+)", first)
        assert sorted(exited) == [(n, "75") for n in nodes], f"task exits of the first run: {exited}"
        assert "checkpoint saved on signal; requeueing" in first, first[-3000:]
        resumed = re.findall(r"resumed from \S+ \(step (\d+)\)", second)
        assert resumed == [stop.group(1)], f"stopped at {stop.group(1)}, resumed at {resumed}"
        _assert_rendezvous(second, nodes)  # the requeued job again on 2 nodes
        manifest = _manifest(run_dir, "vqvae")
        _assert_two_node_manifest(manifest, nodes)
        _same_weights(manifest, _manifest(long_reference, "vqvae"))
        log.unlink()  # kept for inspection when the test fails
    finally:
        run_quiet(["scancel", job])


@pytest.mark.timeout(600)
def test_usr2_on_two_node_pipeline_job_requeues_and_resumes(long_reference: Path, reference: Path,
                                                            nodes: list[str], tmp_path: Path) -> None:
    """The same through submitit (``--cluster``): one StageJob task per node, the one of global rank 0 requeues."""
    run_dir = tmp_path / "run"
    config = _long_run(run_dir, reference, *TWO_NODES[:2])
    result = _pipeline("--cluster", "--only", "vqvae", "--config", str(config), timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    job = dict(re.findall(r"^submitted (\w+)\s+job (\d+)", result.stdout, flags=re.M))["vqvae"]
    logs = run_dir / "slurm" / "vqvae" / job
    try:
        _wait(lambda: _state(job) == "RUNNING" and _checkpoints(run_dir), f"job {job} to checkpoint", 150, 0.3)
        assert run_quiet(["scancel", "--signal=USR2", job]).returncode == 0
        out0 = logs / f"{job}_0_log.out"
        _wait(lambda: out0.is_file() and "SLURM_RESTART_COUNT=1" in out0.read_text(), f"job {job} requeued", 150)
        state = _wait_terminal(job, 240)
        err = "".join(p.read_text() for p in sorted(logs.glob("*_log.err")))
        assert state == "COMPLETED", f"job {job}: {state}\n{err[-3000:]}"
        assert "workers exited after the stop signal; requeueing" in out0.read_text(), out0.read_text()[-3000:]
        stop = re.search(r"stop requested \((?:SIG)?USR2\): checkpoint at step (\d+) saved", err)
        assert stop, err[-3000:]
        assert re.findall(r"resumed from \S+ \(step (\d+)\)", err) == [stop.group(1)], err[-3000:]
        assert len(LAUNCH_LINE.findall(err)) == 4, "not 2 nodes launched in each of the 2 runs"
        _assert_rendezvous(err, nodes)
        manifest = _manifest(run_dir, "vqvae")
        _assert_two_node_manifest(manifest, nodes)
        _same_weights(manifest, _manifest(long_reference, "vqvae"))
    finally:
        run_quiet(["scancel", job])


# ----- 5. one node's training process dies ----------------------------------------------------------------
def _job_processes(job: str) -> list[psutil.Process]:
    """Processes started for a Slurm job (their environment names it), wherever they are in the tree."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SLURM_JOB_ID") == job:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _training_worker(job: str, node: str) -> psutil.Process | None:
    """The training worker (a torchrun child: LOCAL_RANK set) of ``job`` on Slurm node ``node``."""
    for proc in _job_processes(job):
        try:
            env, cmd = proc.environ(), proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env.get("SLURMD_NODENAME") == node and "LOCAL_RANK" in env and "runtime.launcher" not in cmd:
            return proc
    return None


@pytest.mark.timeout(600)
def test_worker_killed_on_one_node_fails_the_job_promptly_and_a_rerun_resumes(
        long_reference: Path, reference: Path, nodes: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = _long_run(run_dir, reference)
    job, log = _sbatch_two_nodes("slurm/train_vqvae.sh", config)
    try:
        _wait(lambda: _state(job) == "RUNNING" and _checkpoints(run_dir), f"job {job} to checkpoint", 150, 0.3)
        victim = _wait(lambda: _training_worker(job, nodes[1]), f"the worker of job {job} on {nodes[1]}", 30)
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        state = _wait_terminal(job, 120)
        seconds = time.monotonic() - killed
        text = log.read_text()
        assert state.startswith("FAILED"), f"job {job}: {state}\n{text[-3000:]}"
        # The survivor's gloo peer is gone: it fails at its next collective, and srun (--kill-on-bad-exit)
        # ends the other node's task; no waiting for the process-group timeout (600 s).
        assert seconds < 60, f"job {job} took {seconds:.0f}s to fail after the kill"
        print(f"job {job} {state} {seconds:.1f} s after its worker on {nodes[1]} was killed")
        _wait(lambda: not _job_processes(job), f"no process of job {job} left", 30)
        log.unlink()
    finally:
        run_quiet(["scancel", job])

    assert _checkpoints(run_dir), "the killed run left no checkpoint"
    rerun, log = _sbatch_two_nodes("slurm/train_vqvae.sh", config)
    try:
        state = _wait_terminal(rerun, 200)
        text = log.read_text() if log.is_file() else "(no log)"
        assert state == "COMPLETED", f"rerun {rerun}: {state}\n{text[-3000:]}"
        assert [int(s) for s in re.findall(r"resumed from \S+ \(step (\d+)\)", text)][-1] > 0, text[-3000:]
        manifest = _manifest(run_dir, "vqvae")
        _assert_two_node_manifest(manifest, nodes)
        _same_weights(manifest, _manifest(long_reference, "vqvae"))
        log.unlink()
    finally:
        run_quiet(["scancel", rerun])


def test_two_node_cluster_has_two_slurmd_of_its_own(nodes: list[str]) -> None:
    """Two real nodes: each answers for itself (its own slurmd, port and address), both in one partition."""
    shows = {n: run_quiet(["scontrol", "show", "node", "--oneliner", n]).stdout for n in nodes}
    addrs = {n: re.search(r"\bNodeAddr=(\S+)", s).group(1) for n, s in shows.items()}  # type: ignore[union-attr]
    assert len(set(addrs.values())) == 2, addrs
    partitions = {n: re.search(r"\bPartitions=(\S+)", s).group(1) for n, s in shows.items()}  # type: ignore[union-attr]
    assert len(set(partitions.values())) == 1, partitions
    out = run_quiet(["srun", "-N2", "--ntasks-per-node=1", "printenv", "SLURMD_NODENAME"], timeout=60)
    assert out.returncode == 0 and sorted(out.stdout.split()) == nodes, out
