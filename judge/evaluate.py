"""Judge a run without pretrained weights, with the classifier the run trained on its own real data.

    python judge/evaluate.py --config RUN_DIR/config.json                       (the evaluate stage)
    python -m judge.evaluate --run-dir RUN_DIR --images DIR [--csv CSV] [--out FILE]

The stage writes RUN_DIR/evaluate/manifest.json with: the classifier's own validation accuracy (how far to
trust it); Fréchet distances in its feature space between the real validation images and (a) their VQ-VAE
reconstructions, (b) the prior's samples, weighted to the real images' class mix, and (c) real training
images (the floor a perfect model would reach with this many images); how often a class-c sample is
classified as c, per class; what a perfect prior would score through this VQ-VAE (its samples would be
reconstructions of fresh real images: the Fréchet distance of as many reconstructed training images, and the
judge's balanced accuracy on the reconstructed validation images); and reconstruction PSNR/SSIM.

``--images`` judges any other folder of images (e.g. a private set of real ISIC images, of any size) with
a finished run's models, never retraining anything: each image is read, converted and resized exactly as
packing does, then the same measurements are taken against it (reconstruction PSNR/SSIM and Fréchet
distance, Fréchet distance to the run's samples, and the classifier's accuracy when a CSV gives labels, in
the HAM10000 or ISIC 2018/2019 layout packing reads). The result goes to ``--out`` or to
RUN_DIR/judged/NAME-ID.json (ID: the images' content and the run's lineage), and a short table is printed.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from judge.classifier import (
    LesionClassifier,
    balanced_accuracy,
    build_classifier,
    frechet_distance,
    mix_weights,
    recall_per_class,
)
from runtime.checkpoint import load_weights
from runtime.cli import run_cli, stage_parser
from runtime.config import CLASSES, RunConfig, config_from_args
from runtime.errors import UserError
from runtime.files import atomic_write_json
from runtime.integrity import stage_weights, verified_file
from runtime.lineage import begin_stage, completed_inputs, content_digest, token
from runtime.log import get_logger
from runtime.ownership import (
    MARKER,
    OwnershipError,
    foreign_entries,
    read_marker,
    refuse_dangerous_output,
    write_marker,
)
from runtime.schema import not_utf8
from runtime.stages import RunLayout
from shards.config import DataConfig
from shards.fingerprint import input_fingerprint
from shards.images import ImageRejected, decode_rgb, read_image_file
from shards.ingest import find_images, ingest, summarise
from shards.loader import make_eval_loader
from vqvae.metrics import ReconstructionMeter
from vqvae.models import VQVAE, build_vqvae

log = get_logger("evaluate")

IMAGES_FORMAT = "lesion-vq/image-evaluation/v1"
"""Format of the JSON ``--images`` writes (and the only existing file ``--out`` may replace)."""


def _pixels(data: bytes, where: str) -> torch.Tensor:
    """Encoded image bytes (JPEG or PNG only) -> 3×H×W float in [0, 1] (what the shard loader gives the models)."""
    return torch.from_numpy(np.array(decode_rgb(data, where))).permute(2, 0, 1).float() / 255


def _models(cfg: RunConfig, manifests: dict[str, dict[str, Any]]) -> tuple[LesionClassifier, VQVAE]:
    """The run's trained classifier and VQ-VAE, in eval mode."""
    layout = RunLayout.of(cfg)
    classifier = build_classifier(cfg.classifier, len(CLASSES))
    load_weights(classifier, stage_weights(layout.stage_dir("classifier"), manifests["classifier"]))
    vqvae = build_vqvae(cfg.vqvae)
    load_weights(vqvae, stage_weights(layout.stage_dir("vqvae"), manifests["vqvae"]))
    return classifier.eval(), vqvae.eval()


def _samples(cfg: RunConfig, manifest: dict[str, Any], classifier: LesionClassifier) -> tuple[torch.Tensor, ...]:
    """The prior's decoded samples (png members, never unpickled): (features, class guessed, class drawn for)."""
    layout = RunLayout.of(cfg)
    folder = layout.stage_dir("sample")
    shards = [str(verified_file(folder, s.get("name"), s.get("sha256"), manifest=folder / "manifest.json"))
              for s in manifest["shards"]]
    images, labels = [], []
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        images.append(_pixels(sample["png"], f"{sample['__url__']}: {sample['__key__']}"))
        labels.append(int(sample["cls"]))
    chunks = torch.stack(images).split(cfg.evaluate.batch_size)
    return (torch.cat([classifier.features(c) for c in chunks]),
            torch.cat([classifier(c).argmax(1) for c in chunks]), torch.tensor(labels))


class _Judged:
    """Classifier features and guesses of real images and of their reconstructions, batch by batch."""

    def __init__(self, classifier: LesionClassifier, vqvae: VQVAE, codebook_size: int) -> None:
        self.classifier, self.vqvae = classifier, vqvae
        self.meter = ReconstructionMeter(codebook_size)
        self.real: list[torch.Tensor] = []
        self.recon: list[torch.Tensor] = []
        self.guesses: list[torch.Tensor] = []
        self.recon_guesses: list[torch.Tensor] = []

    def add(self, images: torch.Tensor) -> None:
        out = self.vqvae(images)
        self.meter.update(images, out.recon, out.codes)
        self.real.append(self.classifier.features(images))
        self.recon.append(self.classifier.features(out.recon.float().clamp(0, 1)))
        self.guesses.append(self.classifier.head(self.real[-1]).argmax(1))
        self.recon_guesses.append(self.classifier.head(self.recon[-1]).argmax(1))

    def reconstruction(self) -> dict[str, float]:
        return {"fd_reconstructions": frechet_distance(torch.cat(self.real), torch.cat(self.recon)),
                **{f"recon_{k}": v for k, v in self.meter.result().items() if k in ("psnr", "ssim", "mse")}}

    def recon_balanced_accuracy(self, truth: torch.Tensor) -> float:
        """The judge on the reconstructions: what ``sample_class_agreement`` would be for a perfect prior."""
        return balanced_accuracy(torch.cat(self.recon_guesses), truth)


def _judge_train(cfg: RunConfig, classifier: LesionClassifier, vqvae: VQVAE, count: int) -> _Judged:
    """The first ``count`` training images (rounded up to whole batches) and their reconstructions, judged in
    one pass. Those reconstructions are what a perfect prior's samples would be: decoded code grids of fresh
    real images, in the data's own class mix."""
    judged = _Judged(classifier, vqvae, cfg.vqvae.codebook_size)
    for batch in make_eval_loader(RunLayout.of(cfg).stage_dir("data") / "train", batch_size=cfg.evaluate.batch_size,
                                  max_batches=-(-count // cfg.evaluate.batch_size)):
        judged.add(batch["image"])
    return judged


def _fd_samples(cfg: RunConfig, real: torch.Tensor, real_labels: torch.Tensor | None, samples: torch.Tensor,
                sample_labels: torch.Tensor) -> float:
    """Real images against samples, the samples weighted to the real images' class mix when the prior drew
    them per class (conditional) and the real labels are known; an unconditional prior's samples follow the
    data's own mix already."""
    weights = mix_weights(sample_labels, real_labels) if cfg.prior.conditional and real_labels is not None else None
    if weights is not None and int((weights > 0).sum()) < 2:
        raise UserError(f"only {int((weights > 0).sum())} sample(s) of the classes the real images hold "
                        f"({sorted({CLASSES[int(c)] for c in real_labels})}); a Fréchet distance needs 2. "
                        "Raise sample.per_class (or sample.min_per_class)")
    return frechet_distance(real, samples, weights_b=weights)


@torch.no_grad()
def evaluate(cfg: RunConfig) -> dict[str, Any]:
    run = begin_stage(cfg, "evaluate")
    layout = RunLayout.of(cfg)
    classifier, vqvae = _models(cfg, run.manifests)
    batches = -(-cfg.evaluate.max_images // cfg.evaluate.batch_size)

    judged = _Judged(classifier, vqvae, cfg.vqvae.codebook_size)
    val_labels = []
    for batch in make_eval_loader(layout.stage_dir("data") / "val", batch_size=cfg.evaluate.batch_size,
                                  max_batches=batches):
        judged.add(batch["image"])
        val_labels.append(batch["label"])
    sample_features, sample_guesses, sample_labels = _samples(cfg, run.manifests["sample"], classifier)
    train = _judge_train(cfg, classifier, vqvae, max(batches * cfg.evaluate.batch_size, len(sample_labels)))
    train_real = torch.cat(train.real)[:batches * cfg.evaluate.batch_size]
    perfect = torch.cat(train.recon)[:len(sample_labels)]

    real_features = torch.cat(judged.real)
    per_class = recall_per_class(sample_guesses, sample_labels)
    val_guesses, val_truth = torch.cat(judged.guesses), torch.cat(val_labels)
    recon = judged.reconstruction()
    metrics = {
        "classifier_val_accuracy": float((val_guesses == val_truth).float().mean()),
        # The mean per-class recall on real images: what sample_class_agreement would be for perfect samples.
        "classifier_val_balanced_accuracy": balanced_accuracy(val_guesses, val_truth),
        "chance": 1.0 / len(CLASSES),
        "fd_reconstructions": recon.pop("fd_reconstructions"),
        "fd_samples": _fd_samples(cfg, real_features, val_truth, sample_features, sample_labels),
        "fd_real_train_floor": frechet_distance(real_features, train_real),
        "fd_samples_floor": frechet_distance(real_features, perfect),
        "classifier_recon_balanced_accuracy": judged.recon_balanced_accuracy(val_truth),
        "sample_class_agreement": balanced_accuracy(sample_guesses, sample_labels),
        "sample_class_agreement_per_class": per_class,
        "val_images": len(real_features), "samples": len(sample_labels),
        **recon,
    }
    run.claim()
    run.finish(metrics, {"metrics": metrics})
    log.info("evaluation: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


# ----- --images: another image set judged with a finished run ------------------------------------------
def labelled_images(images_dir: Path,
                    csv: Path | None) -> tuple[list[tuple[str, Path, int | None]], list[dict[str, str]]]:
    """(id, file, label or None) of every image, sorted by id, and what was skipped; labels from the CSV."""
    if csv is None:
        found, skipped = find_images(images_dir)
        return [(image_id, path, None) for image_id, path in sorted(found.items())], skipped
    result = ingest(images_dir, csv)
    return sorted((r.image_id, r.path, r.label) for r in result.records), result.skipped


def read_batches(items: list[tuple[str, Path, int | None]], cfg: DataConfig, batch_size: int,
                 skipped: list[dict[str, str]]) -> Iterator[tuple[torch.Tensor, list[int | None]]]:
    """Batches of images read, converted and resized as packing stores them (JPEG at the run's size and
    quality, decoded again); unreadable files are added to ``skipped`` and left out."""
    images: list[torch.Tensor] = []
    labels: list[int | None] = []
    for image_id, path, label in items:
        try:
            jpeg, _ = read_image_file(path, cfg.image_size, cfg.jpeg_quality)
        except ImageRejected as err:
            skipped.append({"id": image_id, "path": str(path), "kind": "unreadable", "reason": str(err)})
            log.warning("skipped %s: %s", image_id, err)
            continue
        images.append(_pixels(jpeg, str(path)))
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), labels
            images, labels = [], []
    if images:
        yield torch.stack(images), labels


def _output_path(layout: RunLayout, images_dir: Path, ident: str, out: Path | None) -> Path:
    """``out`` when it is new or an earlier result of ours; else RUN_DIR/judged/NAME-ID.json, in a folder
    carrying our marker. A file or folder lesion-vq did not write is never replaced."""
    if out is not None:
        if out.is_dir():
            raise OwnershipError(f"--out {out} is a folder; give the JSON file to write")
        if out.exists():
            try:
                ours = json.loads(out.read_text()).get("format") == IMAGES_FORMAT
            except (OSError, ValueError, AttributeError):
                ours = False
            if not ours:
                raise OwnershipError(f"--out {out} exists and is not an evaluation lesion-vq wrote; nothing was "
                                     "changed. Choose a new file name")
        return out
    folder = layout.judged
    if folder.exists() and (not folder.is_dir() or (read_marker(folder) is None and foreign_entries(folder, set()))):
        raise OwnershipError(f"{folder} exists and was not created by lesion-vq (no {MARKER}); nothing was "
                             "changed. Move it away or give --out FILE")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", images_dir.resolve().name).strip("._") or "images"
    return folder / f"{name}-{ident}.json"


@torch.no_grad()
def evaluate_images(cfg: RunConfig, images_dir: Path, csv: Path | None, out: Path | None) -> dict[str, Any]:
    """Judge the images in ``images_dir`` (labels from ``csv``, if given) with the run's models; writes and
    returns the result (see the module docstring)."""
    images_dir, csv = Path(images_dir).absolute(), None if csv is None else Path(csv).absolute()
    layout = RunLayout.of(cfg)
    written = ("output folder", layout.judged) if out is None else ("--out", Path(out))
    refuse_dangerous_output(written[1], written[0], {"images": images_dir, "CSV": csv})
    manifests = completed_inputs(cfg, "evaluate")  # one line if the run is unfinished or of other settings
    items, skipped = labelled_images(images_dir, csv)
    lineage = {name: token(manifests[name]) for name in ("classifier", "vqvae", "sample")}
    fingerprint = input_fingerprint(DataConfig(source="isic", isic_images=images_dir, isic_csv=csv))
    ident = content_digest({"images": fingerprint, "run": lineage})
    path = _output_path(layout, images_dir, ident, out)

    classifier, vqvae = _models(cfg, manifests)
    judged = _Judged(classifier, vqvae, cfg.vqvae.codebook_size)
    labels: list[int | None] = []
    for images, batch_labels in read_batches(items, cfg.data, cfg.evaluate.batch_size, skipped):
        judged.add(images)
        labels += batch_labels
    if len(labels) < 2:
        raise UserError(f"{images_dir}: {len(labels)} readable image(s); judging needs at least 2 (Fréchet "
                        f"distances). Skipped: {summarise(skipped)}")
    sample_features, _, sample_labels = _samples(cfg, manifests["sample"], classifier)
    real = torch.cat(judged.real)
    truth = torch.tensor(labels) if csv is not None else None
    metrics: dict[str, Any] = {
        **judged.reconstruction(),
        "fd_samples": _fd_samples(cfg, real, truth, sample_features, sample_labels),
        "fd_samples_floor": frechet_distance(
            real, torch.cat(_judge_train(cfg, classifier, vqvae, len(sample_labels)).recon)[:len(sample_labels)])}
    if truth is not None:
        guesses = torch.cat(judged.guesses)
        metrics |= {"classifier_accuracy": float((guesses == truth).float().mean()),
                    "classifier_balanced_accuracy": balanced_accuracy(guesses, truth),
                    "classifier_accuracy_per_class": recall_per_class(guesses, truth), "chance": 1.0 / len(CLASSES),
                    "classifier_recon_balanced_accuracy": judged.recon_balanced_accuracy(truth)}
    result = {"format": IMAGES_FORMAT, "run_dir": str(layout.root), "run": lineage, "images": str(images_dir),
              "csv": None if csv is None else str(csv), "inputs_fingerprint": fingerprint,
              "image_size": cfg.data.image_size, "images_judged": len(labels), "samples": len(sample_features),
              "labelled": csv is not None,
              "class_counts": {CLASSES[c]: labels.count(c) for c in range(len(CLASSES))} if csv else None,
              "skipped": skipped, "metrics": metrics, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if out is None and read_marker(path.parent) is None:
        write_marker(path.parent, "judged")
    atomic_write_json(path, result)
    print(_table(result, path))
    return result


def _table(result: dict[str, Any], path: Path) -> str:
    m = result["metrics"]
    rows = [("reconstruction PSNR", f"{m['recon_psnr']:.2f} dB"), ("reconstruction SSIM", f"{m['recon_ssim']:.4f}"),
            ("Fréchet distance, reconstructions", f"{m['fd_reconstructions']:.4g}"),
            ("Fréchet distance, run's samples", f"{m['fd_samples']:.4g} ({result['samples']} samples)"),
            ("Fréchet distance, a perfect prior's", f"{m['fd_samples_floor']:.4g}")]
    if "classifier_accuracy" in m:
        rows += [("classifier accuracy", f"{m['classifier_accuracy']:.3f} (balanced "
                                         f"{m['classifier_balanced_accuracy']:.3f}, chance {m['chance']:.3f}; "
                                         f"on reconstructions {m['classifier_recon_balanced_accuracy']:.3f})")]
    kinds = Counter(s["kind"] for s in result["skipped"])
    skipped = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "none"
    head = (f"{result['images_judged']} images from {result['images']} judged with {result['run_dir']} "
            f"(skipped: {skipped})")
    return "\n".join([head, *(f"  {name:<36} {value}" for name, value in rows), f"written: {path}"])


def main(args: argparse.Namespace) -> int:
    if args.images is None:
        if args.run_dir or args.csv or args.out:
            raise UserError("--run-dir, --csv and --out go with --images DIR (judging another image set)")
        evaluate(config_from_args(args))
        return 0
    if args.run_dir is not None:
        if args.config is not None or args.preset is not None:
            raise UserError("--run-dir RUN_DIR is --config RUN_DIR/config.json; give one of them, without --preset")
        args.config = args.run_dir / "config.json"
    elif args.config is None:
        raise UserError("--images needs the finished run to judge with: --run-dir RUN_DIR")
    for flag, path in (("--images", args.images), ("--csv", args.csv), ("--out", args.out)):
        if path is not None and (problem := not_utf8(path)) is not None:
            raise UserError(f"{flag}: {problem}")
    evaluate_images(config_from_args(args), args.images, args.csv, args.out)
    return 0


def parser() -> argparse.ArgumentParser:
    p = stage_parser(__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, help="with --images: the finished run (= --config RUN_DIR/config.json)")
    p.add_argument("--images", type=Path, help="judge this folder of images (any size) instead of the validation "
                                               "split; nothing is trained or changed in the run")
    p.add_argument("--csv", type=Path, help="with --images: labels (HAM10000 or ISIC 2018/2019 ground truth CSV); "
                                            "omit for unlabelled images")
    p.add_argument("--out", type=Path, help="with --images: JSON file to write (default RUN_DIR/judged/NAME-ID.json)")
    return p


if __name__ == "__main__":
    run_cli(main, parser())
