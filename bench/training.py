"""VQ-VAE training images/s: our ``seed``-preset training vs the report's loop, side by side.

Ours is the real thing: ``runtime.trainer.train`` running ``VQVAETask`` (shard loader, the
``seed`` architecture with its loss-trained codebook, Adam, the trainer's per-step lr, NaN check
and logging) on packed shards; its throughput is read from ``metrics.jsonl``. The baseline is
:mod:`bench.report_baseline` over the same lesions as 600x450 JPEGs. Both time the same window:
from the end of step ``warmup`` to the end of step ``warmup + steps``, inside the first epoch, with
the same batch size and loader worker count. Runs alternate (ours, report, ours, ...) and each
side keeps its best run, so a burst of load from other processes hurts neither side alone.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import Row, device, timed
from bench.data_loading import Inputs, make_inputs
from bench.report_baseline import train_images_per_s
from runtime.config import RunConfig, build_config
from runtime.tracking import read_metrics
from runtime.trainer import make_optimizer, train
from vqvae.train import VQVAETask, build_plan

VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Setup:
    size: int
    batch: int
    warmup: int
    steps: int
    workers: int
    repeats: int
    log_every: int = 1
    """Steps per metrics row (the trainer's sync points); divides ``warmup`` and ``steps``."""
    num_images: int = 0
    """Images packed (several setups sharing one set of shards); 0: :attr:`images` computes the fewest."""

    @property
    def images(self) -> int:
        """Enough images that the timed steps stay inside the first epoch of the training split (and
        at least 40, so that the validation split the trainer evaluates at its last step is not empty)."""
        fewest = max(40, math.ceil((self.warmup + self.steps + 1) * self.batch / (1 - VAL_FRACTION)) + self.batch)
        return self.num_images or fewest


QUICK = Setup(size=64, batch=4, warmup=1, steps=2, workers=1, repeats=1)
FULL = Setup(size=128, batch=16, warmup=2, steps=10, workers=1, repeats=3)


def prepare(setup: Setup, workdir: Path) -> Inputs:
    return make_inputs(setup.images, setup.size, workdir, val_fraction=VAL_FRACTION)


def train_config(setup: Setup, run_dir: Path, dev: torch.device, preset: str = "seed",
                 extra: Sequence[str] = ()) -> RunConfig:
    """The config of one timed training on :func:`prepare`'s shards: bf16 on CUDA unless ``extra`` says otherwise."""
    last = setup.warmup + setup.steps
    overrides = [
        # The data settings the shards were packed with (make_inputs): the trainer checks its inputs' lineage.
        f"run_dir={run_dir}", "wandb=disabled", f"data.image_size={setup.size}", f"data.num_images={setup.images}",
        f"data.val_fraction={VAL_FRACTION}", "data.test_fraction=0.0",
        f"vqvae_train.batch_size={setup.batch}", f"vqvae_train.max_steps={last}",
        f"vqvae_train.log_every={setup.log_every}", f"vqvae_train.eval_every={last}",
        f"vqvae_train.checkpoint_every={last}", "vqvae_train.eval_batches=1",
        f"vqvae_train.num_workers={setup.workers}",
        *(["vqvae_train.mixed_precision=bf16"] if dev.type == "cuda" else []), *extra,
    ]
    return build_config(preset, overrides)


def ours_images_per_s(inputs: Inputs, setup: Setup, run_dir: Path, dev: torch.device, preset: str = "seed",
                      extra: Sequence[str] = ()) -> float:
    """Steady-state images/s of ``runtime.trainer.train`` on ``preset`` (from metrics.jsonl)."""
    task, plan = build_plan(train_config(setup, run_dir, dev, preset, extra), resume="none", data_dir=inputs.data_dir)
    if train(task, plan) != 0:
        raise RuntimeError(f"training in {run_dir} did not finish")
    rows = {r["step"]: r for r in read_metrics(plan.out_dir / "metrics.jsonl") if "train/images_per_s" in r}

    # Each row's images_per_s covers exactly the log_every steps since the previous row (the trainer logs the
    # rate since then), so those steps took log_every * batch / rate seconds.
    every = setup.log_every
    window = range(setup.warmup + every, setup.warmup + setup.steps + 1, every)
    seconds = sum(every * setup.batch / rows[step]["train/images_per_s"] for step in window)
    return setup.steps * setup.batch / seconds


def ceiling_images_per_s(task: VQVAETask, setup: Setup, dev: torch.device) -> float:
    """images/s of the same model, loss, optimizer and batch with the inputs already on the device: what the
    training step alone can do, so data-path efficiency = ours / this. Precision, fused Adam and memory layout
    follow the task's ``vqvae_train`` settings as the trainer's do."""
    optim = task.cfg.vqvae_train
    if optim.mixed_precision == "fp16":
        raise ValueError("the ceiling times bf16 or fp32 steps (fp16 would need the trainer's loss scaling)")
    gpu_path = optim.gpu_path_on(dev.type)
    layout = torch.channels_last if gpu_path else torch.contiguous_format
    torch.manual_seed(0)
    model = task.build_model().to(dev, memory_format=layout).train()
    optimizer = make_optimizer(model.parameters(), fused=gpu_path, lr=1e-4)
    batches = [{"image": torch.rand(setup.batch, 3, setup.size, setup.size, device=dev).contiguous(
        memory_format=layout), "label": torch.zeros(setup.batch, dtype=torch.long, device=dev)}
        for _ in range(4)]

    def step(i: int) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=optim.mixed_precision == "bf16"):
            loss, _ = task.loss(model, batches[i % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(setup.warmup):
        step(i)
    with timed(dev) as seconds:
        for i in range(setup.steps):
            step(i)
    return setup.steps * setup.batch / seconds[0]


def run(quick: bool) -> list[Row]:
    setup = QUICK if quick else FULL
    dev = device()
    ours, report, ceiling = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        inputs = prepare(setup, Path(tmp))
        for i in range(setup.repeats):
            ours.append(ours_images_per_s(inputs, setup, Path(tmp) / f"ours-{i}", dev))
            task = VQVAETask(train_config(setup, Path(tmp) / "ceiling", dev), inputs.data_dir / "val")
            ceiling.append(ceiling_images_per_s(task, setup, dev))
            report.append(train_images_per_s(inputs.folder, size=setup.size, batch=setup.batch,
                                             warmup=setup.warmup, steps=setup.steps, workers=setup.workers,
                                             device=dev))
    base = "report loop (Dataset over 600x450 JPEGs)"
    how = (f"{setup.size} px, batch {setup.batch}, {setup.steps} timed steps after {setup.warmup}, "
           f"{setup.workers} loader worker(s), {torch.get_num_threads()} threads, best of {setup.repeats}")
    precision = "bf16 autocast" if dev.type == "cuda" else "fp32"
    top = "step only, inputs resident on the device (ceiling)"
    return [Row("train", base, max(report), "images/s", base, f"{how}; fp32; runs {_fmt(report)}"),
            Row("train", "ours (runtime.trainer, seed preset, shards)", max(ours), "images/s", base,
                f"{precision}; runs {_fmt(ours)}"),
            Row("train", top, max(ceiling), "images/s", top, f"same model, loss, batch; {precision}; "
                f"runs {_fmt(ceiling)}"),
            Row("train", "ours vs the ceiling", max(ours), "images/s", top, "data-path efficiency = ratio")]


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)
