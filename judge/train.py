"""Train the judge: a lesion classifier on the run's real train split (the shared trainer, so DDP,
checkpoints, resume and signals behave as for the VQ-VAE). Its identity depends on the data and its own
settings only, so a changed VQ-VAE or prior never retrains it.

    python judge/train.py --config RUN_DIR/config.json          (or under accelerate launch)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from judge.api import classifier_config
from judge.classifier import balanced_accuracy, build_classifier
from runtime.balance import split_class_weights
from runtime.cli import run_cli, stage_parser
from runtime.config import CLASSES, RunConfig, config_from_args
from runtime.lineage import begin_stage
from runtime.stages import RunLayout
from runtime.trainer import TrainPlan, train
from shards.loader import ShardTrainData, make_eval_loader


class ClassifierTask:
    stage = "classifier"

    def __init__(self, cfg: RunConfig, val_split: Path, weights: torch.Tensor) -> None:
        self.cfg = cfg
        self.val_split = val_split
        self.weights = weights

    def build_model(self) -> torch.nn.Module:
        return build_classifier(self.cfg.classifier, len(CLASSES))

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["image"])
        labels = batch["label"]
        # Summed then divided by max(n, 1), not by the batch's summed weights: the weights average 1 over the
        # data, so this is unbiased, and an empty batch (damaged shards) gives zero gradient, not NaN.
        self.weights = self.weights.to(logits.device)
        loss = F.cross_entropy(logits.float(), labels, weight=self.weights, reduction="sum") / max(len(labels), 1)
        accuracy = (logits.argmax(1) == labels).float().sum() / max(len(labels), 1)
        return loss, {"accuracy": accuracy.detach()}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int, out_dir: Path) -> tuple[dict[str, float], dict[str, Path]]:
        device = next(model.parameters()).device
        guesses, truth = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
        loader = make_eval_loader(self.val_split, batch_size=self.cfg.classifier_train.batch_size,
                                  max_batches=self.cfg.classifier_train.eval_batches)
        for batch in loader:
            guesses.append(model(batch["image"].to(device)).argmax(1).cpu())
            truth.append(batch["label"])
        guessed, labels = torch.cat(guesses), torch.cat(truth)
        return {"accuracy": float((guessed == labels).float().sum() / max(len(labels), 1)),
                "balanced_accuracy": balanced_accuracy(guessed, labels), "chance": 1.0 / len(CLASSES)}, {}


def build_plan(cfg: RunConfig, resume: str) -> tuple[ClassifierTask, TrainPlan]:
    run = begin_stage(cfg, "classifier")
    data_dir = RunLayout.of(cfg).stage_dir("data")
    weights = split_class_weights(run.manifests["data"], cfg.classifier.balance, data_dir / "manifest.json")
    plan = TrainPlan(run=run, data=ShardTrainData(data_dir / "train", data_dir / "val", cfg.classifier_train),
                     optim=cfg.classifier_train, config=cfg, resume=resume,
                     model_config=classifier_config(cfg.classifier, cfg.data.image_size))
    return ClassifierTask(cfg, data_dir / "val", weights), plan


def main(args: argparse.Namespace) -> int:
    task, plan = build_plan(config_from_args(args), args.resume)
    return train(task, plan)


if __name__ == "__main__":
    run_cli(main, stage_parser(__doc__.splitlines()[0], training=True))
