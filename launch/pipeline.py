"""Run the whole lesion-vq chain: data -> train VQ-VAE -> encode -> train prior -> sample -> report.

    python launch/pipeline.py                      # smoke preset, synthetic data, this machine
    python launch/pipeline.py --processes 2        # training stages under accelerate, 2 processes
    python launch/pipeline.py --cluster [--wait]   # every stage a Slurm job (submitit), chained afterok
    python launch/pipeline.py --dry-run            # print the plan only
    python launch/pipeline.py --preset seed data.source=isic data.isic_images=... data.isic_csv=...

A rerun skips stages whose outputs are complete and were made from the same config and upstream
outputs, resumes a half-finished training from its checkpoint, and redoes only what changed.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # `python launch/pipeline.py`: make the repo root importable first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.stages import TRAINING, is_up_to_date, mark_stage_done, prepare_stage, stage_command, stage_specs
from runtime.cli import run_cli
from runtime.config import RunConfig, add_config_args, config_from_args, save_config
from runtime.errors import UserError
from runtime.launcher import REPO_ROOT
from runtime.log import get_logger
from runtime.signals import EXIT_REQUEUE
from runtime.stages import STAGES, stage_dir

log = get_logger("pipeline")


class PipelineError(UserError):
    pass


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One pipeline per run directory: a second invocation fails at once with a clear message."""
    lock_path = run_dir / ".pipeline" / "lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise PipelineError(f"another pipeline is already running on {run_dir} ({holder}); "
                                "wait for it or use another run_dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def selected_stages(args: argparse.Namespace) -> tuple[list[str], set[str]]:
    """(stages to consider, stages forced to rerun)."""
    if args.only:
        return [args.only], {args.only}
    if args.from_stage:
        chosen = list(STAGES[STAGES.index(args.from_stage):])
        return chosen, set(chosen)
    return list(STAGES), set()


def plan_table(cfg: RunConfig, stages: list[str], forced: set[str], processes: int) -> str:
    rows = []
    config_path = Path(cfg.run_dir) / "config.json"
    for spec in stage_specs(cfg):
        if spec.name not in stages:
            continue
        state = "forced" if spec.name in forced else ("up to date" if is_up_to_date(cfg, spec.name) else "run")
        argv, env = stage_command(cfg, spec.name, config_path, processes=processes)
        res = spec.resources
        rows.append(
            f"[{spec.name}] {state}; depends on: {', '.join(spec.depends) or '-'}; tasks: {spec.tasks}\n"
            f"    resources: nodes={res.nodes} gpus/node={res.gpus_per_node} cpus={res.cpus_per_task} "
            f"mem={res.mem_gb}G time={res.time_min}min partition={res.partition or 'default'}\n"
            f"    command: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(argv)}")
    return "\n".join(rows)


def run_local(cfg: RunConfig, stages: list[str], forced: set[str], processes: int) -> dict[str, float]:
    config_path = Path(cfg.run_dir) / "config.json"
    timings: dict[str, float] = {}
    specs = {s.name: s for s in stage_specs(cfg)}
    for name in stages:
        if name not in forced and is_up_to_date(cfg, name):
            log.info("stage %s: up to date, skipped", name)
            continue
        status = prepare_stage(cfg, name, force=name in forced)
        log.info("stage %s: %s", name, status)
        started = time.perf_counter()
        tasks = specs[name].tasks if name not in TRAINING else 1
        for index in range(tasks):
            argv, env = stage_command(cfg, name, config_path, processes=processes if name in TRAINING else 1)
            if tasks > 1:
                argv += ["--shard-index", str(index), "--num-shards", str(tasks)]
            result = subprocess.run(argv, env=os.environ | env, cwd=REPO_ROOT, check=False)
            if result.returncode == EXIT_REQUEUE:
                raise PipelineError(f"stage {name} stopped on a signal after checkpointing; rerun to resume")
            if result.returncode != 0:
                raise PipelineError(f"stage {name} failed (exit {result.returncode}); later stages not run. "
                                    f"Fix the cause and rerun: completed stages are kept")
        timings[name] = time.perf_counter() - started
        mark_stage_done(cfg, name)
        log.info("stage %s: done in %.1f s", name, timings[name])
    return timings


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.processes < 1:
        raise PipelineError("--processes must be >= 1")
    stages, forced = selected_stages(args)
    cfg.run_dir = run_dir = Path(cfg.run_dir).resolve()  # stages run from the repo root
    if args.dry_run:
        print(plan_table(cfg, stages, forced, args.processes))
        return 0
    with run_lock(run_dir):
        save_config(cfg, run_dir / "config.json")
        if args.cluster:
            from launch.cluster import submit_pipeline

            return submit_pipeline(cfg, stages, forced, wait=args.wait)
        run_local(cfg, stages, forced, args.processes)
    report = stage_dir(cfg, "report")
    print(f"\nreport:          {report / 'report.html'}\n"
          f"reconstructions: {stage_dir(cfg, 'vqvae')}/recon-step-*.png\n"
          f"samples:         {stage_dir(cfg, 'sample') / 'samples.png'}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(p)
    p.add_argument("--processes", type=int, default=1, help="accelerate processes for the training stages")
    p.add_argument("--cluster", action="store_true", help="submit every stage to Slurm through submitit")
    p.add_argument("--wait", action="store_true", help="with --cluster: follow the jobs until they finish")
    p.add_argument("--dry-run", action="store_true", help="print stages, commands, resources and exit")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--from", dest="from_stage", choices=STAGES, help="force this stage and all after it")
    group.add_argument("--only", choices=STAGES, help="force just this stage (its inputs must exist)")
    return p


if __name__ == "__main__":
    run_cli(main, parser())
