"""Run the whole lesion-vq chain: data -> train VQ-VAE -> encode -> train prior -> sample -> report.

    python launch/pipeline.py                      # smoke preset, synthetic data, this machine
    python launch/pipeline.py --processes 2        # training stages under accelerate, 2 processes
    python launch/pipeline.py --cluster [--wait]   # every stage a Slurm job (submitit), chained afterok
    python launch/pipeline.py --dry-run            # print exactly what a run would do
    python launch/pipeline.py --until vqvae        # make what the VQ-VAE needs and it, nothing after it
    python launch/pipeline.py --emit-sbatch vqvae  # the Slurm job script of one stage (pipe it to sbatch)
    python launch/pipeline.py --preset seed data.source=isic data.isic_images=... data.isic_csv=...

A rerun skips stages whose outputs are complete and of the same identity (runtime/lineage.py), resumes
a half-finished training from its checkpoint, and re-makes only what changed; replaced outputs are kept
under RUN_DIR/.history/ (launch/plan.py), never deleted.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # `python launch/pipeline.py`: make the repo root importable first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.plan import Step, make_plan, prepare, record_done, record_start
from runtime.cli import run_cli
from runtime.config import RunConfig, add_config_args, config_from_args, save_config
from runtime.errors import UserError
from runtime.launcher import REPO_ROOT, say_ignored, stage_environment
from runtime.launcher import stage_command as launcher_stage_command
from runtime.lineage import claim_run_dir
from runtime.log import get_logger
from runtime.process import exclusive_lock, preexec_die_with_parent
from runtime.signals import EXIT_INTERRUPTED, EXIT_REQUEUE
from runtime.stages import STAGE_NAMES, RunLayout, Stage, downstream, upstream

log = get_logger("pipeline")


class PipelineError(UserError):
    pass


MAX_PROCESSES = 1024
"""``--processes`` at most: training processes started on one machine."""


class StageStopped(Exception):
    """A stage stopped on a signal after checkpointing: the pipeline exits with ``status``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def selected_stages(args: argparse.Namespace) -> tuple[list[str], set[str]]:
    """(stages to consider, stages forced to be re-made)."""
    if args.only:
        if args.until:
            raise PipelineError("--until cannot be combined with --only (which makes one stage); use one of them")
        return [args.only], {args.only}
    chosen = downstream({args.from_stage}) if args.from_stage else list(STAGE_NAMES)
    forced = set(chosen) if args.from_stage else set()
    if args.until:
        needed = upstream(args.until)
        chosen = [name for name in chosen if name in needed]
        if not chosen:
            raise PipelineError(f"--until {args.until} stops before --from {args.from_stage}: nothing to do")
    return chosen, forced & set(chosen)


def job_request(args: argparse.Namespace, cfg: RunConfig) -> list[str]:
    """What a job script passes to its stage: the same ``--config``/``--preset`` and overrides this command was
    given, so the job runs with the config its #SBATCH lines were made from. Paths become absolute (the job runs
    from the repository root, not from here)."""
    base = ["--config", str(Path(args.config).resolve())] if args.config is not None \
        else ["--preset", cfg.preset, f"run_dir={cfg.run_dir}"]
    carried = []
    for override in args.overrides:
        key, _, _ = override.partition("=")
        value: object = cfg
        for part in key.strip().split("."):
            value = getattr(value, part, None)
        carried.append(f"{key}={value}" if isinstance(value, Path) else override)
    return [*base, *carried]


def stage_command(cfg: RunConfig, spec: Stage, config_path: Path, *, processes: int = 1,
                  use_gpu: bool | None = None) -> tuple[list[str], dict[str, str]]:
    """argv + extra env for a stage run on this machine (an array stage runs all its tasks in one process:
    one start-up, the same outputs as one process per task)."""
    args = ["--config", str(config_path)]
    if spec.kind == "array":
        args += ["--num-shards", str(spec.tasks(cfg)), "--all-tasks"]
    if use_gpu is None and spec.kind == "training":
        import torch

        use_gpu = torch.cuda.is_available()
    return launcher_stage_command(cfg, spec, args, use_gpu=bool(use_gpu), processes=processes)


def plan_table(cfg: RunConfig, steps: list[Step], processes: int) -> str:
    layout = RunLayout.of(cfg)
    rows = [f"run_dir {layout.root}"]
    for step in steps:
        spec = step.stage
        res = getattr(cfg.cluster, spec.resources)
        argv, env = stage_command(cfg, spec, layout.config, processes=processes, use_gpu=False)
        rows.append(
            f"[{spec.name}] {step.describe(layout)}\n"
            f"    depends on: {', '.join(spec.upstream) or '-'}; tasks: {spec.tasks(cfg)}; "
            f"identity: {step.identity or 'known once its inputs are made'}\n"
            f"    resources: nodes={res.nodes} gpus/node={res.gpus_per_node} cpus={res.cpus_per_task} "
            f"mem={res.mem_gb}G time={res.time_min}min partition={res.partition or 'default'} "
            f"signal={cfg.cluster.signal}@{cfg.cluster.signal_delay_s}s\n"
            f"    command: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(argv)}")
    return "\n".join(rows)


class _Supervisor:
    """Runs one stage process at a time; SIGINT/SIGTERM to the pipeline are passed on to it (it checkpoints)
    and the pipeline then exits 130/75 with one line. The children die with the pipeline even on SIGKILL."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.received: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        if self.received is not None:
            raise StageStopped(f"stopped by {signal.Signals(self.received).name} before stage {name}",
                               EXIT_INTERRUPTED if self.received == signal.SIGINT else EXIT_REQUEUE)
        # A process group of its own: Ctrl-C reaches the stage once, through _handle, not also from the
        # terminal; and it still dies with the pipeline (parent-death signal), even on SIGKILL.
        self.child = subprocess.Popen(argv, env=stage_environment(env), cwd=REPO_ROOT, process_group=0,
                                      preexec_fn=preexec_die_with_parent)
        code = self.child.wait()
        self.child = None
        if code in (EXIT_REQUEUE, EXIT_INTERRUPTED) or (self.received is not None and code != 0):
            status = EXIT_INTERRUPTED if self.received == signal.SIGINT or code == EXIT_INTERRUPTED else EXIT_REQUEUE
            raise StageStopped(f"stage {name} stopped on a signal (its checkpoint, if any, is saved); rerun the "
                               "same command to resume", status)
        if code != 0:
            raise PipelineError(f"stage {name} failed (exit {code}); later stages not run. Fix the cause and "
                                "rerun: completed stages are kept")


def run_local(cfg: RunConfig, steps: list[Step], processes: int) -> None:
    layout = RunLayout.of(cfg)
    supervisor = _Supervisor()
    for step in steps:
        name = step.stage.name
        log.info("stage %s: %s", name, step.describe(layout))
        if step.action in ("skip", "restore"):
            prepare(layout, step)
            continue
        prepare(layout, step)
        record_start(layout, name)
        started = time.perf_counter()
        training = step.stage.kind == "training"
        argv, env = stage_command(cfg, step.stage, layout.config, processes=processes if training else 1)
        supervisor.run(name, argv, env)
        record_done(layout, name)
        log.info("stage %s: done in %.1f s", name, time.perf_counter() - started)


def main(args: argparse.Namespace) -> int:
    if args.help_config:
        from runtime import config_reference

        print(config_reference.markdown() if args.markdown else config_reference.text())
        return 0
    cfg = config_from_args(args)
    if not 1 <= args.processes <= MAX_PROCESSES:
        raise PipelineError(f"--processes {args.processes}: allowed 1..{MAX_PROCESSES} (accelerate processes on this "
                            "machine)")
    layout = RunLayout.of(cfg)
    if args.emit_sbatch:
        from launch.cluster import sbatch_script

        local = [flag for flag, given in (("--processes", args.processes != 1), ("--cluster", args.cluster),
                                          ("--wait", args.wait), ("--dry-run", args.dry_run),
                                          ("--from", args.from_stage), ("--only", args.only), ("--until", args.until))
                 if given]
        if local:  # the job would silently run without them
            raise PipelineError(f"--emit-sbatch writes one stage's job script, which cannot carry {', '.join(local)}; "
                                "drop them (the job's processes and nodes come from cluster.* in the config)")

        print(sbatch_script(cfg, args.emit_sbatch, request=job_request(args, cfg)), end="")
        return 0
    stages, forced = selected_stages(args)
    if args.dry_run:
        print(plan_table(cfg, make_plan(cfg, stages, forced), args.processes))
        return 0
    claim_run_dir(cfg)
    for own in (layout.pipeline, layout.root / "slurm"):  # lock, timings, job ids; submitit's files and job logs
        if own.is_symlink():  # what it writes there would land wherever the link points
            raise PipelineError(f"{own} is a symbolic link; lesion-vq keeps its bookkeeping only in a folder it "
                                "made: remove the link and rerun")
    say_ignored("pipeline")
    with exclusive_lock(layout.lock, f"another pipeline is already running on {layout.root}"):
        save_config(cfg, layout.config)
        steps = make_plan(cfg, stages, forced)
        if args.cluster:
            from launch.cluster import submit_pipeline

            return submit_pipeline(cfg, steps, wait=args.wait)
        try:
            run_local(cfg, steps, args.processes)
        except StageStopped as stop:
            print(f"pipeline: {stop}", file=sys.stderr)
            return stop.status
    if "report" not in stages:  # --until or --only: no report to point at
        return 0
    print(f"\nreport:          {layout.stage_dir('report') / 'report.html'}\n"
          f"reconstructions: {layout.stage_dir('vqvae')}/recon-step-*.png\n"
          f"samples:         {layout.stage_dir('sample') / 'samples.png'}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(p)
    p.add_argument("--processes", type=int, default=1, help="accelerate processes for the training stages")
    p.add_argument("--cluster", action="store_true", help="submit every stage to Slurm through submitit")
    p.add_argument("--wait", action="store_true", help="with --cluster: follow the jobs until they finish")
    p.add_argument("--dry-run", action="store_true", help="print what a run would do, stage by stage, and exit")
    p.add_argument("--emit-sbatch", choices=STAGE_NAMES, metavar="STAGE",
                   help="print the Slurm job script of one stage (resources and signal from the config)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--from", dest="from_stage", choices=STAGE_NAMES,
                       help="re-make this stage and all after it (current outputs kept in RUN_DIR/.history)")
    group.add_argument("--only", choices=STAGE_NAMES, help="re-make just this stage (its inputs must exist)")
    p.add_argument("--until", choices=STAGE_NAMES, metavar="STAGE",
                   help="stop after this stage: make (or reuse) what it needs and it, nothing after it")
    p.add_argument("--help-config", action="store_true",
                   help="print every config key with its type, default, allowed values and each preset's value")
    p.add_argument("--markdown", action="store_true", help="with --help-config: as Markdown (docs/config.md)")
    return p


if __name__ == "__main__":
    run_cli(main, parser())
