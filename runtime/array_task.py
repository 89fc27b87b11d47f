"""Splitting embarrassingly parallel stages (encode, sample) into independent tasks.

A task is told its slot by ``--shard-index/--num-shards`` (a Slurm array task), or else by the
``RANK``/``WORLD_SIZE`` that ``accelerate launch`` sets. Each output file gets a small ``.done.json``
marker written after it (atomically), recording what it was made from; a rerun skips outputs whose
marker matches, so a killed array can be resubmitted and only the missing work is redone.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from runtime.config import ConfigError
from runtime.files import atomic_write_json, read_json, sha256_file


def add_task_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard-index", type=int, help="this task's index (default: $SLURM_ARRAY_TASK_ID or RANK)")
    parser.add_argument("--num-shards", type=int, help="number of tasks (default: array size or WORLD_SIZE)")


def task_slot(args: argparse.Namespace) -> tuple[int, int]:
    env = os.environ
    if args.shard_index is not None or args.num_shards is not None:
        index, count = args.shard_index or 0, args.num_shards or 1
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    else:
        index, count = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"task index {index} is outside 0..{count - 1} (--shard-index/--num-shards)")
    return index, count


def marker_path(output: Path) -> Path:
    return output.with_name(output.name + ".done.json")


def is_done(output: Path, fingerprint: str) -> bool:
    """True when ``output`` was completed from the same inputs and is still intact."""
    marker = marker_path(output)
    if not (marker.is_file() and output.is_file()):
        return False
    info = read_json(marker)
    return info.get("fingerprint") == fingerprint and info.get("sha256") == sha256_file(output)


def mark_done(output: Path, fingerprint: str, **info: Any) -> dict[str, Any]:
    record = {"name": output.name, "fingerprint": fingerprint, "sha256": sha256_file(output),
              "bytes": output.stat().st_size, **info}
    atomic_write_json(marker_path(output), record)
    return record


def read_marker(output: Path) -> dict[str, Any]:
    return read_json(marker_path(output))
