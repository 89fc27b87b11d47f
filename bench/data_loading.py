"""Data-loading throughput on the same synthetic images, in one run.

    python -m bench.data_loading --images 512 --size 256 --out runs/bench/data_loading.json

Measures images/s of (1) JPEG decode + transform in one process (the per-core limit), (2) the
shard loader (``shards.loader.make_train_loader``) with 1 and 2 workers, (3) a plain torchvision
``ImageFolder`` DataLoader over 600x450 JPEGs with the report's transforms; plus decode time of
stored-resized vs original-size JPEGs (why shards store resized images).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from bench.common import Row
from runtime.files import atomic_write_json
from shards.config import CLASSES, DataConfig
from shards.images import array_to_jpeg, open_image
from shards.loader import ImageDecoder, make_train_loader
from shards.pack import pack_synthetic
from shards.synth import generate

ORIGINAL = (600, 450)  # HAM10000 image size


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def _decode_only(jpegs: list[bytes], size: int) -> float:
    # One thread, like a DataLoader worker: torch's default intra-op threads on a busy 2-core
    # machine made this ~5x slower than the real per-core limit.
    torch.set_num_threads(1)
    decode = ImageDecoder(size, augment=True, seed=0)
    start = time.perf_counter()
    for i, data in enumerate(jpegs):
        decode(f"k{i}", {"jpg": data, "cls": b"0"}, 0)
    return _rate(len(jpegs), time.perf_counter() - start)


def _rgb_file(path: str) -> Image.Image:
    return open_image(Path(path).read_bytes(), path).convert("RGB")


def _pil_decode(jpegs: list[bytes]) -> float:
    start = time.perf_counter()
    for data in jpegs:
        open_image(data, "bench").convert("RGB").load()
    return _rate(len(jpegs), time.perf_counter() - start)


def _shard_loader(split: Path, workers: int, batch: int) -> float:
    start = time.perf_counter()  # includes worker start-up: loaders are rebuilt every epoch
    loader = make_train_loader(split, batch_size=batch, rank=0, world_size=1, epoch=0, seed=0,
                               num_workers=workers)
    count = sum(len(b["key"]) for b in loader)
    return _rate(count, time.perf_counter() - start)


def _image_folder(folder: Path, size: int, workers: int, batch: int) -> float:
    # The report's pipeline, minus its Normalize (a bug with a sigmoid decoder).
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.RandomRotation(30),
                             transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(),
                             transforms.ToTensor()])
    # tiny runs miss classes; images opened as every lesion-vq site opens them (JPEG/PNG only)
    dataset = datasets.ImageFolder(str(folder), transform=tf, loader=_rgb_file, allow_empty=True)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    return _rate(count, time.perf_counter() - start)


@dataclass(frozen=True)
class Inputs:
    """The same synthetic lesions as shards (stored at ``size``) and as a 600x450 JPEG class folder."""

    stored: list[bytes]
    original: list[bytes]
    folder: Path
    data_dir: Path

    @property
    def split(self) -> Path:
        return self.data_dir / "train"


def make_inputs(images: int, size: int, workdir: Path, val_fraction: float = 0.0) -> Inputs:
    """Render ``images`` lesions into ``workdir/folder`` (originals) and ``workdir/shards`` (packed)."""
    stored, original = [], []
    folder = workdir / "folder"
    for c in CLASSES:
        (folder / c).mkdir(parents=True)
    for image_id, label, pixels in generate(images, seed=0, size=size):
        stored.append(array_to_jpeg(pixels, 95))
        big = Image.fromarray(pixels).resize(ORIGINAL, Image.BILINEAR)
        big.save(folder / CLASSES[label] / f"{image_id}.jpg", quality=95)
        original.append((folder / CLASSES[label] / f"{image_id}.jpg").read_bytes())
    cfg = DataConfig(num_images=images, image_size=size, val_fraction=val_fraction, test_fraction=0.0, workers=0)
    pack_synthetic(cfg, workdir / "shards")
    return Inputs(stored, original, folder, workdir / "shards")


def run(images: int, size: int, batch: int, workdir: Path) -> dict[str, Any]:
    inputs = make_inputs(images, size, workdir)
    stored, original, folder, split = inputs.stored, inputs.original, inputs.folder, inputs.split
    result = {
        "images": images, "size": size, "batch": batch,
        "decode_transform_1proc": _decode_only(stored, size),
        "shard_loader_1worker": _shard_loader(split, 1, batch),
        "shard_loader_2workers": _shard_loader(split, 2, batch),
        "imagefolder_2workers": _image_folder(folder, size, 2, batch),
        "pil_decode_stored": _pil_decode(stored),
        "pil_decode_original": _pil_decode(original),
    }
    result["ratio_shard2_over_decode"] = result["shard_loader_2workers"] / result["decode_transform_1proc"]
    result["ratio_shard2_over_imagefolder"] = result["shard_loader_2workers"] / result["imagefolder_2workers"]
    return result


def rows(r: dict[str, Any]) -> list[Row]:
    """The result of :func:`run` as benchmark rows: loaders against the decode limit and the folder loader."""
    limit, folder = "decode+transform limit, 1 process", "ImageFolder 600x450 JPEGs, 2 workers"
    note = f"{r['images']} images, {r['size']} px, batch {r['batch']}"
    return [
        Row("data", limit, r["decode_transform_1proc"], "images/s", limit, note),
        Row("data", "shard loader, 1 worker", r["shard_loader_1worker"], "images/s", limit),
        Row("data", "shard loader, 2 workers", r["shard_loader_2workers"], "images/s", limit),
        Row("data", folder, r["imagefolder_2workers"], "images/s", folder, "the report's pipeline"),
        Row("data", "shard loader, 2 workers (vs folder)", r["shard_loader_2workers"], "images/s", folder,
            "same measurement as above"),
        Row("data", "PIL decode, original 600x450", r["pil_decode_original"], "images/s",
            "PIL decode, original 600x450"),
        Row("data", f"PIL decode, stored {r['size']} px", r["pil_decode_stored"], "images/s",
            "PIL decode, original 600x450", "why shards store resized JPEGs"),
    ]


def _table(r: dict[str, Any]) -> str:
    rows = [("(1) decode + transform, 1 process", r["decode_transform_1proc"]),
            ("(2) shard loader, 1 worker", r["shard_loader_1worker"]),
            ("(2) shard loader, 2 workers", r["shard_loader_2workers"]),
            ("(3) ImageFolder 600x450 JPEGs, 2 workers", r["imagefolder_2workers"]),
            (f"PIL decode, stored {r['size']}px", r["pil_decode_stored"]),
            ("PIL decode, original 600x450", r["pil_decode_original"])]
    lines = [f"{r['images']} images at {r['size']}px, batch {r['batch']}", "",
             "| measurement | images/s |", "|---|---:|"]
    lines += [f"| {name} | {value:.0f} |" for name, value in rows]
    lines += [f"| ratio (2, 2 workers) / (1) | {r['ratio_shard2_over_decode']:.2f} |",
              f"| ratio (2, 2 workers) / (3) | {r['ratio_shard2_over_imagefolder']:.2f} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, help="JSON results file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        result = run(args.images, args.size, args.batch, Path(tmp))
    print(_table(result))
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
