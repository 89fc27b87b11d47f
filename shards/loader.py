"""DataLoaders over image shards for DDP training and evaluation.

Batches are dicts ``{"image": float32 B x 3 x H x W in [0, 1], "label": long B, "key": list[str],
"dropped": list[str]}``. Values are NOT ImageNet-normalised: the report's ``Normalize`` fed a
decoder ending in a sigmoid, so reconstructions could never match their targets (a bug).

See ``shards.stream`` for how samples are shared out (every rank runs the same number of steps
and an epoch covers every training sample exactly once); do not pass these loaders to
``accelerate.prepare()``.
"""

from __future__ import annotations

import multiprocessing
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache, cached_property, partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from runtime.errors import ConfigError
from runtime.log import get_logger
from runtime.process import die_with_parent
from runtime.seeding import torch_generator
from runtime.train_config import OptimConfig
from shards.config import CLASSES
from shards.images import ImageRejected, open_image
from shards.manifest import ManifestError, read_manifest, shard_paths, verify_shards
from shards.stream import SampleDecoder, SampleRefused, ShardStream, collate, steps_per_epoch

__all__ = ["ImageDecoder", "ShardTrainData", "class_label", "declared", "make_eval_loader", "make_train_loader",
           "split_manifest", "steps_per_epoch"]

log = get_logger(__name__)

_CLASS_INDEX = re.compile(rb"\s*([+-]?[0-9]{1,18})\s*")
_SHARD_NAME = re.compile(r"shard-[0-9]{6}\.tar")
"""The only shard names stages write: a manifest naming '../x' or '/abs' is refused, never followed."""


def class_label(raw: bytes) -> int:
    """A sample's ``cls`` member as a class index, checked to be one of runtime.config.CLASSES."""
    match = _CLASS_INDEX.fullmatch(raw)
    if match is None:
        raise SampleRefused(f"cls {raw[:24]!r} is not a class index (an integer 0..{len(CLASSES) - 1})")
    label = int(match.group(1))
    if not 0 <= label < len(CLASSES):
        raise SampleRefused(f"class {label} is outside 0..{len(CLASSES) - 1} ({', '.join(CLASSES)})")
    return label


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def declared(split_dir: Path, manifest: dict[str, Any], key: str, low: int) -> int:
    """An integer the split's manifest declares (image_size, codebook_size, ...), checked to be >= ``low``."""
    value = manifest.get(key)
    if not _is_int(value, low):
        raise ManifestError(f"{Path(split_dir) / 'manifest.json'}: {key} is {value!r}; expected an integer "
                            f">= {low} (a hand-edited or foreign manifest?)")
    return int(value)


def split_manifest(split_dir: Path) -> dict[str, Any]:
    """A split's manifest with the values the reader relies on checked: shard names (no path may escape the
    split folder), per-shard counts and their sum, and the image size / codebook / grid it declares."""
    manifest = read_manifest(split_dir)
    where = Path(split_dir) / "manifest.json"
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise ManifestError(f"{where}: shards is {type(shards).__name__}, expected a list of shard entries")
    for shard in shards:
        if not isinstance(shard.get("name"), str) or not _SHARD_NAME.fullmatch(shard["name"]):
            raise ManifestError(f"{where}: shard name {shard.get('name')!r} is not of the form shard-NNNNNN.tar")
        if not _is_int(shard.get("count"), 0):
            raise ManifestError(f"{where}: {shard['name']} count is {shard.get('count')!r}; expected an integer >= 0")
        _check_offsets(where, shard)
    total = declared(split_dir, manifest, "num_samples", 0)
    if total != sum(s["count"] for s in shards):
        raise ManifestError(f"{where}: num_samples {total} != {sum(s['count'] for s in shards)}, the sum of its "
                            "shards' counts")
    for key, low in (("image_size", 1), ("codebook_size", 2)):
        if key in manifest:
            declared(split_dir, manifest, key, low)
    grid = manifest.get("grid")
    if grid is not None and not (isinstance(grid, list) and len(grid) == 2 and all(_is_int(g, 1) for g in grid)):
        raise ManifestError(f"{where}: grid is {grid!r}; expected [rows, columns], two integers >= 1")
    return manifest


def _check_offsets(where: Path, shard: dict[str, Any]) -> None:
    """The shard's sample index: count + 1 increasing byte offsets inside the shard's declared size."""
    offsets, name = shard.get("offsets"), shard["name"]
    if offsets is None:
        raise ManifestError(f"{where}: {name} has no sample index (offsets): written by an older lesion-vq. "
                            "Re-make the folder (python launch/pipeline.py --from STAGE, or python -m shards pack)")
    if not (isinstance(offsets, list) and len(offsets) == shard["count"] + 1 and all(_is_int(o, 0) for o in offsets)
            and all(a < b for a, b in pairwise(offsets)) and _is_int(shard.get("bytes"), 0)
            and (not offsets or offsets[-1] <= shard["bytes"])):
        raise ManifestError(f"{where}: {name} offsets are not {shard['count'] + 1} increasing byte offsets within "
                            "its size (a hand-edited or foreign manifest?)")


@dataclass(frozen=True)
class ImageDecoder:
    """jpg/png + cls (+ json, unused) -> {"image", "label", "key"}, with the report's augmentation.

    ``image_size`` 0 takes the split's (:meth:`for_split`). Every sample is checked where it enters: class
    in 0..len(CLASSES)-1, 8-bit RGB, exactly the split's size (checked from the header, before decoding:
    nothing is resized, so a foreign image never trains at a size nobody chose).

    The random draws come from a generator seeded by (seed, "augment", epoch, key), so a sample
    is augmented identically whichever rank or worker decodes it.
    """

    image_size: int = 0
    augment: bool = False
    seed: int = 0
    defer: bool = False
    """Hand over the encoded image and its augmentation draws instead of pixels: the training process
    decodes whole batches on its device (:func:`decode_on_device`), where a GPU does it far faster."""
    allowed: frozenset[str] = frozenset({"jpg", "jpeg", "png", "cls", "json"})

    def for_split(self, split_dir: Path, manifest: dict[str, Any]) -> ImageDecoder:
        size = declared(split_dir, manifest, "image_size", 1)
        if self.image_size not in (0, size):
            raise ManifestError(f"{split_dir} holds {size} px images (its manifest), but {self.image_size} px "
                                f"were asked for; repack with data.image_size={self.image_size} "
                                "(python launch/pipeline.py --only data) or train at the packed size")
        if self.augment:
            _rotate()  # see _rotate
        return replace(self, image_size=size)

    def empty(self) -> dict[str, torch.Tensor]:
        pixels = {"augment": torch.empty(0, 3)} if self.defer else {
            "image": torch.empty(0, 3, self.image_size, self.image_size)}
        return {**pixels, "label": torch.empty(0, dtype=torch.long)}

    def __call__(self, key: str, members: dict[str, bytes], epoch: int) -> dict[str, Any]:
        data = members.get("jpg") or members.get("jpeg") or members.get("png")
        if data is None or "cls" not in members:
            raise ValueError(f"needs an image (jpg/png) and cls member; has {sorted(members)}")
        label = class_label(members["cls"])
        # PIL rather than torchvision.io (deprecated since torchvision 0.29); both use libjpeg-turbo.
        # open_image reads the header only (JPEG or PNG, one frame): a deferred sample is checked without
        # decoding its pixels.
        try:
            img = open_image(data, "image")
        except ImageRejected as err:
            raise SampleRefused(str(err)) from None
        if img.size != (self.image_size, self.image_size):
            raise SampleRefused(f"image is {img.size[0]}x{img.size[1]}, but the split holds "
                                f"{self.image_size}x{self.image_size} images (its manifest)")
        if img.mode != "RGB":  # packing stores RGB JPEGs; converting here would guess what the values mean
            raise SampleRefused(f"pixel format {img.mode!r} is not 8-bit RGB")
        draws = augment_draws(torch_generator(self.seed, "augment", epoch, key)) if self.augment else torch.zeros(3)
        if self.defer:  # a numpy array, not a tensor: images differ in length, so collate keeps a list
            return {"encoded": np.frombuffer(bytearray(data), np.uint8), "augment": draws, "label": label, "key": key}
        image = apply_augment(torch.from_numpy(np.array(img)).permute(2, 0, 1), draws)  # np.array: writable copy
        return {"image": image.float().div_(255.0), "label": label, "key": key}


def augment_draws(gen: torch.Generator) -> torch.Tensor:
    """[angle, horizontal flip, vertical flip] of the report's RandomRotation(30) + both flips at p=0.5,
    drawn from a generator seeded by (seed, epoch, key): the same whichever rank, worker or device applies it."""
    angle = torch.empty(1).uniform_(-30.0, 30.0, generator=gen)
    return torch.cat([angle, (torch.rand(2, generator=gen) < 0.5).float()])


@cache
def _rotate() -> Callable[..., torch.Tensor]:
    """torchvision's rotate, imported on first need: its import pulls in all its models (~1 s), which stages
    that never augment (encode, prior training, sampling) should not pay at start-up. An augmenting decoder
    imports it in the parent (:meth:`ImageDecoder.for_split`), before the loader forks its workers: wandb
    watches torchvision's import, and in a worker forked after ``wandb.init`` that import raises wandb's
    ForkedError, which dropped each worker's first sample as undecodable."""
    import torchvision.transforms.v2.functional as TF

    return TF.rotate


def apply_augment(image: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """One uint8 C x H x W image (CPU or GPU) rotated (nearest, zero fill, as torchvision's default) and flipped."""
    angle, hflip, vflip = draws.tolist()
    if angle:
        image = _rotate()(image, angle)
    if hflip:
        image = image.flip(-1)
    if vflip:
        image = image.flip(-2)
    return image


def decode_on_device(batch: dict[str, Any], device: torch.device, image_size: int) -> dict[str, Any]:
    """A deferred batch (ImageDecoder(defer=True)) as the usual ``image`` float batch on ``device``: JPEGs are
    decoded in one batched call there (nvJPEG on a GPU), anything else on the CPU, then augmented there."""
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png  # imported on first need, as _rotate

    encoded = [torch.as_tensor(e) for e in batch.pop("encoded", [])]  # the DataLoader may have converted them
    draws = batch.pop("augment")
    images: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, e in enumerate(encoded) if e[:2].tolist() == [0xFF, 0xD8]]
    if jpegs:
        decoded = decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        for i, image in zip(jpegs, decoded, strict=True):
            images[i] = image
    # The rest passed ImageDecoder's open_image as PNG: decoded as PNG, never by a format-sniffing decoder.
    pixels = [apply_augment(image if image is not None else decode_png(e, mode=ImageReadMode.RGB).to(device), d)
              for image, e, d in zip(images, encoded, draws, strict=True)]
    stacked = torch.stack(pixels) if pixels else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8,
                                                             device=device)
    return {**batch, "image": stacked.float().div_(255.0)}


def _leave_stopping_to_the_trainer(_worker_id: int) -> None:
    """A DataLoader worker ignores the stop signals and dies with its trainer. Slurm's time limit, ``scancel``
    and ``--signal`` reach every process of a step: a worker killed by one would make the trainer raise
    "worker exited unexpectedly" instead of saving its checkpoint at the step boundary."""
    for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)


def _loader(stream: ShardStream, num_workers: int, prefetch_factor: int = 2,
            pin_memory: bool | None = None) -> DataLoader:
    # batch_size=None: each worker yields whole batches; the DataLoader's in-order round robin over
    # workers then returns them in step order (worker w owns the rank's batches w, w+K, ...).
    # Fork where available, even inside spawned DDP processes: a spawned worker spends seconds
    # re-importing torch; workers never touch CUDA. A training stream runs epoch after epoch, so its
    # workers live as long as the run. Pinned memory lets the host-to-GPU copy run asynchronously
    # (pin_memory None: where CUDA is; without an accelerator torch warns and leaves memory unpinned).
    context = "fork" if num_workers and "fork" in multiprocessing.get_all_start_methods() else None
    # Its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise, and a resumed
    # run (one loader, created at the resume) would then carry another global RNG state than an unbroken one.
    return DataLoader(stream, batch_size=None, num_workers=num_workers, multiprocessing_context=context,
                      worker_init_fn=_leave_stopping_to_the_trainer,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      prefetch_factor=prefetch_factor if num_workers else None,
                      generator=torch.Generator().manual_seed(stream.seed))


def _stream(split_dir: Path | tuple[Path, ...], decode: SampleDecoder, batch_size: int,
            collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None, **options: Any) -> ShardStream:
    """A stream over the split's shards (or those of several splits read as one), its decoder bound to what the
    splits' (checked) manifests declare: each must declare the same (the first one's image size)."""
    splits = (Path(split_dir),) if isinstance(split_dir, (str, Path)) else tuple(Path(s) for s in split_dir)
    manifests = [split_manifest(s) for s in splits]
    decode = decode.for_split(splits[0], manifests[0])
    for split, manifest in zip(splits[1:], manifests[1:], strict=True):
        decode.for_split(split, manifest)  # refuses another image size
    return ShardStream([p for s in splits for p in shard_paths(s)],
                       [sh["offsets"] for m in manifests for sh in m["shards"]], batch_size, decode,
                       collate_fn or partial(collate, empty=decode.empty()), **options)


def make_train_loader(split_dir: Path | tuple[Path, ...], *, batch_size: int, rank: int, world_size: int, epoch: int,
                      seed: int, position: int = 0, epochs: int | None = 1, num_workers: int = 0,
                      prefetch_factor: int = 2, augment: bool = True, image_size: int | None = None,
                      shuffle_buffer: int = 256, decode: SampleDecoder | None = None,
                      collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
                      pin_memory: bool | None = None) -> DataLoader:
    """This rank's batches from ``position`` (samples of ``epoch`` already consumed by all ranks) on, for
    ``epochs`` epochs (None: until the consumer stops).

    Every rank gets the same number of batches, whatever the world size the position was reached with.
    ``image_size`` (default: the split's) must be the size the split was packed at. ``decode``/``collate_fn``
    replace the image decoding for other sample kinds (e.g. code shards); the distribution is the same.
    ``pin_memory`` (default: where CUDA is) pins the batches for asynchronous copies to a GPU. Several split
    folders are read as one split (their shards in the order given).
    """
    stream = _stream(split_dir, decode or ImageDecoder(image_size or 0, augment, seed), batch_size, collate_fn,
                     rank=rank, world_size=world_size, epoch=epoch, position=position, epochs=epochs, seed=seed,
                     shuffle=True, shuffle_buffer=shuffle_buffer)
    return _loader(stream, num_workers, prefetch_factor, pin_memory)


def make_eval_loader(split_dir: Path, *, batch_size: int, rank: int = 0, world_size: int = 1,
                     max_batches: int | None = None, num_workers: int = 0, image_size: int | None = None,
                     decode: SampleDecoder | None = None,
                     collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None) -> DataLoader:
    """Shards in manifest order, no shuffling or augmentation; ranks get disjoint samples."""
    stream = _stream(split_dir, decode or ImageDecoder(image_size or 0), batch_size, collate_fn, rank=rank,
                     world_size=world_size, shuffle=False, max_batches=max_batches)
    return _loader(stream, num_workers)


@dataclass
class ShardTrainData:
    """A training stage's data: the train split it reads per (epoch, step, rank) and the val split its
    evaluation needs (the trainer's :class:`runtime.trainer.TrainData`)."""

    train_split: Path
    val_split: Path
    optim: OptimConfig
    decode: SampleDecoder | None = None
    more_train: tuple[Path, ...] = ()
    """Further split folders trained on with ``train_split`` as one split (the augment stage's synthetic images)."""

    @property
    def train_splits(self) -> tuple[Path, ...]:
        return (self.train_split, *self.more_train)

    @property
    def num_samples(self) -> int:
        return sum(int(read_manifest(s)["num_samples"]) for s in self.train_splits)

    def steps_per_epoch(self, world_size: int) -> int:
        return steps_per_epoch(self.num_samples, self.optim.batch_size, world_size)

    def loader(self, *, epoch: int, position: int, rank: int, world_size: int) -> DataLoader:
        o = self.optim
        return make_train_loader(self.train_splits, batch_size=o.batch_size, rank=rank,
                                 world_size=world_size, epoch=epoch, seed=o.seed, position=position, epochs=None,
                                 num_workers=o.num_workers, prefetch_factor=o.prefetch_factor, augment=o.augment,
                                 shuffle_buffer=o.shuffle_buffer, pin_memory=o.gpu_path_on(self._device_type),
                                 decode=self.decode or ImageDecoder(augment=o.augment, seed=o.seed,
                                                                    defer=self._deferred))

    @cached_property
    def _image_size(self) -> int:
        return int(read_manifest(self.train_split)["image_size"])

    @property
    def _deferred(self) -> bool:
        # auto = workers until `python -m bench gpu` has passed on a real GPU (docs/gpu.md): the device path
        # has never run on one.
        return self.optim.decode_on == "device"

    @property
    def _device_type(self) -> str:
        """Where the trainer will run (accelerate's choice for one process: CUDA where there is one)."""
        return "cuda" if torch.cuda.is_available() else "cpu"

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """A batch of :meth:`loader` on the training device: pinned tensors copied asynchronously, images
        channels-last on the GPU path (faster convolutions on a GPU), deferred images decoded there."""
        if "augment" in batch:
            batch = decode_on_device(batch, device, self._image_size)
        layout = torch.channels_last if self.optim.gpu_path_on(device.type) else torch.preserve_format
        return {k: v.to(device, non_blocking=True, memory_format=layout if v.dim() == 4 else torch.preserve_format)
                if torch.is_tensor(v) else v for k, v in batch.items()}

    def check(self, world_size: int) -> None:
        """Refuse shards that are missing, truncated or modified since packing (sha256 against the manifests,
        about 1 s per GB, once per start), an empty val split, or fewer samples than processes. Damaged data
        would otherwise show up only as samples silently missing from every epoch."""
        val = self.val_split
        if (read_manifest(val)["num_samples"] if (val / "manifest.json").is_file() else 0) < 1:
            raise ConfigError(f"{val} holds no samples, so validation cannot run; allowed: data.val_fraction > 0 "
                              "with enough images that the val split gets at least one (e.g. data.num_images)")
        facts = self._declared_facts()
        problems = [p for split in (*self.train_splits, val) for p in verify_shards(split)]
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
        log.info("training data %s: %d samples, %s (as its manifests declare; other samples are refused)",
                 self.train_split.parent, self.num_samples, ", ".join(f"{k} {v}" for k, v in facts.items()))

    def _declared_facts(self) -> dict[str, Any]:
        """What both splits declare (image size, codebook size, code grid): checked, and equal to what the
        folder's top-level manifest (the one the stage's lineage check approved) says."""
        top = self.train_split.parent
        expected = read_manifest(top) if (top / "manifest.json").is_file() else {}
        facts: dict[str, Any] = {}
        for split in (self.train_split, self.val_split):
            manifest = split_manifest(split)
            for key in ("image_size", "codebook_size", "grid"):
                if key not in manifest:
                    continue
                source = top if key in expected else self.train_split
                want = expected.get(key, facts.get(key, manifest[key]))
                if manifest[key] != want:
                    raise ManifestError(f"{split / 'manifest.json'} declares {key} {manifest[key]}, but "
                                        f"{source / 'manifest.json'} says {want}; refusing to train on a split "
                                        "made with other settings (re-make the folder with python launch/pipeline.py)")
                facts[key] = manifest[key]
        return facts
