"""Encode images/s and prior sampling samples/s, each swept over batch sizes.

Encode is ``VQVAE.encode`` (what ``vqvae/encode.py`` runs per batch) on random images already in
memory, so the number is the model's limit, not the shard reader's. Sampling is what
``prior/sample.py`` runs per batch: ``prior.sample`` (raster order, one forward per code position)
plus ``vqvae.decode_codes``. Both run in inference mode with bf16 autocast and channels_last on
CUDA. Weights are freshly initialised: throughput does not depend on their values. Each sweep's
baseline is batch 1; the row of the config's default batch size and the fastest row are marked.

On CPU the sweeps use one intra-op thread (per-core numbers): on a 2-core machine shared with
other jobs, two OpenMP threads made small convolutions several times slower (each parallel region
waits for the thread whose core another process holds), which would swamp the batch-size effect.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from bench.common import Row, autocast, channels_last, device, timed
from prior.models import build_prior
from runtime.config import CLASSES, RunConfig, build_config
from vqvae.models import VQVAE, build_vqvae

TINY = ("data.image_size=32", "vqvae.channels=[16,32]", "vqvae.codebook_size=32", "vqvae.code_dim=16",
        "prior.filters=16", "prior.layers=2", "prior.kernel_size=3", "prior.embed_dim=8")


@dataclass(frozen=True)
class Sweep:
    label: str
    preset: str
    overrides: tuple[str, ...]
    encode_batches: tuple[int, ...]
    encode_images: int
    """images encoded per batch size (at least one batch)"""
    sample_batches: tuple[int, ...]

    def config(self) -> RunConfig:
        return build_config(self.preset, ["wandb=disabled", *self.overrides])


QUICK = (Sweep("tiny", "smoke", TINY, (1, 4, 16, 64), 64, (1, 4, 32)),)
FULL = (Sweep("smoke", "smoke", (), (1, 4, 16, 64, 256), 256, (1, 4, 16, 32)),
        Sweep("seed", "seed", (), (1, 4, 16, 64), 32, (1, 4)))  # seed sampling: ~10 s/sample on 2 cores


def _vqvae(cfg: RunConfig, dev: torch.device) -> VQVAE:
    torch.manual_seed(0)
    return build_vqvae(cfg.vqvae).to(dev, memory_format=channels_last(dev)).eval()


@torch.inference_mode()
def encode_images_per_s(cfg: RunConfig, batch: int, images: int, dev: torch.device) -> float:
    model = _vqvae(cfg, dev)
    size = cfg.data.image_size
    x = torch.rand(batch, 3, size, size, device=dev).contiguous(memory_format=channels_last(dev))
    steps = max(1, -(-images // batch))
    with autocast(dev):
        model.encode(x)  # warm-up: allocator, kernels
        with timed(dev) as t:
            for _ in range(steps):
                model.encode(x)
    return steps * batch / t[0]


@torch.inference_mode()
def sample_per_s(cfg: RunConfig, batch: int, dev: torch.device) -> float:
    vqvae = _vqvae(cfg, dev)
    prior = build_prior(cfg.prior, cfg.vqvae.codebook_size, len(CLASSES)).to(dev).eval()
    grid = vqvae.code_grid(cfg.data.image_size)
    labels = torch.arange(batch, device=dev) % len(CLASSES) if cfg.prior.conditional else None
    generator = torch.Generator().manual_seed(0)
    with autocast(dev):
        prior(torch.zeros(batch, *grid, dtype=torch.long, device=dev), labels)  # warm-up
        with timed(dev) as t:
            codes = prior.sample(batch, grid, labels, temperature=1.0, generator=generator)
            vqvae.decode_codes(codes)
    return batch / t[0]


def _sweep_rows(bench: str, sweep: Sweep, values: dict[int, float], unit: str, default: int, what: str) -> list[Row]:
    base = f"{sweep.label}, batch 1"
    best = max(values, key=values.__getitem__)
    rows = []
    for batch, value in values.items():
        marks = [m for m, hit in ((f"config default ({what}.batch_size)", batch == default),
                                  ("fastest", batch == best)) if hit]
        rows.append(Row(bench, f"{sweep.label}, batch {batch}", value, unit, base, "; ".join(marks)))
    return rows


def _describe(cfg: RunConfig) -> str:
    grid = "x".join(map(str, build_vqvae(cfg.vqvae).code_grid(cfg.data.image_size)))
    return (f"{cfg.vqvae.arch} VQ-VAE {cfg.data.image_size} px, {cfg.prior.arch} prior "
            f"{cfg.prior.layers}x{cfg.prior.filters}, grid {grid}, K={cfg.vqvae.codebook_size}, "
            f"{torch.get_num_threads()} thread(s)")


def _device() -> torch.device:
    dev = device()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    return dev


def run_encode(quick: bool) -> list[Row]:
    dev, rows = _device(), []
    for sweep in QUICK if quick else FULL:
        cfg = sweep.config()
        values = {b: encode_images_per_s(cfg, b, sweep.encode_images, dev) for b in sweep.encode_batches}
        sweep_rows = _sweep_rows("encode", sweep, values, "images/s", cfg.encode.batch_size, "encode")
        sweep_rows[0].note = "; ".join(filter(None, [_describe(cfg), sweep_rows[0].note]))
        rows += sweep_rows
    return rows


def run_sample(quick: bool) -> list[Row]:
    dev, rows = _device(), []
    for sweep in QUICK if quick else FULL:
        cfg = sweep.config()
        values = {b: sample_per_s(cfg, b, dev) for b in sweep.sample_batches}
        sweep_rows = _sweep_rows("sample", sweep, values, "samples/s", cfg.sample.batch_size, "sample")
        sweep_rows[0].note = "; ".join(filter(None, [_describe(cfg) + ", decode included", sweep_rows[0].note]))
        rows += sweep_rows
    return rows


if __name__ == "__main__":
    print(*run_encode("--quick" in sys.argv), *run_sample("--quick" in sys.argv), sep="\n")
