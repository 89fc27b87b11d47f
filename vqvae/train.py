"""Train the VQ-VAE on image shards.

    accelerate launch [--num_processes N] vqvae/train.py --config RUN_DIR/config.json   # DDP
    python vqvae/train.py --preset smoke run_dir=runs/smoke                              # one device

Reads the data stage's manifest under RUN_DIR/data, writes RUN_DIR/vqvae/{checkpoints,final,
metrics.jsonl,recon-*.png,manifest.json}. Exit status 75 means "checkpointed on a stop signal,
requeue me"; ``--resume auto`` (the default) continues from the newest good checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from runtime.cli import run_cli, stage_parser
from runtime.config import RunConfig, config_from_args
from runtime.cost import forward_macs
from runtime.images import save_grid
from runtime.lineage import begin_stage
from runtime.stages import RunLayout
from runtime.trainer import Critic, TrainPlan, train
from shards.loader import ShardTrainData, make_eval_loader
from vqvae.api import tokenizer_config
from vqvae.discriminator import (
    PatchDiscriminator,
    adaptive_weight,
    batch_mean,
    generator_loss,
    hinge_d_loss,
)
from vqvae.metrics import ReconstructionMeter
from vqvae.models import build_vqvae, count_parameters


class VQVAETask:
    stage = "vqvae"

    def __init__(self, cfg: RunConfig, val_split: Path) -> None:
        self.cfg = cfg
        self.val_split = val_split
        self.adversarial = cfg.vqvae_train.adversarial
        self._outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        """This step's images, reconstructions and reconstruction loss, for the adversarial hooks."""

    def build_model(self) -> torch.nn.Module:
        return build_vqvae(self.cfg.vqvae)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["image"]
        out = model(images)
        # Targets are the [0, 1] images themselves: the decoder ends in a sigmoid (the report fed
        # ImageNet-normalised targets to a sigmoid output, which it can never match).
        # Summed then divided by max(n, 1): a batch emptied by damaged shards still takes part in the
        # DDP step (every rank must), with zero gradient instead of a NaN.
        recon_mse = F.mse_loss(out.recon.float(), images.float(), reduction="sum") / max(images.numel(), 1)
        if self.adversarial.enabled:
            self._outputs = (images, out.recon, recon_mse)
        return recon_mse + out.loss, {"recon_mse": recon_mse, **out.stats}

    # ----- adversarial training (VQGAN), the trainer's CriticTask hooks ------------------------------------
    def build_critic(self) -> Critic | None:
        adv = self.adversarial
        if not adv.enabled:
            return None
        return Critic(PatchDiscriminator(adv.disc_layers, adv.disc_channels),
                      lr=self.cfg.vqvae_train.lr if adv.lr is None else adv.lr, betas=adv.betas,
                      start_step=adv.start_step)

    def adversarial_loss(self, model: torch.nn.Module, critic: torch.nn.Module, loss: torch.Tensor,
                         extras: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert self._outputs is not None, "loss() runs first"
        _, recon, recon_mse = self._outputs
        # The critic's parameters enter as constants: the gradient reaches the reconstruction only, so the
        # model's backward never touches the critic (nor its DDP reducer).
        frozen = {name: p.detach() for name, p in critic.named_parameters()}
        g_adv = generator_loss(functional_call(critic, frozen, (recon.float(),)))
        weight = adaptive_weight(recon_mse, g_adv, model.last_layer) * self.adversarial.weight * self.ramp(step)
        return loss + weight * g_adv, {**extras, "g_adv": g_adv, "adv_weight": weight}

    def ramp(self, step: int) -> float:
        """The share of the adversarial weight at ``step``: linear over ``ramp_steps`` from ``start_step``
        (the first adversarial step already gets 1 / ramp_steps, so no step is spent on a zero term)."""
        adv = self.adversarial
        return 1.0 if adv.ramp_steps == 0 else min(1.0, (step - adv.start_step + 1) / adv.ramp_steps)

    def critic_loss(self, critic: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert self._outputs is not None, "loss() runs first"
        images, recon, _ = self._outputs
        # Real and fake in one forward (GroupNorm: no sample sees another), so DDP sees one forward per backward.
        logits = critic(torch.cat([images.float(), recon.detach().float()]))
        real, fake = logits[:len(images)], logits[len(images):]
        d_loss = hinge_d_loss(real, fake)
        return d_loss, {"d_loss": d_loss, "logits_real": batch_mean(real), "logits_fake": batch_mean(fake)}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int, out_dir: Path) -> tuple[dict[str, float], dict[str, Path]]:
        device = next(model.parameters()).device
        meter = ReconstructionMeter(self.cfg.vqvae.codebook_size)
        grid_path = None
        optim = self.cfg.vqvae_train
        loader = make_eval_loader(self.val_split, batch_size=optim.batch_size, max_batches=optim.eval_batches)
        for batch in loader:
            images = batch["image"].to(device)
            out = model(images)
            meter.update(images, out.recon, out.codes)
            if grid_path is None:  # originals above, reconstructions below
                n = min(8, images.shape[0])
                grid_path = save_grid(torch.cat([images[:n], out.recon[:n].float()]),
                                      out_dir / f"recon-step-{step:07d}.png", nrow=n)
        images_out = {"val/reconstructions": grid_path} if grid_path else {}
        return meter.result(), images_out


def build_plan(cfg: RunConfig, resume: str, data_dir: Path | None = None) -> tuple[VQVAETask, TrainPlan]:
    run = begin_stage(cfg, "vqvae", folders={"data": data_dir} if data_dir else None)
    data_dir = data_dir or RunLayout.of(cfg).stage_dir("data")
    plan = TrainPlan(run=run, data=ShardTrainData(data_dir / "train", data_dir / "val", cfg.vqvae_train),
                     optim=cfg.vqvae_train, config=cfg, resume=resume,
                     model_config=tokenizer_config(cfg.vqvae, cfg.data.image_size))
    return VQVAETask(cfg, data_dir / "val"), plan


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_params:
        model = build_vqvae(cfg.vqvae)
        size = cfg.data.image_size
        print(f"{cfg.vqvae.arch} VQ-VAE parameters: {count_parameters(model):,}")
        print(f"{cfg.vqvae.arch} VQ-VAE MACs per {size}x{size} image (encode, quantize, decode): "
              f"{forward_macs(model, torch.zeros(1, 3, size, size)):,}")
        if (adv := cfg.vqvae_train.adversarial).enabled:
            disc = PatchDiscriminator(adv.disc_layers, adv.disc_channels)
            print(f"discriminator parameters: {count_parameters(disc):,}")
        return 0
    task, plan = build_plan(cfg, args.resume, args.data)
    return train(task, plan)


def parser() -> argparse.ArgumentParser:
    p = stage_parser(__doc__.splitlines()[0], training=True)
    p.add_argument("--data", type=Path, help="image shard directory (default: RUN_DIR/data)")
    p.add_argument("--print-params", action="store_true",
                   help="print the parameter count and the MACs per image and exit")
    return p


if __name__ == "__main__":
    run_cli(main, parser())
