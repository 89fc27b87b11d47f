"""DDP scaling on CPU: the real ``vqvae/train.py`` under ``accelerate launch``, 1 vs 2 processes.

Launched with :func:`runtime.launcher.accelerate_command` (``ACCELERATE_USE_CPU=1``: real
MULTI_CPU DDP over gloo, checked in the stage manifest). The per-process batch is fixed, so two
processes train on twice the images per step; throughput is the trainer's own
``train/images_per_s`` (all ranks' images, per step) over the steps after the warm-up, which
leaves out start-up. Threads per process are set per run so processes × threads never exceed the cores:
scaling efficiency = 2-process images/s / 1-process images/s at one thread per process; the
1-process run with every core shows what the second process adds over plain intra-op threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.common import Row, free_port
from runtime.config import build_config, save_config
from runtime.files import read_json
from runtime.launcher import REPO_ROOT, accelerate_command
from runtime.stages import RunLayout
from runtime.tracking import read_metrics
from shards.pack import pack_synthetic


@dataclass(frozen=True)
class Setup:
    overrides: tuple[str, ...]
    batch: int
    warmup: int
    steps: int

    @property
    def last(self) -> int:
        return self.warmup + self.steps


_COMMON = ("wandb=disabled", "vqvae_train.num_workers=0", "vqvae_train.warmup_steps=0", "vqvae_train.eval_batches=1")
QUICK = Setup((*_COMMON, "data.num_images=96", "data.image_size=32", "data.shard_max_count=20",
               "vqvae.channels=[16,32]", "vqvae.quantizer.codebook_size=32", "vqvae.code_dim=16"),
              batch=8, warmup=2, steps=4)
FULL = Setup((*_COMMON, "data.num_images=600"), batch=16, warmup=5, steps=25)  # the smoke model at 64 px


def _config_args(setup: Setup, run_dir: Path) -> list[str]:
    return [*setup.overrides, f"run_dir={run_dir}", f"vqvae_train.batch_size={setup.batch}",
            f"vqvae_train.max_steps={setup.last}", "vqvae_train.log_every=1",
            f"vqvae_train.eval_every={setup.last}", f"vqvae_train.checkpoint_every={setup.last}"]


def launch(setup: Setup, data_dir: Path, run_dir: Path, processes: int, threads: int) -> tuple[float, str]:
    """(steady-state images/s over all ranks, distributed type from the manifest) of one launch."""
    cfg = build_config("smoke", _config_args(setup, run_dir))
    save_config(cfg, run_dir / "config.json")
    (run_dir / "data").symlink_to(data_dir, target_is_directory=True)
    argv, extra = accelerate_command("vqvae/train.py", ["--config", str(run_dir / "config.json")],
                                     processes=processes, main_port=free_port(), threads=threads)
    env = os.environ | extra | {"WANDB_MODE": "disabled"}
    done = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{processes}-process launch failed ({done.returncode}):\n{done.stderr[-3000:]}")
    manifest = read_json(RunLayout(run_dir).manifest("vqvae"))
    if manifest["world_size"] != processes:
        raise RuntimeError(f"asked for {processes} processes, trained with world size {manifest['world_size']}")
    rows = {r["step"]: r for r in read_metrics(run_dir / "vqvae" / "metrics.jsonl") if "train/images_per_s" in r}
    per_step = setup.batch * processes

    # log_every=1: each row's rate covers exactly one step (the trainer logs the rate since its previous row).
    seconds = sum(per_step / rows[step]["train/images_per_s"] for step in range(setup.warmup + 1, setup.last + 1))
    rate = setup.steps * per_step / seconds
    return rate, manifest["distributed_type"]


def run(quick: bool) -> list[Row]:
    setup = QUICK if quick else FULL
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        data_dir = Path(tmp) / "data"
        cfg = build_config("smoke", _config_args(setup, Path(tmp)))
        pack_synthetic(cfg.data, data_dir)
        runs = [(1, 1), (1, cores), (2, 1)] if cores >= 2 else [(1, 1), (2, 1)]
        results = {}
        for processes, threads in runs:
            run_dir = Path(tmp) / f"p{processes}-t{threads}"
            run_dir.mkdir()
            results[processes, threads] = launch(setup, data_dir, run_dir, processes, threads)
    base = "1 process, 1 thread"
    how = (f"smoke preset, {cfg.vqvae.arch} VQ-VAE {cfg.vqvae.channels} at {cfg.data.image_size} px, "
           f"{setup.batch} images/process/step, {setup.steps} timed steps after {setup.warmup}")
    rows = [Row("ddp", base, results[1, 1][0], "images/s", base, f"{how}; {results[1, 1][1]}")]
    if (1, cores) in results:
        rows.append(Row("ddp", f"1 process, {cores} threads", results[1, cores][0], "images/s", base,
                        f"intra-op threads only; {results[1, cores][1]}"))
    rows.append(Row("ddp", "2 processes x 1 thread", results[2, 1][0], "images/s", base,
                    f"scaling efficiency = ratio; {results[2, 1][1]} via accelerate launch"))
    return rows


if __name__ == "__main__":
    print(*run("--quick" in sys.argv), sep="\n")
