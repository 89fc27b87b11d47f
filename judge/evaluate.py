"""Judge a run without pretrained weights, with the classifier the run trained on its own real data.

    python judge/evaluate.py --config RUN_DIR/config.json

Writes RUN_DIR/evaluate/manifest.json with: the classifier's own validation accuracy (how far to trust
it); Fréchet distances in its feature space between the real validation images and (a) their VQ-VAE
reconstructions, (b) the prior's samples, and (c) real training images (the floor a perfect model
would reach with this many images); how often a class-c sample is classified as c, per class; and
reconstruction PSNR/SSIM.
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from judge.classifier import build_classifier, frechet_distance
from runtime.checkpoint import load_weights
from runtime.cli import run_cli, stage_parser
from runtime.config import CLASSES, RunConfig, config_from_args
from runtime.lineage import begin_stage
from runtime.log import get_logger
from runtime.stages import RunLayout
from shards.loader import make_eval_loader
from vqvae.metrics import ReconstructionMeter
from vqvae.models import build_vqvae

log = get_logger("evaluate")


def _sample_images(layout: RunLayout, manifest: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior's decoded samples (png members, never unpickled) and the class each was drawn for."""
    shards = [str(layout.stage_dir("sample") / s["name"]) for s in manifest["shards"]]
    images, labels = [], []
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        pixels = np.array(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
        labels.append(int(sample["cls"]))
    return torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def evaluate(cfg: RunConfig) -> dict[str, Any]:
    run = begin_stage(cfg, "evaluate")
    layout = RunLayout.of(cfg)
    classifier = build_classifier(cfg.classifier, len(CLASSES))
    load_weights(classifier, layout.stage_dir("classifier") / run.manifests["classifier"]["weights"])
    vqvae = build_vqvae(cfg.vqvae)
    load_weights(vqvae, layout.stage_dir("vqvae") / run.manifests["vqvae"]["weights"])
    classifier.eval()
    vqvae.eval()
    batches = -(-cfg.evaluate.max_images // cfg.evaluate.batch_size)

    real, recon, val_labels, val_guesses = [], [], [], []
    meter = ReconstructionMeter(cfg.vqvae.codebook_size)
    for batch in make_eval_loader(layout.stage_dir("data") / "val", batch_size=cfg.evaluate.batch_size,
                                  max_batches=batches):
        images = batch["image"]
        out = vqvae(images)
        meter.update(images, out.recon, out.codes)
        real.append(classifier.features(images))
        recon.append(classifier.features(out.recon.float().clamp(0, 1)))
        val_labels.append(batch["label"])
        val_guesses.append(classifier(images).argmax(1))
    train_real = [classifier.features(b["image"]) for b in make_eval_loader(
        layout.stage_dir("data") / "train", batch_size=cfg.evaluate.batch_size, max_batches=batches)]
    samples, sample_labels = _sample_images(layout, run.manifests["sample"])
    sample_guesses = torch.cat([classifier(chunk).argmax(1) for chunk in samples.split(cfg.evaluate.batch_size)])
    sample_features = torch.cat([classifier.features(chunk) for chunk in samples.split(cfg.evaluate.batch_size)])

    real_features = torch.cat(real)
    per_class = {CLASSES[c]: float((sample_guesses[sample_labels == c] == c).float().mean())
                 for c in range(len(CLASSES)) if (sample_labels == c).any()}
    metrics = {
        "classifier_val_accuracy": float((torch.cat(val_guesses) == torch.cat(val_labels)).float().mean()),
        "chance": 1.0 / len(CLASSES),
        "fd_reconstructions": frechet_distance(real_features, torch.cat(recon)),
        "fd_samples": frechet_distance(real_features, sample_features),
        "fd_real_train_floor": frechet_distance(real_features, torch.cat(train_real)),
        "sample_class_agreement": float(np.mean(list(per_class.values()))) if per_class else 0.0,
        "sample_class_agreement_per_class": per_class,
        "val_images": len(real_features), "samples": len(samples),
        **{f"recon_{k}": v for k, v in meter.result().items() if k in ("psnr", "ssim", "mse")},
    }
    run.claim()
    run.finish(metrics, {"metrics": metrics})
    log.info("evaluation: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


def main(args: argparse.Namespace) -> int:
    evaluate(config_from_args(args))
    return 0


if __name__ == "__main__":
    run_cli(main, stage_parser(__doc__.splitlines()[0]))
