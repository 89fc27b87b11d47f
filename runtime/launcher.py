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
                       stop_signal: str = "USR2") -> tuple[list[str], dict[str, str]]:
    """argv and extra environment for one node of a (possibly multi-node) training launch."""
    total = processes * num_machines
    cmd = [sys.executable, "-m", "runtime.launcher", stop_signal, "launch",
           "--num_processes", str(total), "--num_machines", str(num_machines),
           "--machine_rank", str(machine_rank), "--main_process_ip", main_address,
           "--main_process_port", str(main_port), "--mixed_precision", mixed_precision,
           "--dynamo_backend", "no"]
    if total > 1:
        cmd.append("--multi_gpu")  # "multi-process" in accelerate's vocabulary; with USE_CPU it is MULTI_CPU
        if num_machines > 1:
            cmd += ["--rdzv_backend", "c10d"]
    env = {} if use_gpu else {"ACCELERATE_USE_CPU": "1"}
    if not use_gpu and total > 1:
        # 2-core CPU nodes: one intra-op thread per process, or the processes fight over cores.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
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
    accelerate_main()


if __name__ == "__main__":
    main()
