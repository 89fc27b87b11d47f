"""Encode images/s and prior sampling samples/s, each swept over batch sizes.

Encode is ``VQVAE.encode`` (what ``vqvae/encode.py`` runs per batch) on random images already in
memory, so the number is the model's limit, not the shard reader's. Sampling is what
``prior/sample.py`` runs per batch: ``prior.sample`` (raster order, one forward per code position)
plus ``vqvae.decode_codes``. Both run in inference mode with bf16 autocast and channels_last on
CUDA. Weights are freshly initialised: throughput does not depend on their values. Each sweep's
baseline is batch 1; the row of the config's default batch size and the fastest row are marked.

The KV-cache rows time ``prior.sample`` alone (the decoder is the same for every prior) for the
transformer prior against today's gated PixelCNN of the ``improved`` preset, at that preset's 16x16
grid, K=512 and batch 32, with parameter counts within 3 % (19 % more for the plain multi-head row): the
PixelCNN re-runs its network over every row so far for each of the 256 positions, the transformer
feeds one token per position through its cached keys and values (:data:`DUEL_FULL`).

On CPU the sweeps use one intra-op thread (per-core numbers): on a 2-core machine shared with
other jobs, two OpenMP threads made small convolutions several times slower (each parallel region
waits for the thread whose core another process holds), which would swamp the batch-size effect.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass

import torch

from bench.common import Row, autocast, channels_last, device, timed
from prior.models import build_prior
from runtime.config import CLASSES, RunConfig, build_config
from vqvae.models import VQVAE, build_vqvae

TINY = ("data.image_size=32", "vqvae.channels=[16,32]", "vqvae.quantizer.codebook_size=32", "vqvae.code_dim=16",
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


@dataclass(frozen=True)
class PriorDuel:
    """Priors sampled at one grid, codebook and batch: the preset's own prior (the baseline), then each
    challenger, given as prior overrides and a guidance scale."""

    label: str
    preset: str
    overrides: tuple[str, ...]
    challengers: tuple[tuple[tuple[str, ...], float], ...]
    batch: int = 32


_TRANSFORMER = ("prior.arch=transformer",)
# Full: the improved preset's gated PixelCNN (8.42 M parameters) against transformers of 8.49 M (the
# preset's own 12 layers at the default width and one shared key/value head: prior.arch=transformer
# alone) and 8.72 M (3 wide layers: fewer sequential steps per code, larger matrix products), the
# latter also with one key/value head per query head (plain multi-head attention, 10.1 M) and with
# guidance (2 x 32 rows). The baseline names its arch: the preset's own prior is now the transformer.
DUEL_FULL = PriorDuel("improved", "improved", ("prior.arch=gated",), (
    (_TRANSFORMER, 1.0),
    ((*_TRANSFORMER, "prior.layers=3", "prior.d_model=512"), 1.0),
    ((*_TRANSFORMER, "prior.layers=3", "prior.d_model=512", "prior.kv_heads=0"), 1.0),
    ((*_TRANSFORMER, "prior.layers=3", "prior.d_model=512"), 3.0),
))
DUEL_QUICK = PriorDuel("tiny", "smoke", TINY, (
    ((*_TRANSFORMER, "prior.layers=2", "prior.d_model=20", "prior.heads=2"), 1.0),
    ((*_TRANSFORMER, "prior.layers=2", "prior.d_model=20", "prior.heads=2"), 3.0),
))
TRANSFORMER_RUNS = 3
"""The transformer's runs take seconds, so a burst of load from another process can halve one: the
median of 3 is reported. The PixelCNN's one run takes minutes and averages the load by itself."""


@torch.inference_mode()
def prior_sample_per_s(cfg: RunConfig, batch: int, dev: torch.device, guidance_scale: float,
                       runs: int) -> tuple[float, int]:
    """Median samples/s of ``prior.sample`` alone (no decode) over ``runs`` runs, and the prior's
    parameter count."""
    torch.manual_seed(0)
    prior = build_prior(cfg.prior, cfg.vqvae.codebook_size, len(CLASSES)).to(dev).eval()
    grid = build_vqvae(cfg.vqvae).code_grid(cfg.data.image_size)
    labels = torch.arange(batch, device=dev) % len(CLASSES) if cfg.prior.conditional else None
    values = []
    with autocast(dev):
        prior.sample(batch, (1, grid[1]), labels, 1.0, torch.Generator().manual_seed(0),
                     guidance_scale=guidance_scale)  # warm-up: one row
        for _ in range(runs):
            with timed(dev) as t:
                prior.sample(batch, grid, labels, 1.0, torch.Generator().manual_seed(0),
                             guidance_scale=guidance_scale)
            values.append(batch / t[0])
    return statistics.median(values), sum(p.numel() for p in prior.parameters())


def _prior_name(cfg: RunConfig, guidance_scale: float) -> str:
    p = cfg.prior
    if p.arch != "transformer":
        return f"{p.arch} PixelCNN {p.layers}x{p.filters}"
    kv = p.kv_heads or p.heads
    return (f"transformer {p.layers}x{p.d_model} ({p.heads} heads, {kv} KV head{'s' * (kv > 1)}), KV cache, "
            f"guidance {guidance_scale:g}")


def run_prior_duel(quick: bool) -> list[Row]:
    duel, dev = DUEL_QUICK if quick else DUEL_FULL, _device()
    base_cfg = build_config(duel.preset, ["wandb=disabled", *duel.overrides])
    grid = "x".join(map(str, build_vqvae(base_cfg.vqvae).code_grid(base_cfg.data.image_size)))
    base_name = f"{_prior_name(base_cfg, 1.0)}, {duel.label}, batch {duel.batch}"
    value, params = prior_sample_per_s(base_cfg, duel.batch, dev, 1.0, runs=1)
    rows = [Row("sample", base_name, value, "samples/s", base_name,
                f"prior only (no decode), grid {grid}, K={base_cfg.vqvae.codebook_size}, {params:,} parameters, "
                f"{torch.get_num_threads()} thread(s)")]
    for overrides, scale in duel.challengers:
        cfg = build_config(duel.preset, ["wandb=disabled", *duel.overrides, *overrides])
        value, params = prior_sample_per_s(cfg, duel.batch, dev, scale, runs=TRANSFORMER_RUNS)
        rows.append(Row("sample", f"{_prior_name(cfg, scale)}, {duel.label}, batch {duel.batch}", value, "samples/s",
                        base_name, f"{params:,} parameters; median of {TRANSFORMER_RUNS}"
                        + ("" if scale == 1.0 else f"; {2 * duel.batch} rows (cond + uncond)")))
    return rows


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
            f"{cfg.prior.layers}x{getattr(cfg.prior, 'filters', None) or cfg.prior.d_model}, grid {grid}, "
            f"K={cfg.vqvae.codebook_size}, "
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
    return rows + run_prior_duel(quick)


if __name__ == "__main__":
    print(*run_encode("--quick" in sys.argv), *run_sample("--quick" in sys.argv), sep="\n")
