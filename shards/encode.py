"""Per-image work done in the packing pool: render or read, verify, resize, encode one sample.

Kept free of webdataset / torch imports so that spawned pool workers start in a fraction of a
second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime.config import CLASSES
from shards.images import ImageRejected, array_to_jpeg, read_image_file
from shards.synth import render_lesion


@dataclass(frozen=True)
class Job:
    """One image to pack. ``source`` is a file for ISIC images, None for synthetic ones."""

    image_id: str
    label: int
    lesion_id: str | None
    source: Path | None
    row: dict[str, str]
    render_seed: int = 0


@dataclass(frozen=True)
class Encoded:
    """A finished sample (``sample`` set) or a refusal (``reason`` set)."""

    job: Job
    sample: dict[str, bytes | str] | None
    reason: str | None


def _sample(job: Job, jpeg: bytes, meta: dict[str, object]) -> dict[str, bytes | str]:
    name = CLASSES[job.label]
    meta = {"id": job.image_id, "lesion_id": job.lesion_id, "class": name, "label": job.label,
            "dx": name.lower(), **meta, "csv_row": job.row}
    return {"__key__": job.image_id, "jpg": jpeg, "cls": str(job.label).encode("ascii"),
            "json": json.dumps(meta, sort_keys=True).encode()}


def encode_job(job: Job, *, size: int, quality: int, hair_probability: float, root: Path | None) -> Encoded:
    if job.source is None:
        pixels = render_lesion(job.render_seed, job.label, size, hair_probability)
        meta = {"synthetic": True, "source_file": None, "original_size": [size, size],
                "render_seed": job.render_seed}
        return Encoded(job, _sample(job, array_to_jpeg(pixels, quality), meta), None)
    try:
        jpeg, facts = read_image_file(job.source, size, quality)
    except ImageRejected as err:
        return Encoded(job, None, str(err))
    source = str(job.source.relative_to(root)) if root is not None else str(job.source)
    return Encoded(job, _sample(job, jpeg, {"synthetic": False, "source_file": source, **facts}), None)
