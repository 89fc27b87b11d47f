"""Grid PNG of stored images, one row per class (for ``inspect`` and the README)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw
from webdataset.tariterators import tarfile_samples

from runtime.config import CLASSES
from runtime.files import atomic_path
from shards.images import ImageRejected, decode_rgb
from shards.loader import class_label
from shards.manifest import shard_paths
from shards.stream import SampleRefused

_LABEL_WIDTH = 56


def preview_grid(split_dir: Path, out_png: Path, per_class: int = 8, cell: int = 64) -> Path:
    """Write the first ``per_class`` images of every class in ``split_dir`` as a labelled grid."""
    rows: dict[int, list[Image.Image]] = {i: [] for i in range(len(CLASSES))}
    samples = tarfile_samples({"url": str(p)} for p in shard_paths(split_dir))
    for sample in samples:  # only jpg/cls are read: nothing is unpickled
        try:
            label = class_label(sample.get("cls", b""))
        except SampleRefused:
            continue  # a bad class is counted by the loader; a preview just leaves it out
        if "jpg" in sample and len(rows[label]) < per_class:
            try:
                img = decode_rgb(sample["jpg"], f"{sample.get('__url__')}: {sample.get('__key__')}")
            except ImageRejected:
                continue  # as a bad class: the loader counts it, a preview leaves it out
            rows[label].append(img.resize((cell, cell), Image.BILINEAR))
        if all(len(r) >= per_class for r in rows.values()):
            break
    grid = Image.new("RGB", (_LABEL_WIDTH + per_class * cell, len(CLASSES) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for label, images in rows.items():
        draw.text((4, label * cell + cell // 2 - 6), CLASSES[label], fill="black")
        for col, img in enumerate(images):
            grid.paste(img, (_LABEL_WIDTH + col * cell, label * cell))
    with atomic_path(Path(out_png)) as tmp:
        grid.save(tmp, format="PNG")
    return Path(out_png)
