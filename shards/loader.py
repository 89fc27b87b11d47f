"""DataLoaders over image shards for DDP training and evaluation.

Batches are dicts ``{"image": float32 B x 3 x H x W in [0, 1], "label": long B, "key": list[str],
"dropped": list[str]}``. Values are NOT ImageNet-normalised: the report's ``Normalize`` fed a
decoder ending in a sigmoid, so reconstructions could never match their targets (a bug).

See ``shards.stream`` for how samples are shared out (every rank runs the same number of steps
and an epoch covers every training sample exactly once); do not pass these loaders to
``accelerate.prepare()``.
"""

from __future__ import annotations

import io
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader

from runtime.config import ConfigError, OptimConfig
from runtime.seeding import torch_generator
from shards.manifest import ManifestError, read_manifest, shard_paths, verify_shards
from shards.stream import SampleDecoder, ShardStream, collate, steps_per_epoch

__all__ = ["ImageDecoder", "ShardTrainData", "make_eval_loader", "make_train_loader", "steps_per_epoch"]


@dataclass(frozen=True)
class ImageDecoder:
    """jpg/png + cls (+ json, unused) -> {"image", "label", "key"}, with the report's augmentation.

    The random draws come from a generator seeded by (seed, "augment", epoch, key), so a sample
    is augmented identically whichever rank or worker decodes it.
    """

    image_size: int
    augment: bool
    seed: int
    allowed: frozenset[str] = frozenset({"jpg", "jpeg", "png", "cls", "json"})

    def __call__(self, key: str, members: dict[str, bytes], epoch: int) -> dict[str, Any]:
        data = members.get("jpg") or members.get("jpeg") or members.get("png")
        if data is None or "cls" not in members:
            raise ValueError(f"needs an image (jpg/png) and cls member; has {sorted(members)}")
        label = int(members["cls"].decode("ascii").strip())
        # PIL rather than torchvision.io (deprecated since torchvision 0.29); both use libjpeg-turbo.
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
        if image.shape[-2:] != (self.image_size, self.image_size):
            image = TF.resize(image, [self.image_size, self.image_size], antialias=True)
        if self.augment:
            image = self._augment(image, torch_generator(self.seed, "augment", epoch, key))
        return {"image": image.float().div_(255.0), "label": label, "key": key}

    @staticmethod
    def _augment(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # RandomRotation(30) (nearest, zero fill, as torchvision's default) + both flips at p=0.5.
        angle = float(torch.empty(1).uniform_(-30.0, 30.0, generator=gen))
        hflip, vflip = torch.rand(2, generator=gen) < 0.5
        image = TF.rotate(image, angle)
        if hflip:
            image = TF.horizontal_flip(image)
        if vflip:
            image = TF.vertical_flip(image)
        return image


def _loader(stream: ShardStream, num_workers: int) -> DataLoader:
    # batch_size=None: each worker yields whole batches; the DataLoader's in-order round robin over
    # workers then returns them in step order (worker w owns local steps w, w+K, ...).
    # Fork where available, even inside spawned DDP processes: workers are recreated every epoch
    # and a spawned worker spends seconds re-importing torch; they never touch CUDA.
    context = "fork" if num_workers and "fork" in multiprocessing.get_all_start_methods() else None
    return DataLoader(stream, batch_size=None, num_workers=num_workers, multiprocessing_context=context,
                      persistent_workers=False, prefetch_factor=2 if num_workers else None)


def _counts(manifest: dict[str, Any]) -> list[int]:
    return [shard["count"] for shard in manifest["shards"]]


def _empty(image_size: int) -> dict[str, torch.Tensor]:
    return {"image": torch.empty(0, 3, image_size, image_size), "label": torch.empty(0, dtype=torch.long)}


def make_train_loader(split_dir: Path, *, batch_size: int, rank: int, world_size: int, epoch: int, seed: int,
                      start_step: int = 0, num_workers: int = 0, augment: bool = True,
                      image_size: int | None = None, shuffle_buffer: int = 256,
                      decode: SampleDecoder | None = None,
                      collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None) -> DataLoader:
    """This rank's batches for one epoch, starting at ``start_step`` (to resume mid-epoch).

    Yields exactly ``steps_per_epoch(num_samples, batch_size, world_size) - start_step`` batches
    on every rank. ``decode``/``collate_fn`` replace the image decoding for other sample kinds
    (e.g. code shards); the distribution is the same.
    """
    manifest = read_manifest(split_dir)
    size = image_size or manifest.get("image_size", 0)
    decode = decode or ImageDecoder(size, augment, seed)
    stream = ShardStream(shard_paths(split_dir), _counts(manifest), manifest["num_samples"], batch_size, decode,
                         collate_fn or partial(collate, empty=_empty(size)), rank=rank, world_size=world_size,
                         epoch=epoch, seed=seed, start_step=start_step, shuffle=True,
                         shuffle_buffer=shuffle_buffer)
    return _loader(stream, num_workers)


def make_eval_loader(split_dir: Path, *, batch_size: int, rank: int = 0, world_size: int = 1,
                     max_batches: int | None = None, num_workers: int = 0, image_size: int | None = None,
                     decode: SampleDecoder | None = None,
                     collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None) -> DataLoader:
    """Shards in manifest order, no shuffling or augmentation; ranks get disjoint samples."""
    manifest = read_manifest(split_dir)
    size = image_size or manifest.get("image_size", 0)
    decode = decode or ImageDecoder(size, augment=False, seed=0)
    stream = ShardStream(shard_paths(split_dir), _counts(manifest), manifest["num_samples"], batch_size, decode,
                         collate_fn or partial(collate, empty=_empty(size)), rank=rank, world_size=world_size,
                         shuffle=False, max_batches=max_batches)
    return _loader(stream, num_workers)


@dataclass
class ShardTrainData:
    """A training stage's data: the train split it reads per (epoch, step, rank) and the val split its
    evaluation needs (the trainer's :class:`runtime.trainer.TrainData`)."""

    train_split: Path
    val_split: Path
    optim: OptimConfig
    decode: SampleDecoder | None = None

    @property
    def num_samples(self) -> int:
        return int(read_manifest(self.train_split)["num_samples"])

    def steps_per_epoch(self, world_size: int) -> int:
        return steps_per_epoch(self.num_samples, self.optim.batch_size, world_size)

    def loader(self, *, epoch: int, start_step: int, rank: int, world_size: int) -> DataLoader:
        o = self.optim
        return make_train_loader(self.train_split, batch_size=o.batch_size, rank=rank, world_size=world_size,
                                 epoch=epoch, seed=o.seed, start_step=start_step, num_workers=o.num_workers,
                                 augment=o.augment, shuffle_buffer=o.shuffle_buffer, decode=self.decode)

    def check(self, world_size: int) -> None:
        """Refuse shards that are missing, truncated or modified since packing (sha256 against the manifests,
        about 1 s per GB, once per start), an empty val split, or fewer samples than processes. Damaged data
        would otherwise show up only as samples silently missing from every epoch."""
        val = self.val_split
        if (read_manifest(val)["num_samples"] if (val / "manifest.json").is_file() else 0) < 1:
            raise ConfigError(f"{val} holds no samples, so validation cannot run; allowed: data.val_fraction > 0 "
                              "with enough images that the val split gets at least one (e.g. data.num_images)")
        problems = verify_shards(self.train_split) + verify_shards(val)
        if problems:
            raise ManifestError(
                f"{self.train_split.parent}: {len(problems)} shard(s) do not match their manifest, refusing to "
                f"train on them: {'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}. Check with "
                f"`python -m shards inspect {self.train_split.parent}` and repack (python launch/pipeline.py "
                "--only data).")
        if self.num_samples < world_size:
            raise ConfigError(
                f"{world_size} processes but only {self.num_samples} training samples in {self.train_split}; "
                f"every process needs at least one (allowed: 1..{self.num_samples} processes, or more data)")
