"""Build ``accelerate launch`` command lines for the training stages (local, sbatch and submitit alike).

Two traps handled here:

- On a machine without GPUs, ``accelerate launch --multi_gpu`` quietly starts independent
  single-process runs; real DDP over gloo needs ``ACCELERATE_USE_CPU=1``. We set it whenever no
  GPU is requested.
- The launcher (torchrun's agent) has no handler for SIGUSR2, so Slurm's warning signal would kill it
  and orphan the workers before they can checkpoint. ``python -m runtime.launcher`` runs accelerate's
  launcher with the stop signal ignored; the workers inherit "ignored", then install their own
  handler (runtime/signals.py) and checkpoint on it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def accelerate_command(script: str, script_args: list[str], *, processes: int, num_machines: int = 1,
                       machine_rank: int = 0, main_address: str = "127.0.0.1", main_port: int = 29500,
                       use_gpu: bool = False, mixed_precision: str = "no",
                       stop_signal: str = "USR2", threads: int | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment for one node of a (possibly multi-node) training launch."""
    total = processes * num_machines
    cmd = [sys.executable, "-m", "runtime.launcher", stop_signal, "launch",
           "--num_processes", str(total), "--num_machines", str(num_machines),
           "--machine_rank", str(machine_rank), "--main_process_ip", main_address,
           "--main_process_port", str(main_port), "--mixed_precision", mixed_precision,
           "--dynamo_backend", "no",
           # accelerate would otherwise pin every process to 1 intra-op thread (OMP_NUM_THREADS=1), and a
           # lone CPU process would use half of a 2-core node. The cores this process may use (its
           # affinity: a Slurm allocation, not the whole node) are shared out, so processes never fight.
           "--num_cpu_threads_per_process", str(threads or max(1, len(os.sched_getaffinity(0)) // processes))]
    if total > 1:
        cmd.append("--multi_gpu")  # "multi-process" in accelerate's vocabulary; with USE_CPU it is MULTI_CPU
        if num_machines > 1:
            cmd += ["--rdzv_backend", "c10d"]
    env = {} if use_gpu else {"ACCELERATE_USE_CPU": "1"}
    return [*cmd, os.path.join(REPO_ROOT, script), *script_args], env


def slurm_node_command(script: str, script_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The launch command for THIS node of a Slurm job, read from the environment inside the srun task.

    Reading ``SLURM_NODEID`` here, in the task, is what gives each node its own machine rank; a
    ``$SLURM_NODEID`` written into the batch script is expanded once on the first node, so every
    node would claim rank 0.
    """
    env = os.environ
    nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], check=True,
                           capture_output=True, text=True).stdout.split()
    gpus = int(env.get("SLURM_GPUS_ON_NODE", "0") or 0)
    processes = int(env.get("LESION_VQ_PROCS_PER_NODE", "0") or 0) or max(gpus, 1)
    return accelerate_command(script, script_args, processes=processes, num_machines=len(nodes),
                              machine_rank=int(env["SLURM_NODEID"]), main_address=nodes[0],
                              main_port=20000 + int(env["SLURM_JOB_ID"]) % 20000, use_gpu=gpus > 0,
                              stop_signal=env.get("LESION_VQ_SIGNAL", "USR2"))


def main() -> None:
    mode, *rest = sys.argv[1:]
    if mode == "slurm":  # python -m runtime.launcher slurm SCRIPT [ARGS...]   (inside srun)
        argv, extra = slurm_node_command(rest[0], rest[1:])
        os.execvpe(argv[0], argv, os.environ | extra)
    # python -m runtime.launcher SIGNAL launch ACCELERATE_ARGS...
    signal.signal(getattr(signal, f"SIG{mode}"), signal.SIG_IGN)
    from accelerate.commands.accelerate_cli import main as accelerate_main

    sys.argv = ["accelerate", *rest]
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from runtime.signals import EXIT_REQUEUE

    try:
        accelerate_main()
    except SignalException as err:
        # SIGTERM reached the launcher too (scancel, pre-emption: Slurm signals every process). torchrun
        # has already passed it on to the workers and waited for them; they checkpoint on it at the next
        # step, so this run is one to requeue and resume, not a failure.
        print(f"runtime.launcher: stopped by {signal.Signals(err.sigval).name}; exiting {EXIT_REQUEUE} "
              "to be requeued (the workers checkpoint on the same signal)", file=sys.stderr)
        sys.exit(EXIT_REQUEUE)
    except Exception as err:  # a worker failed: exit with ITS status, so 75 ("requeue me") survives
        code = worker_exit_status(err)
        if code is None:
            raise
        print(f"runtime.launcher: training worker(s) exited with status {code}", file=sys.stderr)
        sys.exit(code)


def worker_exit_status(err: BaseException) -> int | None:
    """The exit status to report for a failed ``accelerate launch``, from the workers' own statuses.

    accelerate turns any worker failure into exit 1 (``CalledProcessError`` for one process,
    torch's ``ChildFailedError`` for several), which would hide EXIT_REQUEUE from the Slurm scripts
    and the pipeline. When a worker exited 75 and no other worker failed for another reason (peers
    may be terminated by the agent), report 75; otherwise the first failure's status.
    """
    from runtime.signals import EXIT_REQUEUE

    if isinstance(err, subprocess.CalledProcessError):
        codes = [err.returncode]
    elif isinstance(getattr(err, "failures", None), dict) and err.failures:  # type: ignore[attr-defined]
        codes = [int(f.exitcode) for f in err.failures.values()]  # type: ignore[attr-defined]
    else:
        return None
    if EXIT_REQUEUE in codes and all(c in (EXIT_REQUEUE, 0) or c < 0 for c in codes):
        return EXIT_REQUEUE
    first = codes[0]
    return first if first > 0 else 128 - first  # killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":
    main()
