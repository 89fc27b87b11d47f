"""Build ``accelerate launch`` command lines for the training stages (local, sbatch and submitit alike).

Two traps handled here:

- On a machine without GPUs, ``accelerate launch --multi_gpu`` quietly starts independent
  single-process runs; real DDP over gloo needs ``ACCELERATE_USE_CPU=1``. We set it whenever no
  GPU is requested.
- The launcher (torchrun's agent) has no handler for SIGUSR2, so Slurm's warning signal would kill it
  and orphan the workers before they can checkpoint. ``python -m runtime.launcher`` runs accelerate's
  launcher with the stop signal ignored; the workers inherit "ignored", then install their own
  handler (runtime/signals.py) and checkpoint on it.
- A launcher that dies must take its workers along: they run with the parent-death signal
  (runtime/process.py), and SIGTERM/SIGINT reaching a single-process launcher (which accelerate runs
  as a plain child, without a handler) are passed on to the worker, which checkpoints on them.

Inside a Slurm job step, ``python -m runtime.launcher stage NAME --config C`` runs one task of any
registered stage (slurm/stage.sh uses it): training stages read their node rank from the task's own
environment, others are exec'ed directly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from runtime.process import WATCH_ENV
from runtime.signals import EXIT_INTERRUPTED, EXIT_REQUEUE, STOP_STATUSES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATE_CONFIG = os.path.join(REPO_ROOT, "runtime", "accelerate.yaml")
"""The accelerate config every launch reads (``--config_file``) instead of the user's default one
(~/.cache/huggingface/accelerate/default_config.yaml), which could switch a run to DeepSpeed, other GPUs or a debug
mode: what a run does comes from its lesion-vq config alone."""

RUN_ENV = {"PYTHONHASHSEED": "0"}
"""Environment every stage process gets, whatever the user's is: one string hashing in every process and run."""
_USER_SETTINGS = ("ACCELERATE_", "PYTHONHASHSEED", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT",
                  "WANDB_ENTITY", "WANDB_NAME", "WANDB_JOB_TYPE", "WANDB_RUN_GROUP", "WANDB_TAGS",
                  "WANDB_CONFIG_PATHS", "WANDB_SWEEP_ID")
"""Per-user environment settings that would change what a run does (precision, devices, gradient accumulation,
DeepSpeed, hashing, which wandb run it writes into and where): never passed to a stage; the config decides.
WANDB_MODE passes: it only switches tracking off or offline, never an output."""


def _user_setting(name: str) -> bool:
    return name.startswith("ACCELERATE_") or name in _USER_SETTINGS


def stage_environment(extra: dict[str, str]) -> dict[str, str]:
    """The environment a stage process runs with: the user's, minus the settings :data:`_USER_SETTINGS` names,
    plus :data:`RUN_ENV` and ``extra`` (what the launch itself sets, e.g. ACCELERATE_USE_CPU)."""
    return {k: v for k, v in os.environ.items() if not _user_setting(k)} | RUN_ENV | extra


def ignored_settings() -> list[str]:
    """The user's settings :func:`stage_environment` and :data:`ACCELERATE_CONFIG` override (for one line)."""
    from accelerate.commands.config import default_config_file

    names = [f"{k}={v}" for k, v in sorted(os.environ.items()) if _user_setting(k) and RUN_ENV.get(k) != v]
    return names + ([default_config_file] if os.path.isfile(default_config_file) else [])


def say_ignored(who: str) -> None:
    """One line naming the user's settings this run ignores (nothing when there are none)."""
    ignored = ignored_settings()
    if ignored:
        print(f"{who}: ignoring per-user settings that would change what this run does (its config decides): "
              f"{', '.join(ignored)}", file=sys.stderr, flush=True)


def accelerate_command(script: str, script_args: list[str], *, processes: int, num_machines: int = 1,
                       machine_rank: int = 0, main_address: str = "127.0.0.1", main_port: int = 29500,
                       use_gpu: bool = False, mixed_precision: str = "no",
                       stop_signal: str = "USR2", threads: int | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment for one node of a (possibly multi-node) training launch.

    Multi-node: ``main_address`` may be a Slurm node name (both Slurm paths pass the first node of the
    job); it is replaced by that node's NodeAddr, see :func:`node_address`.
    """
    total = processes * num_machines
    if num_machines > 1:
        main_address = node_address(main_address)
        print(f"runtime.launcher: node {machine_rank} of {num_machines} ({os.environ.get('SLURMD_NODENAME', '?')}), "
              f"rendezvous at {main_address}:{main_port}", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "runtime.launcher", stop_signal, "launch",
           "--num_processes", str(total), "--num_machines", str(num_machines),
           "--machine_rank", str(machine_rank), "--main_process_ip", main_address,
           "--main_process_port", str(main_port), "--mixed_precision", mixed_precision,
           "--dynamo_backend", "no", "--config_file", ACCELERATE_CONFIG,
           # accelerate would otherwise pin every process to 1 intra-op thread (OMP_NUM_THREADS=1), and a
           # lone CPU process would use half of a 2-core node. The cores this process may use (its
           # affinity: a Slurm allocation, not the whole node) are shared out, so processes never fight.
           "--num_cpu_threads_per_process", str(threads or max(1, len(os.sched_getaffinity(0)) // processes))]
    if total > 1:
        cmd.append("--multi_gpu")  # "multi-process" in accelerate's vocabulary; with USE_CPU it is MULTI_CPU
        if num_machines > 1:
            # Node rank 0 hosts the rendezvous store, explicitly: torch's guess (does the address name this
            # machine?) says yes on every node when they share a host or the address is loopback, and says
            # no everywhere when the address is an alias or a second NIC's. A wrong "yes" on another node
            # takes the port first and node 0's accelerate then refuses to start.
            cmd += ["--rdzv_backend", "c10d", "--rdzv_conf", f"is_host={int(machine_rank == 0)}"]
    # A CPU launch hides the GPUs: accelerate would otherwise still bind rank r to cuda:r on a machine with
    # fewer GPUs than processes (bench ddp on a 1-GPU machine: "invalid device ordinal" on rank 1).
    env = {} if use_gpu else {"ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    return [*cmd, os.path.join(REPO_ROOT, script), *script_args], env


def stage_command(cfg: Any, spec: Any, stage_args: list[str], *, use_gpu: bool,
                  **launch: Any) -> tuple[list[str], dict[str, str]]:
    """argv + extra env for one task of a registered stage (runtime/stages.py): ``python -m MODULE ARGS``,
    or for a training stage this node's accelerate launch (``launch``: processes, num_machines, machine_rank,
    main_address, main_port), with the stage's precision and the config's stop signal."""
    if spec.kind != "training":
        return [sys.executable, "-m", spec.module, *stage_args], {}
    return accelerate_command(spec.script, stage_args, use_gpu=use_gpu, mixed_precision=spec.optim(cfg).mixed_precision,
                              stop_signal=cfg.cluster.signal, **launch)


def node_address(node: str) -> str:
    """The address Slurm reaches ``node`` at (its NodeAddr), or ``node`` itself when it is no Slurm node.

    A node name need not resolve: Slurm knows it as NodeName and reaches it at NodeAddr (another name, an
    IP, a second interface). Several slurmd on one host (the local test cluster) have different names
    and one host; a site may name nodes after racks. The rendezvous must use what Slurm itself uses.
    """
    try:
        out = subprocess.run(["scontrol", "show", "node", "--oneliner", node], capture_output=True, text=True,
                             check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired):  # no Slurm client here: an ordinary host name or address
        return node
    for field in out.stdout.split() if out.returncode == 0 else []:
        if field.startswith("NodeAddr="):
            return field.removeprefix("NodeAddr=")
    return node


def slurm_node_command(script: str, script_args: list[str], *, processes_per_node: int, mixed_precision: str,
                       stop_signal: str) -> tuple[list[str], dict[str, str]]:
    """The launch command for THIS node of a Slurm job, read from the environment inside the srun task.

    Reading ``SLURM_NODEID`` here, in the task, is what gives each node its own machine rank; a
    ``$SLURM_NODEID`` written into the batch script is expanded once on the first node, so every
    node would claim rank 0. Processes per node: one per GPU, else ``processes_per_node`` of the
    stage's resources (``LESION_VQ_PROCS_PER_NODE`` overrides both).
    """
    env = os.environ
    nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], check=True,
                           capture_output=True, text=True).stdout.split()
    gpus = int(env.get("SLURM_GPUS_ON_NODE", "0") or 0)
    processes = int(env.get("LESION_VQ_PROCS_PER_NODE", "0") or 0) or gpus or processes_per_node
    return accelerate_command(script, script_args, processes=processes, num_machines=len(nodes),
                              machine_rank=int(env["SLURM_NODEID"]), main_address=nodes[0],
                              main_port=20000 + int(env["SLURM_JOB_ID"]) % 20000, use_gpu=gpus > 0,
                              mixed_precision=mixed_precision, stop_signal=stop_signal)


def _stage_task(name: str, stage_args: list[str]) -> None:
    """``python -m runtime.launcher stage NAME --config C [KEY=VALUE ...]`` inside a Slurm job step."""
    from runtime.config import add_config_args, config_from_args
    from runtime.stages import stage

    spec = stage(name)
    if spec.kind != "training":
        argv = [sys.executable, "-m", spec.module, *stage_args]
        say_ignored(f"runtime.launcher stage {name}")
        os.execvpe(argv[0], argv, stage_environment({}))
    parser = argparse.ArgumentParser(prog=f"runtime.launcher stage {name}")
    add_config_args(parser)
    cfg = config_from_args(parser.parse_known_args(stage_args)[0])
    argv, extra = slurm_node_command(
        spec.script, stage_args, processes_per_node=getattr(cfg.cluster, spec.resources).processes_per_node,
        mixed_precision=spec.optim(cfg).mixed_precision, stop_signal=cfg.cluster.signal)
    say_ignored(f"runtime.launcher stage {name}")
    os.execvpe(argv[0], argv, stage_environment(extra))


def _forward_to_children(signum: int, _frame: FrameType | None) -> None:
    """accelerate runs a single worker as a plain child with no handler: pass the signal on, so the
    worker checkpoints, and keep waiting for it."""
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child), signum)


def main() -> None:
    mode, *rest = sys.argv[1:]
    if mode == "stage":
        _stage_task(rest[0], rest[1:])
    # python -m runtime.launcher SIGNAL launch ACCELERATE_ARGS...
    for name in ("TERM", "INT"):
        signal.signal(getattr(signal, f"SIG{name}"), _forward_to_children)
    for name in {mode, "USR1", "USR2"} - {"TERM", "INT"}:  # warning signals: the workers act on them
        signal.signal(getattr(signal, f"SIG{name}"), signal.SIG_IGN)
    os.environ[WATCH_ENV] = "KILL"  # the workers die with this launcher, however it dies
    from accelerate.commands.accelerate_cli import main as accelerate_main

    sys.argv = ["accelerate", *rest]
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        accelerate_main()
    except SignalException as err:
        # SIGTERM/SIGINT reached torchrun's agent too (scancel, pre-emption, Ctrl-C: every process gets it).
        # It has already passed it on to the workers and waited for them; they checkpoint on it at the next
        # step, so this run is one to resume, not a failure.
        _stopped_by(err.sigval)
    except SystemExit as err:
        # accelerate >= 1.16 catches the agent's SignalException itself, and replaces our SIGTERM handler
        # around a single worker, exiting 128 + N in both cases: the same stop, reported the same way.
        if err.code in (128 + signal.SIGTERM, 128 + signal.SIGINT):
            _stopped_by(signal.Signals(err.code - 128))
        raise
    except Exception as err:  # a worker failed: exit with ITS status, so 75 ("requeue me") survives
        _ignore_termination()
        code = worker_exit_status(err)
        if code is None:
            raise
        if code not in STOP_STATUSES:
            print(f"runtime.launcher: training worker(s) exited with status {code}", file=sys.stderr)
        sys.exit(code)


def _stopped_by(sig: int) -> None:
    """Exit as a run stopped by ``sig`` (TERM: 75, to be requeued; INT: 130): the workers checkpointed on it."""
    _ignore_termination()
    code = EXIT_INTERRUPTED if sig == signal.SIGINT else EXIT_REQUEUE
    print(f"runtime.launcher: stopped by {signal.Signals(sig).name}; exiting {code} "
          "(the workers checkpoint on the same signal)", file=sys.stderr)
    sys.exit(code)


def _ignore_termination() -> None:
    """The workers are gone and the exit status is decided: a SIGTERM/SIGINT from now on must not replace it.

    In a multi-node step, srun (``--kill-on-bad-exit``) TERMs every other node's launcher as soon as the first
    one exits 75. A launcher already on its way out with 75 itself would die of that TERM (status 143: no
    requeue), because at exit Python hands signals with Python handlers (torch's) back to SIG_DFL. Ignored
    signals stay ignored.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def worker_exit_status(err: BaseException) -> int | None:
    """The exit status to report for a failed ``accelerate launch``, from the workers' own statuses.

    accelerate turns any worker failure into exit 1 (``CalledProcessError`` for one process,
    torch's ``ChildFailedError`` for several), which would hide EXIT_REQUEUE from the Slurm scripts
    and the pipeline. When a worker exited 75 and no other worker failed for another reason (peers
    may be terminated by the agent), report 75; otherwise the first failure's status.
    """
    if isinstance(err, subprocess.CalledProcessError):
        codes = [err.returncode]
    elif isinstance(getattr(err, "failures", None), dict) and err.failures:  # type: ignore[attr-defined]
        codes = [int(f.exitcode) for f in err.failures.values()]  # type: ignore[attr-defined]
    else:
        return None
    for stop in STOP_STATUSES:
        if stop in codes and all(c in (*STOP_STATUSES, 0) or c < 0 for c in codes):
            return max(c for c in codes if c in STOP_STATUSES)
    first = codes[0]
    return first if first > 0 else 128 - first  # killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":
    main()
