"""Do the synthetic lesions help a classifier? Fresh classifiers of the judge's recipe, three arms, several seeds.

    python judge/augment.py --config RUN_DIR/config.json          (the augment stage)

Arms, each trained ``augment.seeds`` times (seeds ``augment.seed`` + i) from scratch with the judge's
architecture, loss (class weights from the arm's own training images), optimiser and ``augment.max_steps``
steps, through the shared trainer (runtime/trainer.py), never the judge itself:

* ``real``: the real train split, no augmentation;
* ``synthetic``: the real train split plus the sample stage's labelled data set (prior/dataset.py; classes
  ``augment.classes``, at most ``augment.per_class`` of each), packed as real data is packed (train split only:
  synthetic images never enter a validation or test split), no augmentation;
* ``augmented``: the real train split with the standard augmentation: the report's rotations (±30°) and flips,
  plus colour jitter (``augment.jitter``).

So ``synthetic - real`` is what the synthetic images add, ``synthetic - augmented`` whether they beat standard
augmentation. Every model is judged on the real **test** split only (no stage trains or chooses anything on it;
the trainings' own validations use the val split and choose nothing either: the last step's weights are used).
RUN_DIR/augment/manifest.json holds per arm the mean ± std over seeds of balanced accuracy, macro F1 and
per-class recall/F1, the paired differences with bootstrap confidence intervals (judge/comparison.py), the
synthetic images used (their ids) and the cost. Each training is its own folder (``ARM-seedS/``, resumable, as
any training); a rerun reuses finished ones.

    python judge/augment.py --config RUN_DIR/config.json --images DIR --csv CSV

judges the finished stage's classifiers on another labelled image set instead (e.g. private ISIC images), with
the same table, printed; nothing is trained or written.
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torch import nn

from judge.api import classifier_config
from judge.classifier import build_classifier
from judge.comparison import class_scores, comparison_tables, markdown, paired_differences, summarise_arm
from judge.config import ARMS
from judge.evaluate import labelled_images, read_batches
from judge.train import ClassifierTask
from prior.dataset import CSV_NAME, read_dataset
from runtime.balance import class_weights
from runtime.checkpoint import load_weights
from runtime.cli import run_cli, stage_parser
from runtime.config import CLASSES, RunConfig, config_from_args
from runtime.errors import UserError
from runtime.files import atomic_write_json, atomic_write_text, read_json
from runtime.integrity import stage_weights
from runtime.lineage import StageRun, begin_stage, content_digest
from runtime.log import get_logger
from runtime.ownership import read_marker, write_marker
from runtime.seeding import torch_generator
from runtime.stages import MANIFEST, RunLayout, read_stage_manifest
from runtime.train_config import OptimConfig
from runtime.trainer import TrainPlan, train
from shards.config import DataConfig
from shards.ingest import summarise
from shards.loader import ImageDecoder, ShardTrainData, make_eval_loader, split_manifest
from shards.pack import pack_isic

log = get_logger("augment")
PAIRS = [("synthetic", "real"), ("synthetic", "augmented")]
TIMING = "timing.json"
"""Beside a training's manifest: the seconds it took (its cost, reported even when a rerun reuses it)."""


@dataclass(frozen=True)
class JitteredDecoder:
    """The report's rotation and flips (ImageDecoder), then brightness, contrast and saturation each scaled by a
    factor in [1 - strength, 1 + strength], drawn from a generator seeded by (seed, "jitter", epoch, key): the
    same whichever worker decodes the sample."""

    inner: ImageDecoder
    strength: float

    @property
    def allowed(self) -> frozenset[str]:
        return self.inner.allowed

    def for_split(self, split_dir: Path, manifest: dict[str, Any]) -> JitteredDecoder:
        return replace(self, inner=self.inner.for_split(split_dir, manifest))

    def empty(self) -> dict[str, torch.Tensor]:
        return self.inner.empty()

    def __call__(self, key: str, members: dict[str, bytes], epoch: int) -> dict[str, Any]:
        sample = self.inner(key, members, epoch)
        draws = torch.rand(3, generator=torch_generator(self.inner.seed, "jitter", epoch, key))
        brightness, contrast, saturation = (1 + self.strength * (2 * draws - 1)).tolist()
        image = TF.adjust_brightness(sample["image"], brightness)
        image = TF.adjust_contrast(image, contrast)
        sample["image"] = TF.adjust_saturation(image, saturation).clamp_(0, 1)
        return sample


def synthetic_rows(cfg: RunConfig, run: StageRun) -> list[dict[str, str]]:
    """The data set's rows the synthetic arm adds: classes ``augment.classes``, at most ``augment.per_class``
    of each (lowest sample index first), every file verified against its recorded sha256."""
    rows = read_dataset(RunLayout.of(cfg).stage_dir("sample"), run.manifests["sample"])
    wanted = {c.lower() for c in cfg.augment.classes}
    taken: Counter[str] = Counter()
    chosen = []
    for row in sorted(rows, key=lambda r: int(r["sample_index"])):
        if row["dx"] in wanted and (not cfg.augment.per_class or taken[row["dx"]] < cfg.augment.per_class):
            taken[row["dx"]] += 1
            chosen.append(row)
    if not chosen:
        raise UserError(f"the sample stage's data set holds no image of augment.classes={cfg.augment.classes} "
                        f"(it holds {dict(Counter(r['dx'] for r in rows))}); choose other classes or draw them "
                        "(sample.class_mix, sample.top_up_to)")
    return chosen


def pack_synthetic(cfg: RunConfig, run: StageRun, rows: list[dict[str, str]]) -> Path:
    """The chosen synthetic images packed as real data is packed (same size and JPEG quality), every one in the
    train split; returns that split's folder. The selection's CSV is written beside them first."""
    folder = run.out_dir / "synthetic"
    if read_marker(folder) is None:
        write_marker(folder, "synthetic-selection", identity=run.identity)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / CSV_NAME, text.getvalue())
    images = RunLayout.of(cfg).stage_dir("sample") / "dataset" / "images"
    data = DataConfig(source="isic", isic_images=images, isic_csv=folder / CSV_NAME, image_size=cfg.data.image_size,
                      jpeg_quality=cfg.data.jpeg_quality, shard_max_count=cfg.data.shard_max_count,
                      val_fraction=0.0, test_fraction=0.0, workers=1)
    manifest = pack_isic(data, folder / "shards")
    if manifest["found"] != len(rows) or manifest["splits"]["train"]["num_samples"] != len(rows):
        raise UserError(f"{folder / 'shards'}: {manifest['splits']['train']['num_samples']} of {len(rows)} "
                        f"synthetic images packed ({manifest['skipped'][:3]}); re-make the sample stage")
    return folder / "shards" / "train"


def _optim(cfg: RunConfig, arm: str, seed: int) -> OptimConfig:
    """The judge's optimisation for one training; a shortened one (augment.max_steps) keeps the shape of the
    schedule: its warm-up is shortened in proportion."""
    judge = cfg.classifier_train
    steps = cfg.augment.max_steps or judge.max_steps
    return judge.model_copy(update={
        "max_steps": steps, "seed": seed, "augment": arm == "augmented",
        "warmup_steps": judge.warmup_steps * steps // judge.max_steps,
        "eval_every": min(judge.eval_every, steps), "checkpoint_every": min(judge.checkpoint_every, steps)})


def train_arm(cfg: RunConfig, run: StageRun, arm: str, seed: int, synthetic: Path) -> tuple[nn.Module, float]:
    """One training of ``arm`` with ``seed`` in its own folder (reused when finished with these inputs);
    returns the trained classifier and the seconds its training took."""
    data_dir = RunLayout.of(cfg).stage_dir("data")
    more = (synthetic,) if arm == "synthetic" else ()
    optim = _optim(cfg, arm, seed)
    sub = StageRun(run.name, run.out_dir / f"{arm}-seed{seed}",
                   content_digest({"stage": run.identity, "arm": arm, "seed": seed}), run.upstream, run.lineage,
                   run.settings, run.manifests)
    done = sub.out_dir / MANIFEST
    if not (done.is_file() and read_json(done).get("identity") == sub.identity):
        counts = Counter(split_manifest(data_dir / "train")["class_counts"])
        counts.update(split_manifest(synthetic)["class_counts"] if more else {})
        weights = class_weights(dict(counts), cfg.classifier.balance, data_dir / "train" / MANIFEST)
        decode = JitteredDecoder(ImageDecoder(augment=True, seed=seed), cfg.augment.jitter) if (
            arm == "augmented") else None
        plan = TrainPlan(run=sub, data=ShardTrainData(data_dir / "train", data_dir / "val", optim, decode, more),
                         optim=optim, config=cfg, resume="auto",
                         model_config=classifier_config(cfg.classifier, cfg.data.image_size))
        started = time.perf_counter()
        status = train(ClassifierTask(cfg, data_dir / "val", weights), plan)
        if status:
            raise SystemExit(status)  # stopped by a signal: its checkpoint is saved; a rerun resumes it
        atomic_write_json(sub.out_dir / TIMING, {"seconds": time.perf_counter() - started})
    timing = sub.out_dir / TIMING
    return trained_model(cfg, sub.out_dir), float(read_json(timing)["seconds"]) if timing.is_file() else 0.0


def trained_model(cfg: RunConfig, folder: Path) -> nn.Module:
    """The classifier a finished training folder holds (its weights verified against its manifest)."""
    model = build_classifier(cfg.classifier, len(CLASSES))
    load_weights(model, stage_weights(folder, read_json(folder / MANIFEST)))
    return model.eval()


@torch.no_grad()
def classify_test(cfg: RunConfig, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(guesses, truth) of ``model`` on every image of the real test split, in manifest order."""
    guesses, truth = [], []
    for batch in make_eval_loader(RunLayout.of(cfg).stage_dir("data") / "test", batch_size=cfg.augment.batch_size):
        guesses.append(model(batch["image"]).argmax(1))
        truth.append(batch["label"])
    return torch.cat(guesses), torch.cat(truth)


def compare(cfg: RunConfig, guesses: dict[str, torch.Tensor], truth: torch.Tensor) -> dict[str, Any]:
    """The arms' scores (mean ± std over seeds) and paired differences for ``guesses`` (arm -> seeds x N) of
    the labelled images ``truth``."""
    a = cfg.augment
    return {"arms": {arm: summarise_arm([class_scores(g, truth) for g in guesses[arm]]) for arm in guesses},
            "differences": paired_differences(guesses, truth, PAIRS, a.bootstrap, a.confidence, a.seed),
            "test_images": len(truth),
            "test_class_counts": {CLASSES[c]: int((truth == c).sum()) for c in range(len(CLASSES))}}


def run_augment(cfg: RunConfig) -> dict[str, Any]:
    run = begin_stage(cfg, "augment")
    test_split = RunLayout.of(cfg).stage_dir("data") / "test"
    if not split_manifest(test_split)["num_samples"]:
        raise UserError(f"{test_split} holds no images: the augment stage judges on the test split only; "
                        "allowed: data.test_fraction > 0 with enough lesions for it")
    run.claim()
    started = time.perf_counter()
    rows = synthetic_rows(cfg, run)
    synthetic = pack_synthetic(cfg, run, rows)
    seeds = [cfg.augment.seed + i for i in range(cfg.augment.seeds)]
    guesses: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    truth = torch.empty(0, dtype=torch.long)
    for arm in ARMS:
        per_seed = []
        for seed in seeds:
            model, took = train_arm(cfg, run, arm, seed, synthetic)
            seconds[f"{arm}-seed{seed}"] = took
            guessed, truth = classify_test(cfg, model)
            per_seed.append(guessed)
            log.info("%s seed %d: test balanced accuracy %.3f", arm, seed, class_scores(guessed, truth)[
                "balanced_accuracy"])
        guesses[arm] = torch.stack(per_seed)
    real_train = split_manifest(RunLayout.of(cfg).stage_dir("data") / "train")["num_samples"]
    added = Counter(r["dx"] for r in rows)
    result = {
        **compare(cfg, guesses, truth),
        "train_images": {"real": real_train, "synthetic": real_train + len(rows), "augmented": real_train},
        "synthetic_added": {c: added[c.lower()] for c in CLASSES},
        "synthetic_images": [r["image_id"] for r in rows],
        "seeds": seeds, "steps": _optim(cfg, "real", 0).max_steps, "batch_size": cfg.classifier_train.batch_size,
        "cost": {"training_seconds": seconds, "total_seconds": time.perf_counter() - started,
                 "trainings": len(seconds)},
    }
    run.finish({"guesses": {arm: g.tolist() for arm, g in guesses.items()}, "synthetic": result["synthetic_images"]},
               result)
    for headers, table_rows in comparison_tables(result):
        print(markdown(headers, table_rows) + "\n")
    return result


@torch.no_grad()
def judge_images(cfg: RunConfig, images: Path, labels: Path) -> dict[str, Any]:
    """The finished augment stage's classifiers judged on another labelled image set (e.g. private ISIC
    images; read, converted and resized as packing does), with the same table; prints it, writes nothing."""
    stage_dir = RunLayout.of(cfg).stage_dir("augment")
    manifest = read_stage_manifest(stage_dir, "augment")
    items, skipped = labelled_images(Path(images).absolute(), Path(labels).absolute())
    batches = list(read_batches(items, cfg.data, cfg.augment.batch_size, skipped))
    if not batches:
        raise UserError(f"{images}: no readable labelled image; skipped: {summarise(skipped)}")
    truth = torch.tensor([label for _, batch_labels in batches for label in batch_labels])
    guesses = {}
    for arm in (a for a in ARMS if a in manifest["arms"]):
        models = [trained_model(cfg, stage_dir / f"{arm}-seed{seed}") for seed in manifest["seeds"]]
        guesses[arm] = torch.stack([torch.cat([m(b).argmax(1) for b, _ in batches]) for m in models])
    result = {**manifest, **compare(cfg, guesses, truth), "images": str(images), "skipped": len(skipped)}
    print(f"{len(truth)} labelled images from {images} (skipped: {summarise(skipped)}), {len(manifest['seeds'])} "
          f"classifiers per arm from {stage_dir}\n")
    for headers, table_rows in comparison_tables(result):
        print(markdown(headers, table_rows) + "\n")
    return result


def main(args: argparse.Namespace) -> int:
    if (args.images is None) != (args.csv is None):
        raise UserError("--images DIR and --csv CSV go together (judging another labelled image set)")
    cfg = config_from_args(args)
    if args.images is None:
        run_augment(cfg)
    else:
        judge_images(cfg, args.images, args.csv)
    return 0


def parser() -> argparse.ArgumentParser:
    p = stage_parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, help="judge the finished stage's classifiers on this folder of images "
                                               "instead of training (nothing is written)")
    p.add_argument("--csv", type=Path, help="with --images: their labels (HAM10000 or ISIC 2018/2019 ground truth)")
    return p


if __name__ == "__main__":
    run_cli(main, parser())
