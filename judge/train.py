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

from judge.classifier import build_classifier
from runtime.cli import run_cli, stage_parser
from runtime.config import CLASSES, RunConfig, config_from_args
from runtime.errors import UserError
from runtime.lineage import begin_stage
from runtime.stages import RunLayout
from runtime.trainer import TrainPlan, train
from shards.loader import ShardTrainData, make_eval_loader


def class_weights(counts: dict[str, Any], balance: str, where: Path) -> torch.Tensor:
    """Loss weight of each class (CLASSES order) from the train split's counts: count^-1 (inverse),
    count^-1/2 (sqrt) or 1 (none), scaled so the mean weight over the train samples is 1 (the loss keeps its
    scale); a class without train samples weighs 0."""
    n = []
    for name in CLASSES:
        value = counts.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{where}: splits.train.class_counts.{name} is {value!r}, not a count; re-run the "
                            "data stage")
        n.append(value)
    counts_t = torch.tensor(n, dtype=torch.float64)
    if counts_t.sum() == 0:
        raise UserError(f"{where}: the train split has no labelled samples; re-run the data stage")
    power = {"none": 0.0, "sqrt": 0.5, "inverse": 1.0}[balance]
    weights = torch.where(counts_t > 0, counts_t.clamp_min(1) ** -power, torch.zeros_like(counts_t))
    return (weights * counts_t.sum() / (weights * counts_t).sum()).float()


def _train_counts(manifest: dict[str, Any], where: Path) -> dict[str, Any]:
    splits = manifest.get("splits")
    train = splits.get("train") if isinstance(splits, dict) else None
    counts = train.get("class_counts") if isinstance(train, dict) else None
    if not isinstance(counts, dict):
        raise UserError(f"{where}: no splits.train.class_counts; re-run the data stage")
    return counts


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
        correct = torch.zeros(len(CLASSES))
        seen = torch.zeros(len(CLASSES))
        loader = make_eval_loader(self.val_split, batch_size=self.cfg.classifier_train.batch_size,
                                  max_batches=self.cfg.classifier_train.eval_batches)
        for batch in loader:
            predicted = model(batch["image"].to(device)).argmax(1).cpu()
            for label, guess in zip(batch["label"].tolist(), predicted.tolist(), strict=True):
                seen[label] += 1
                correct[label] += float(label == guess)
        present = seen > 0
        return {"accuracy": float(correct.sum() / seen.sum().clamp_min(1)),
                "balanced_accuracy": float((correct[present] / seen[present]).mean()) if present.any() else 0.0,
                "chance": 1.0 / len(CLASSES)}, {}


def build_plan(cfg: RunConfig, resume: str) -> tuple[ClassifierTask, TrainPlan]:
    run = begin_stage(cfg, "classifier")
    data_dir = RunLayout.of(cfg).stage_dir("data")
    weights = class_weights(_train_counts(run.manifests["data"], data_dir / "manifest.json"),
                            cfg.classifier.balance, data_dir / "manifest.json")
    plan = TrainPlan(run=run, data=ShardTrainData(data_dir / "train", data_dir / "val", cfg.classifier_train),
                     optim=cfg.classifier_train, config=cfg, resume=resume)
    return ClassifierTask(cfg, data_dir / "val", weights), plan


def main(args: argparse.Namespace) -> int:
    task, plan = build_plan(config_from_args(args), args.resume)
    return train(task, plan)


if __name__ == "__main__":
    run_cli(main, stage_parser(__doc__.splitlines()[0], training=True))
