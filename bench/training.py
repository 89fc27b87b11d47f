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
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import Row, autocast, channels_last, device, timed
from bench.data_loading import Inputs, make_inputs
from bench.report_baseline import train_images_per_s
from runtime.config import build_config
from runtime.tracking import read_metrics
from runtime.trainer import train
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

    @property
    def images(self) -> int:
        """Enough images that the timed steps stay inside the first epoch of the training split (and
        at least 40, so that the validation split the trainer evaluates at its last step is not empty)."""
        return max(40, math.ceil((self.warmup + self.steps + 1) * self.batch / (1 - VAL_FRACTION)) + self.batch)


QUICK = Setup(size=64, batch=4, warmup=1, steps=2, workers=1, repeats=1)
FULL = Setup(size=128, batch=16, warmup=2, steps=10, workers=1, repeats=3)


def prepare(setup: Setup, workdir: Path) -> Inputs:
    return make_inputs(setup.images, setup.size, workdir, val_fraction=VAL_FRACTION)


def ours_images_per_s(inputs: Inputs, setup: Setup, run_dir: Path, dev: torch.device) -> float:
    """Steady-state images/s of ``runtime.trainer.train`` on the ``seed`` preset (from metrics.jsonl)."""
    last = setup.warmup + setup.steps
    overrides = [
        # The data settings the shards were packed with (make_inputs): the trainer checks its inputs' lineage.
        f"run_dir={run_dir}", "wandb=disabled", f"data.image_size={setup.size}", f"data.num_images={setup.images}",
        f"data.val_fraction={VAL_FRACTION}", "data.test_fraction=0.0",
        f"vqvae_train.batch_size={setup.batch}", f"vqvae_train.max_steps={last}", "vqvae_train.log_every=1",
        f"vqvae_train.eval_every={last}", f"vqvae_train.checkpoint_every={last}", "vqvae_train.eval_batches=1",
        f"vqvae_train.num_workers={setup.workers}",
    ]
    if dev.type == "cuda":
        overrides.append("vqvae_train.mixed_precision=bf16")
    task, plan = build_plan(build_config("seed", overrides), resume="none", data_dir=inputs.data_dir)
    if train(task, plan) != 0:
        raise RuntimeError(f"training in {run_dir} did not finish")
    rows = {r["step"]: r for r in read_metrics(plan.out_dir / "metrics.jsonl") if "train/images_per_s" in r}

    # With log_every=1 each row's images_per_s covers exactly one step (the trainer logs the rate since
    # its previous row), so a step's seconds are batch / rate.
    seconds = sum(setup.batch / rows[step]["train/images_per_s"] for step in range(setup.warmup + 1, last + 1))
    return setup.steps * setup.batch / seconds


def ceiling_images_per_s(task: VQVAETask, setup: Setup, dev: torch.device) -> float:
    """images/s of the same model, loss, optimizer and batch with the inputs already on the device: what the
    training step alone can do, so data-path efficiency = ours / this."""
    torch.manual_seed(0)
    model = task.build_model().to(dev, memory_format=channels_last(dev)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = [{"image": torch.rand(setup.batch, 3, setup.size, setup.size, device=dev).contiguous(
        memory_format=channels_last(dev)), "label": torch.zeros(setup.batch, dtype=torch.long, device=dev)}
        for _ in range(4)]

    def step(i: int) -> None:
        with autocast(dev):
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
            task = VQVAETask(build_config("seed", [f"data.image_size={setup.size}"]), inputs.data_dir / "val")
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
