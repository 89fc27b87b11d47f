"""Train the autoregressive prior over VQ-VAE code grids (cross-entropy over code indices).

    accelerate launch [--num_processes N] prior/train.py --config RUN_DIR/config.json
    python prior/train.py --preset smoke run_dir=runs/smoke

Reads RUN_DIR/codes/manifest.json (written by vqvae/encode.py), writes RUN_DIR/prior/. Same
checkpoint, resume, signal and logging machinery as vqvae/train.py (runtime/trainer.py).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prior.api import prior_config
from prior.models import build_prior
from runtime.balance import split_class_weights
from runtime.cli import run_cli, stage_parser
from runtime.config import CLASSES, RunConfig, config_from_args
from runtime.cost import forward_macs
from runtime.lineage import begin_stage
from runtime.seeding import torch_generator
from runtime.stages import MANIFEST, RunLayout
from runtime.trainer import TrainPlan, train
from shards.codes import CodeDecoder, make_code_eval_loader
from shards.loader import ShardTrainData

LN2 = math.log(2)


def code_histogram_kl(data_counts: torch.Tensor, sample_counts: torch.Tensor, eps: float = 1e-6) -> float:
    """KL(data || samples) in bits between two code histograms (smoothed so unseen codes stay finite)."""
    p = data_counts.double() + eps
    q = sample_counts.double() + eps
    p, q = p / p.sum(), q / q.sum()
    return float((p * (p / q).log2()).sum())


class PriorTask:
    stage = "prior"

    def __init__(self, cfg: RunConfig, codes_dir: Path, codes_manifest: dict[str, Any]) -> None:
        self.cfg = cfg
        self.codes_dir = codes_dir
        self.codebook_size = int(codes_manifest["codebook_size"])
        self.grid = tuple(codes_manifest["grid"])
        self.weights = split_class_weights(codes_manifest, cfg.prior.balance, codes_dir / MANIFEST)

    def build_model(self) -> torch.nn.Module:
        return build_prior(self.cfg.prior, self.codebook_size, len(CLASSES))

    def _labels(self, batch: dict[str, Any]) -> torch.Tensor | None:
        return batch["label"] if self.cfg.prior.conditional else None

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        codes = batch["codes"]
        logits = model(codes, self._labels(batch))
        # Cross-entropy over the code index at every position: the report instead regressed one-hot
        # vectors with MSE, which is not a likelihood and cannot be sampled from consistently.
        # Summed then divided by max(n, 1): an empty batch (damaged shards) gives zero gradient, not NaN.
        # Each image's codes weigh as its class (prior.balance; the weights average 1 over the data).
        per_image = F.cross_entropy(logits.float(), codes, reduction="none").flatten(1).sum(1)
        self.weights = self.weights.to(per_image.device)
        nll = (per_image * self.weights[batch["label"]]).sum() / max(codes.numel(), 1)
        bits = per_image.detach().sum() / max(codes.numel(), 1) / LN2
        return nll, {"bits_per_code": bits}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int, out_dir: Path) -> tuple[dict[str, float], dict[str, Path]]:
        device = next(model.parameters()).device
        optim = self.cfg.prior_train
        nll_sum, positions, images = 0.0, 0, 0
        data_hist = torch.zeros(self.codebook_size, dtype=torch.float64)
        loader = make_code_eval_loader(self.codes_dir / "val", batch_size=optim.batch_size,
                                       max_batches=optim.eval_batches)
        for batch in loader:
            codes = batch["codes"].to(device)
            labels = batch["label"].to(device) if self.cfg.prior.conditional else None
            logits = model(codes, labels)
            nll_sum += F.cross_entropy(logits.float(), codes, reduction="sum").item()
            positions += codes.numel()
            images += codes.shape[0]
            data_hist += torch.bincount(codes.flatten().cpu(), minlength=self.codebook_size).double()
        bits_per_code = nll_sum / max(positions, 1) / LN2
        metrics = {"bits_per_code": bits_per_code,
                   "bits_per_image": bits_per_code * self.grid[0] * self.grid[1],
                   "uniform_bits_per_code": math.log2(self.codebook_size)}
        # Class-balanced samples, compared with the data's code histogram.
        n_classes = len(CLASSES)
        labels = torch.arange(n_classes, device=device).repeat_interleave(2)
        samples = model.sample(len(labels), self.grid, labels if self.cfg.prior.conditional else None,
                               temperature=1.0, generator=torch_generator(optim.seed, "eval-sample", step))
        sample_hist = torch.bincount(samples.flatten().cpu(), minlength=self.codebook_size).double()
        metrics["sample_code_kl"] = code_histogram_kl(data_hist, sample_hist)
        return metrics, {}


def build_plan(cfg: RunConfig, resume: str, codes_dir: Path | None = None) -> tuple[PriorTask, TrainPlan]:
    run = begin_stage(cfg, "prior", folders={"encode": codes_dir} if codes_dir else None)
    codes_dir = codes_dir or RunLayout.of(cfg).stage_dir("encode")
    manifest = run.manifests["encode"]
    data = ShardTrainData(codes_dir / "train", codes_dir / "val", cfg.prior_train, decode=CodeDecoder())
    plan = TrainPlan(run=run, data=data, optim=cfg.prior_train, config=cfg, resume=resume,
                     manifest_extras={"codebook_size": manifest["codebook_size"], "grid": manifest["grid"]},
                     model_config=prior_config(cfg.prior, int(manifest["codebook_size"]), tuple(manifest["grid"])))
    return PriorTask(cfg, codes_dir, manifest), plan


def print_cost(cfg: RunConfig) -> None:
    """Parameters and MACs of the prior over the code grid that ``cfg``'s VQ-VAE gives at its image size."""
    from vqvae.models import build_vqvae

    grid = build_vqvae(cfg.vqvae).code_grid(cfg.data.image_size)
    model = build_prior(cfg.prior, cfg.vqvae.codebook_size, len(CLASSES))
    codes, labels = torch.zeros(1, *grid, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    print(f"{cfg.prior.arch} prior parameters: {sum(p.numel() for p in model.parameters()):,}")
    # One teacher-forced forward scores every code of a grid; sampling a PixelCNN runs it once per code.
    print(f"{cfg.prior.arch} prior MACs per {grid[0]}x{grid[1]} code grid (one forward, as in training): "
          f"{forward_macs(model, codes, labels):,}")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_params:
        print_cost(cfg)
        return 0
    task, plan = build_plan(cfg, args.resume, args.codes)
    return train(task, plan)


def parser() -> argparse.ArgumentParser:
    p = stage_parser(__doc__.splitlines()[0], training=True)
    p.add_argument("--codes", type=Path, help="code shard directory (default: RUN_DIR/codes)")
    p.add_argument("--print-params", action="store_true",
                   help="print the parameter count and the MACs per code grid (at the VQ-VAE's grid) and exit")
    return p


if __name__ == "__main__":
    run_cli(main, parser())
