"""Submit the pipeline to Slurm through submitit: one job per stage, arrays for encode and sample,
chained with ``afterok`` so the whole chain is queued in one call.

    python launch/pipeline.py --cluster --config RUN_DIR/config.json          # queue, print job ids
    python launch/pipeline.py --cluster --wait --config RUN_DIR/config.json   # ... and follow them

What is submitted: every selected stage that is not up to date, plus everything downstream of a
stage that is submitted (its inputs are about to change). A rerun after a failure therefore
resubmits only the failed stage and what depends on it.

Where things land: submitit's files and each job's log under ``RUN_DIR/slurm/STAGE/JOBID/``
(``JOBID_0_log.out`` / ``.err``; array tasks ``JOBID_I/JOBID_I_0_log.*``), the job ids of the last
submission in ``RUN_DIR/.pipeline/jobs.json``.

Both Slurm paths take resources and the warning signal from the config: submitit here, and
``python launch/pipeline.py --emit-sbatch STAGE`` (:func:`sbatch_script`, used by ``slurm/stage.sh``).

Pre-emption: submitit asks Slurm for ``--signal=USR2@N`` (``cluster.signal`` / ``signal_delay_s``).
Slurm signals every process of the job step: the training workers save a checkpoint at the next
step boundary and exit 75, while submitit's handler calls :meth:`StageJob.checkpoint`, which waits
for the workers to finish that checkpoint before submitit requeues the job. The requeued job (same
id, ``SLURM_RESTART_COUNT`` + 1) resumes from the checkpoint (``--resume auto``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import SlurmJobEnvironment

from launch.config import SlurmResources
from launch.plan import Step, prepare, record_done, record_start
from runtime.config import RunConfig, load_config
from runtime.errors import UserError
from runtime.files import atomic_write_json
from runtime.launcher import REPO_ROOT, stage_command, stage_environment
from runtime.log import get_logger
from runtime.signals import STOP_STATUSES
from runtime.stages import RunLayout, Stage
from runtime.stages import stage as stage_spec

log = get_logger("cluster")

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE")


class ClusterError(UserError):
    pass


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the child has exited. Also true for an unreaped child (a zombie): inside a signal handler
    that interrupted ``poll()``, Popen's internal lock is held and ``poll()`` cannot tell."""
    if proc.returncode is not None or proc.poll() is not None:
        return True
    try:
        return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


class StageJob(submitit.helpers.Checkpointable):
    """What runs inside one Slurm job (or one array task) of a stage. Preparing the stage folder (keeping
    old outputs aside) happened at submission; the stage process itself checks lineage and ownership."""

    def __init__(self, config_path: str, stage: str, tasks: int) -> None:
        self.config_path = config_path
        self.stage = stage
        self.tasks = tasks
        self._proc: subprocess.Popen[bytes] | None = None

    def __call__(self, index: int = 0) -> str:
        cfg = load_config(Path(self.config_path))
        spec = stage_spec(self.stage)
        env_info = submitit.JobEnvironment()
        print(f"[lesion-vq] stage {self.stage} job {env_info.job_id} SLURM_RESTART_COUNT="
              f"{os.environ.get('SLURM_RESTART_COUNT', '0')} node {env_info.node}/{env_info.num_nodes}", flush=True)
        argv, env = self._command(cfg, spec, env_info)
        if spec.kind == "array":
            argv += ["--shard-index", str(index), "--num-shards", str(self.tasks)]
        self._proc = subprocess.Popen(argv, env=stage_environment(env), cwd=REPO_ROOT)
        # Poll rather than Popen.wait(): wait() holds Popen's lock while blocked, and the checkpoint()
        # that submitit's signal handler runs on this same thread could then never see the exit.
        while (code := self._proc.poll()) is None:
            time.sleep(0.5)
        if code in STOP_STATUSES:
            # The workers checkpointed on a signal submitit did not see (e.g. SIGTERM on pre-emption):
            # hand over to submitit's own handler, which checkpoints (returns at once) and requeues.
            print(f"[lesion-vq] stage {self.stage}: workers checkpointed and exited {code}; requeueing",
                  flush=True)
            os.kill(os.getpid(), SlurmJobEnvironment._usr_sig())
            time.sleep(30)  # the handler exits the process; reaching the next line means it did not
            raise RuntimeError(f"{self.stage}: checkpointed on a stop signal but could not requeue; "
                               "rerun the pipeline to resume")
        if code != 0:
            raise RuntimeError(f"{self.stage} failed with exit status {code}")
        layout = RunLayout.of(cfg)
        if env_info.global_rank == 0 and layout.manifest(self.stage).is_file():
            record_done(layout, self.stage)
        return f"{self.stage} ok"

    def _command(self, cfg: RunConfig, spec: Stage, env_info: submitit.JobEnvironment
                 ) -> tuple[list[str], dict[str, str]]:
        args = ["--config", self.config_path]
        res = getattr(cfg.cluster, spec.resources)
        if spec.kind != "training":
            return stage_command(cfg, spec, args, use_gpu=res.gpus_per_node > 0)
        # One submitit task per node; every node runs `accelerate launch` with its own machine rank,
        # taken from the job environment at run time (not a $SLURM_NODEID expanded too early).
        port = 20000 + int(str(env_info.job_id).split("_")[0]) % 20000
        processes = int(os.environ.get("LESION_VQ_PROCS_PER_NODE", "0") or 0) or res.processes_per_node
        return stage_command(cfg, spec, args, use_gpu=res.gpus_per_node > 0, processes=processes,
                             num_machines=env_info.num_nodes, machine_rank=env_info.node,
                             main_address=env_info.hostnames[0], main_port=port)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the warning signal: let the workers finish their checkpoint, then requeue."""
        proc = self._proc
        if proc is not None:
            limit = max(10, load_config(Path(self.config_path)).cluster.signal_delay_s - 15)
            deadline = time.monotonic() + limit
            while not _exited(proc) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _exited(proc):
                print(f"[lesion-vq] stage {self.stage}: workers exited after the stop signal; requeueing",
                      flush=True)
            else:
                log.warning("%s: workers did not exit within %d s; the requeued job resumes from the last "
                            "checkpoint", self.stage, limit)
        fresh = StageJob(self.config_path, self.stage, self.tasks)
        return submitit.helpers.DelayedSubmission(fresh, *args, **kwargs)


def job_name(spec: Stage) -> str:
    return "lvq-" + spec.resources.replace("_", "-")


def _setup_lines(cfg: RunConfig) -> list[str]:
    setup = list(cfg.cluster.setup)
    if os.environ.get("LESION_VQ_SETUP"):
        setup.append(os.environ["LESION_VQ_SETUP"])
    return setup


def _executor(cfg: RunConfig, spec: Stage, depends_on: list[str]) -> submitit.AutoExecutor:
    res: SlurmResources = getattr(cfg.cluster, spec.resources)
    executor = submitit.AutoExecutor(folder=RunLayout.of(cfg).slurm_dir(spec.name).resolve() / "%j",
                                     cluster="slurm", slurm_max_num_timeout=cfg.cluster.max_requeues)
    extra: dict[str, Any] = {"requeue": True, "open-mode": "append"}
    if depends_on:
        extra["dependency"] = "afterok:" + ":".join(depends_on)
        extra["kill-on-invalid-dep"] = "yes"
    for key in ("qos", "constraint"):
        if getattr(res, key):
            extra[key] = getattr(res, key)
    params: dict[str, Any] = {
        "name": job_name(spec), "timeout_min": res.time_min,
        "nodes": res.nodes if spec.kind == "training" else 1,
        "tasks_per_node": 1, "cpus_per_task": res.cpus_per_task, "mem_gb": res.mem_gb,
        "slurm_signal_delay_s": cfg.cluster.signal_delay_s,
        "slurm_array_parallelism": res.array_parallelism, "slurm_additional_parameters": extra,
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.partition:
        params["slurm_partition"] = res.partition
    if res.account:
        params["slurm_account"] = res.account
    if _setup_lines(cfg):
        params["slurm_setup"] = _setup_lines(cfg)
    executor.update_parameters(**params)
    return executor


def sbatch_script(cfg: RunConfig, name: str, *, request: list[str] | None = None) -> str:
    """The batch script of one stage, every resource and the warning signal taken from the config (the
    same values submitit is given). ``request``: the arguments that made ``cfg`` (``--config C`` or ``--preset
    P``, then the overrides; default: the run's config.json), given unchanged to the stage in the job, so it runs
    with the config the #SBATCH lines were made from. ``slurm/stage.sh STAGE --config C KEY=VALUE`` pipes it to
    sbatch."""
    spec = stage_spec(name)
    res: SlurmResources = getattr(cfg.cluster, spec.resources)
    request = request if request is not None else ["--config", str(RunLayout.of(cfg).config.resolve())]
    lines = ["#!/usr/bin/env bash", f"# lesion-vq stage {name}: python launch/pipeline.py --emit-sbatch {name}",
             f"#SBATCH --job-name={job_name(spec)}",
             f"#SBATCH --nodes={res.nodes if spec.kind == 'training' else 1}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={res.cpus_per_task}",
             f"#SBATCH --mem={res.mem_gb}G", f"#SBATCH --time={res.time_min}",
             f"#SBATCH --signal={cfg.cluster.signal}@{cfg.cluster.signal_delay_s}",
             "#SBATCH --requeue", "#SBATCH --open-mode=append"]
    if spec.kind == "array":
        lines += [f"#SBATCH --array=0-{spec.tasks(cfg) - 1}%{res.array_parallelism}",
                  f"#SBATCH --output={REPO_ROOT}/logs/%x-%A_%a.out"]
    else:
        lines.append(f"#SBATCH --output={REPO_ROOT}/logs/%x-%j.out")
    optional = {"gpus-per-node": res.gpus_per_node or None, "partition": res.partition, "account": res.account,
                "qos": res.qos, "constraint": res.constraint}
    lines += [f"#SBATCH --{key}={value}" for key, value in optional.items() if value]
    lines += [f"export LESION_VQ_ROOT={shlex.quote(REPO_ROOT)}", *_setup_lines(cfg)]
    lines.append(f'exec "$LESION_VQ_ROOT/slurm/stage.sh" {name} {" ".join(shlex.quote(a) for a in request)}')
    return "\n".join(lines) + "\n"


def _use_signal(name: str) -> None:
    """submitit's warning signal (``--signal=NAME@delay`` and its handler in the job) = cluster.signal."""
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = name  # read by the job (the environment is exported)
    SlurmJobEnvironment.USR_SIG = name  # read here, when the sbatch file is written


def submit_pipeline(cfg: RunConfig, steps: list[Step], *, wait: bool) -> int:
    """Queue every stage the plan runs, chained afterok; returns at once with the job ids (or follows them)."""
    layout = RunLayout.of(cfg)
    config_path = str(layout.config.resolve())
    _use_signal(cfg.cluster.signal)
    job_ids: dict[str, str] = {}
    for step in steps:
        spec = step.stage
        prepare(layout, step)  # outputs of other settings are kept aside now, before any job runs
        if step.action in ("skip", "restore"):
            print(f"stage {spec.name:7s} {step.describe(layout)}, not submitted", flush=True)
            continue
        record_start(layout, spec.name)
        depends = [job_ids[d] for d in spec.upstream if d in job_ids]
        executor = _executor(cfg, spec, depends)
        job = StageJob(config_path, spec.name, spec.tasks(cfg))
        if spec.kind == "array":
            submitted = executor.map_array(job, list(range(spec.tasks(cfg))))
            job_ids[spec.name] = submitted[0].job_id.split("_")[0]
        else:
            job_ids[spec.name] = executor.submit(job).job_id
        array = f" (array of {spec.tasks(cfg)})" if spec.kind == "array" else ""
        after = " afterok:" + ":".join(depends) if depends else ""
        print(f"submitted {spec.name:7s} job {job_ids[spec.name]}{array}{after}: {step.reason}", flush=True)
    if not job_ids:
        print("everything is up to date; nothing submitted")
        return 0
    logs = layout.root.resolve() / "slurm"
    atomic_write_json(layout.jobs, {"time": time.time(), "jobs": job_ids, "logs": str(logs)})
    print(f"logs: {logs}/STAGE/JOBID/\n"
          f"follow with: squeue -u $USER; sacct -X -j {','.join(job_ids.values())} -o JobID,JobName,State,Reason")
    if not wait:
        return 0
    return follow(cfg, job_ids)


# ----- following the jobs --------------------------------------------------------------------------
def sacct_states(job_ids: list[str]) -> dict[str, list[tuple[str, str, str]]]:
    """{job id: [(JobID, State, Reason), ...]} (several rows for an array); empty while sacct lags."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobID,State,Reason,ExitCode"],
                         capture_output=True, text=True, timeout=30, check=False)
    rows: dict[str, list[tuple[str, str, str]]] = {j: [] for j in job_ids}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 4:
            continue
        base = parts[0].split("_")[0].split(".")[0]
        if base in rows:
            rows[base].append((parts[0], parts[1], f"{parts[2]} exit {parts[3]}"))
    return rows


def _stage_state(rows: list[tuple[str, str, str]]) -> str:
    """One word for a stage: PENDING/RUNNING/... until every row (array task) is terminal."""
    if not rows:
        return "UNKNOWN"
    states = [state.split()[0] for _, state, _ in rows]
    live = [s for s in states if not s.startswith(TERMINAL)]
    if live:  # a not-yet-started array range ("12_[1-3]") is PENDING, or CANCELLED when its dependency failed
        return live[0]
    for bad in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
                "CANCELLED"):
        if bad in states:
            return bad
    return "COMPLETED"


def follow(cfg: RunConfig, job_ids: dict[str, str], poll_s: float = 2.0) -> int:
    """Print each stage's state changes until every job has finished; 0 when all completed."""
    last: dict[str, str] = {}
    started = time.monotonic()
    while True:
        rows = sacct_states(list(job_ids.values()))
        states = {stage: _stage_state(rows[jid]) for stage, jid in job_ids.items()}
        for stage, state in states.items():
            if last.get(stage) != state:
                print(f"[{time.monotonic() - started:6.1f}s] {stage:7s} {job_ids[stage]}: {state}", flush=True)
        last = states
        if all(s.startswith(TERMINAL) for s in states.values()):
            break
        time.sleep(poll_s)
    bad = {s: st for s, st in states.items() if st != "COMPLETED"}
    if not bad:
        print(f"all stages completed in {time.monotonic() - started:.0f} s\n"
              f"report: {RunLayout.of(cfg).stage_dir('report') / 'report.html'}")
        return 0
    for stage, state in bad.items():
        reasons = "; ".join(f"{jid} {st} ({why})" for jid, st, why in rows[job_ids[stage]])
        where = RunLayout.of(cfg).slurm_dir(stage).resolve() / f"{job_ids[stage]}*"
        print(f"stage {stage}: {state}: {reasons}\n    log: {where}/*_log.err", file=sys.stderr)
    print("fix the cause and rerun the same command: completed stages are kept and not resubmitted",
          file=sys.stderr)
    return 1
