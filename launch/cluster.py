"""Submit the pipeline to Slurm through submitit: one job per stage, arrays for encode and sample,
chained with ``afterok`` so the whole chain is queued in one call.

Pre-emption: submitit asks Slurm for ``--signal=USR2@N`` and, on that signal, calls
:meth:`StageJob.checkpoint` and requeues the job. The training workers get the same signal (Slurm
signals every process of the job step), save a checkpoint at the next step boundary and exit 75;
``checkpoint`` waits for that before letting submitit requeue, and the requeued job resumes from
the checkpoint (``--resume auto``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import submitit

from launch.stages import TRAINING, is_up_to_date, mark_stage_done, prepare_stage, stage_command, stage_specs
from runtime.config import RunConfig, SlurmResources, load_config
from runtime.launcher import REPO_ROOT
from runtime.log import get_logger
from runtime.signals import EXIT_REQUEUE
from runtime.stages import stage_dir

log = get_logger("cluster")


class StageJob(submitit.helpers.Checkpointable):
    """What runs inside one Slurm job (or one array task) of a stage."""

    def __init__(self, config_path: str, stage: str, tasks: int) -> None:
        self.config_path = config_path
        self.stage = stage
        self.tasks = tasks
        self._proc: subprocess.Popen[bytes] | None = None

    def __call__(self, index: int = 0) -> str:
        cfg = load_config(Path(self.config_path))
        env_info = submitit.JobEnvironment()
        if (self.stage in TRAINING or self.tasks == 1) and env_info.global_rank == 0:
            prepare_stage(cfg, self.stage, force=False)  # resumes if the same inputs started before
        argv, env = self._command(cfg, env_info)
        if self.tasks > 1:
            argv += ["--shard-index", str(index), "--num-shards", str(self.tasks)]
        self._proc = subprocess.Popen(argv, env=os.environ | env, cwd=REPO_ROOT)
        code = self._proc.wait()
        if code == EXIT_REQUEUE:
            raise RuntimeError(f"{self.stage}: checkpointed on a stop signal; waiting to be requeued")
        if code != 0:
            raise RuntimeError(f"{self.stage} failed with exit status {code}")
        if env_info.global_rank == 0 and (stage_dir(cfg, self.stage) / "manifest.json").is_file():
            mark_stage_done(cfg, self.stage)
        return f"{self.stage} ok"

    def _command(self, cfg: RunConfig, env_info: submitit.JobEnvironment) -> tuple[list[str], dict[str, str]]:
        config_path = Path(self.config_path)
        if self.stage not in TRAINING:
            return stage_command(cfg, self.stage, config_path)
        res = getattr(cfg.cluster, "train_vqvae" if self.stage == "vqvae" else "train_prior")
        # One submitit task per node; every node runs `accelerate launch` with its own machine rank,
        # taken from the job environment at run time (not a $SLURM_NODEID expanded too early).
        port = 20000 + int(str(env_info.job_id).split("_")[0]) % 20000
        return stage_command(cfg, self.stage, config_path, processes=res.processes_per_node,
                             num_machines=env_info.num_nodes, machine_rank=env_info.node,
                             main_address=env_info.hostnames[0], main_port=port,
                             use_gpu=res.gpus_per_node > 0)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the warning signal: let the workers finish their checkpoint, then requeue."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout=max(10, load_config(Path(self.config_path)).cluster.signal_delay_s - 15))
            except subprocess.TimeoutExpired:
                log.warning("%s: workers did not exit in time; the requeued job resumes from the last checkpoint",
                            self.stage)
        fresh = StageJob(self.config_path, self.stage, self.tasks)
        return submitit.helpers.DelayedSubmission(fresh, *args, **kwargs)


def _executor(cfg: RunConfig, stage: str, res: SlurmResources, depends_on: list[str]) -> submitit.AutoExecutor:
    folder = Path(cfg.run_dir) / "slurm" / f"submit-{time.strftime('%Y%m%d-%H%M%S')}" / stage / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    extra: dict[str, Any] = {"requeue": True, "open-mode": "append"}
    if depends_on:
        extra["dependency"] = "afterok:" + ":".join(depends_on)
        extra["kill-on-invalid-dep"] = "yes"
    for key in ("qos", "constraint"):
        if getattr(res, key):
            extra[key] = getattr(res, key)
    training = stage in TRAINING
    params: dict[str, Any] = {
        "name": f"lvq-{stage}", "timeout_min": res.time_min, "nodes": res.nodes if training else 1,
        "tasks_per_node": 1, "cpus_per_task": res.cpus_per_task, "mem_gb": res.mem_gb,
        "slurm_signal_delay_s": cfg.cluster.signal_delay_s, "slurm_max_num_timeout": cfg.cluster.max_requeues,
        "slurm_array_parallelism": res.array_parallelism, "slurm_additional_parameters": extra,
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.partition:
        params["slurm_partition"] = res.partition
    if res.account:
        params["slurm_account"] = res.account
    if cfg.cluster.setup:
        params["slurm_setup"] = list(cfg.cluster.setup)
    executor.update_parameters(**params)
    return executor


def submit_pipeline(cfg: RunConfig, stages: list[str], forced: set[str], *, wait: bool) -> int:
    """Queue every stage that is not up to date; returns at once with the job ids (or follows them)."""
    config_path = str((Path(cfg.run_dir) / "config.json").resolve())
    job_ids: dict[str, str] = {}
    jobs: dict[str, list[submitit.Job]] = {}
    for spec in stage_specs(cfg):
        if spec.name not in stages:
            continue
        if spec.name not in forced and is_up_to_date(cfg, spec.name):
            log.info("stage %s: up to date, not submitted", spec.name)
            continue
        if spec.name in forced:
            shutil.rmtree(stage_dir(cfg, spec.name), ignore_errors=True)
        depends = [job_ids[d] for d in spec.depends if d in job_ids]
        executor = _executor(cfg, spec.name, spec.resources, depends)
        job = StageJob(config_path, spec.name, spec.tasks)
        if spec.tasks > 1:
            submitted = executor.map_array(job, list(range(spec.tasks)))
            job_ids[spec.name] = submitted[0].job_id.split("_")[0]
        else:
            submitted = [executor.submit(job)]
            job_ids[spec.name] = submitted[0].job_id
        jobs[spec.name] = submitted
        print(f"submitted {spec.name:7s} job {job_ids[spec.name]}"
              f"{f' (array of {spec.tasks})' if spec.tasks > 1 else ''}"
              f"{f' after {depends}' if depends else ''}", flush=True)
    if not jobs:
        print("everything is up to date; nothing submitted")
        return 0
    if not wait:
        print("follow with: squeue -u $USER; sacct -j " + ",".join(job_ids.values()))
        return 0
    failed = []
    for name, stage_jobs in jobs.items():
        for job in stage_jobs:
            try:
                job.result()
            except Exception as err:  # submitit raises the job's error or a "job died" error
                failed.append(f"{name} ({job.job_id}): {str(err).splitlines()[0] if str(err) else type(err).__name__}")
        print(f"{name}: {'failed' if any(f.startswith(name) for f in failed) else 'done'}", flush=True)
    if failed:
        print("failed stages:\n  " + "\n  ".join(failed))
        return 1
    print(f"report: {stage_dir(cfg, 'report') / 'report.html'}")
    return 0
