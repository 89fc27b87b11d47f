"""Splitting embarrassingly parallel stages (encode, sample) into independent tasks.

A task is told its slot by ``--shard-index/--num-shards`` (a Slurm array task), or else by the
``RANK``/``WORLD_SIZE`` that ``accelerate launch`` sets. Each output file gets a small ``.done.json``
marker written after it (atomically), recording the stage identity it was made for (runtime/lineage.py);
a rerun skips outputs whose marker matches, so a killed array can be resubmitted and only the missing
work is redone. The task that completes the set checks that every output belongs to one identity.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from runtime.config import ConfigError
from runtime.files import atomic_write_json, read_json, sha256_file
from runtime.lineage import LineageError
from runtime.schema import MAX_ARRAY_TASKS


def add_task_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard-index", type=int, help="this task's index (default: $SLURM_ARRAY_TASK_ID or RANK)")
    parser.add_argument("--num-shards", type=int, help="number of tasks (default: array size or WORLD_SIZE)")
    parser.add_argument("--all-tasks", action="store_true",
                        help="run every task of the array in this one process (what the local pipeline does: "
                             "one start-up instead of one per task; the outputs are the same)")


def task_slots(args: argparse.Namespace) -> tuple[list[int], int]:
    """(the task indices this process runs, the number of tasks)."""
    if args.all_tasks:
        if args.shard_index is not None:
            raise ConfigError("--all-tasks runs every task: it cannot be combined with --shard-index")
        count = args.num_shards or 1
        if not 1 <= count <= MAX_ARRAY_TASKS:
            raise ConfigError(f"--num-shards {count}: allowed: 1..{MAX_ARRAY_TASKS}")
        return list(range(count)), count
    index, count = _task_slot(args)
    return [index], count


def _task_slot(args: argparse.Namespace) -> tuple[int, int]:
    env = os.environ
    if args.shard_index is not None or args.num_shards is not None:
        index, count = args.shard_index or 0, args.num_shards or 1
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    else:
        index, count = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    if not 1 <= count <= MAX_ARRAY_TASKS:
        raise ConfigError(f"{count} tasks: allowed 1..{MAX_ARRAY_TASKS} (--num-shards, or the Slurm array size)")
    if not 0 <= index < count:
        raise ConfigError(f"task index {index} is outside 0..{count - 1} (--shard-index/--num-shards)")
    return index, count


def marker_path(output: Path) -> Path:
    return output.with_name(output.name + ".done.json")


def is_done(output: Path, identity: str) -> bool:
    """True when ``output`` was completed for the same stage identity and is still intact."""
    marker = marker_path(output)
    if not (marker.is_file() and output.is_file()):
        return False
    info = read_json(marker)
    return info.get("identity") == identity and info.get("sha256") == sha256_file(output)


def mark_done(output: Path, identity: str, **info: Any) -> dict[str, Any]:
    record = {"name": output.name, "identity": identity, "sha256": sha256_file(output),
              "bytes": output.stat().st_size, **info}
    atomic_write_json(marker_path(output), record)
    return record


def completed_set(outputs: list[Path], identity: str) -> list[dict[str, Any]] | None:
    """Every output's marker once all are complete for ``identity``; None while some are still missing.
    An output made for another identity (a task rerun with other settings) is refused, naming both."""
    markers = []
    for output in outputs:
        if not (marker_path(output).is_file() and output.is_file()):
            return None
        info = read_json(marker_path(output))
        if info.get("identity") != identity:
            raise LineageError(
                f"{output} was made for identity {info.get('identity')}, the other tasks for {identity}: the "
                "array's tasks ran with different settings. Rerun every task with one config "
                "(python launch/pipeline.py re-makes the stage)")
        if info.get("sha256") != sha256_file(output):
            return None  # damaged since: the task that owns it redoes it
        markers.append(info)
    return markers
