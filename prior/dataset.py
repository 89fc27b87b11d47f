"""The sample stage's samples as a labelled image data set that other tools read: PNG files and a metadata CSV in
the HAM10000 layout, written by the sample stage once its last task completes (prior/sample.py ``finalize``).

    RUN_DIR/samples/dataset/metadata.csv             lesion_id, image_id, dx, dx_type=synthetic, provenance, sha256
    RUN_DIR/samples/dataset/images/DX/IMAGE_ID.png   one sub-folder per class (lower-case HAM code: mel, nv, ...)

The class sub-folders make the same files a torchvision ``ImageFolder`` and the ``folders`` layout packing
reads, so ``python -m shards pack --images RUN_DIR/samples/dataset/images [--csv .../metadata.csv]`` packs them as
it packs real data. Ids name the sample stage's identity and the sample index (``LVQ-<identity>-<index>``): a
rerun writes the same names with the same bytes (never a duplicate), and two runs' sets never collide. Every
file is written under a temporary name and renamed; the CSV last, so a CSV lists only complete images.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import webdataset as wds

from runtime.config import CLASSES
from runtime.errors import UserError
from runtime.files import atomic_write_bytes, atomic_write_text, sha256_file
from runtime.integrity import verified_file
from runtime.ownership import MARKER, OwnershipError, foreign_entries, read_marker, write_marker
from shards.images import ImageRejected, open_image
from shards.loader import class_label
from shards.stream import SampleRefused

FOLDER = "dataset"
"""The data set's folder inside the sample stage's output."""
CSV_NAME = "metadata.csv"
PROVENANCE = ("sample_index", "sample_task", "num_tasks", "seed", "temperature", "top_k", "top_p", "guidance_scale",
              "prior", "tokenizer")
"""What each image was drawn with: its index, the array task that drew it and how many there were (the task's
random generator derives from (seed, task, num_tasks)), the sampling settings, and the tokens (identity/content)
of the prior and VQ-VAE that made it."""
COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", *PROVENANCE, "sha256")


def dx_code(label: int) -> str:
    """A class index as HAM10000's ``dx`` (lower-case: mel, nv, bcc, akiec, bkl, df, vasc)."""
    return CLASSES[label].lower()


def image_id(identity: str, index: int) -> str:
    return f"LVQ-{identity[:12]}-{index:06d}"


def _claim(folder: Path, identity: str) -> None:
    marker = read_marker(folder) if folder.is_dir() else None
    if marker is None:
        if folder.exists() and (not folder.is_dir() or foreign_entries(folder, set())):
            raise OwnershipError(f"{folder} holds files lesion-vq did not write (no {MARKER}); nothing was changed")
        write_marker(folder, "synthetic-dataset", identity=identity)
    elif marker.get("identity") != identity:
        raise OwnershipError(f"{folder} holds the synthetic data set of other samples (identity "
                             f"{marker.get('identity')}, these: {identity}); nothing was changed")


def write_dataset(folder: Path, shards: list[Path], identity: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """Every sample of the sample stage's ``shards`` as ``folder/images/DX/ID.png`` (the PNG bytes the shard
    holds) plus ``folder/metadata.csv``; ``provenance``: the columns of :data:`PROVENANCE` shared by all samples.
    Returns what the sample manifest records of it (paths relative to the sample stage's folder)."""
    _claim(folder, identity)
    rows = []
    for sample in wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False):
        where = f"{sample['__url__']}: {sample['__key__']}"
        try:
            label = class_label(sample["cls"])
            open_image(sample["png"], where, formats=("PNG",))  # the header: a PNG, one frame
            task = int(json.loads(sample["json"])["task"])
        except (ImageRejected, SampleRefused, KeyError, ValueError, TypeError) as err:
            raise UserError(f"{where}: not a sample the sample stage writes ({err}); re-make the sample "
                            "stage") from None
        index = int(sample["__key__"].rsplit("_", 1)[1])
        name = image_id(identity, index)
        path = folder / "images" / dx_code(label) / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_bytes() != sample["png"]:
            atomic_write_bytes(path, sample["png"])
        rows.append({"lesion_id": name, "image_id": name, "dx": dx_code(label), "dx_type": "synthetic",
                     **provenance, "sample_index": index, "sample_task": task, "sha256": sha256_file(path)})
    rows.sort(key=lambda r: r["sample_index"])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / CSV_NAME, text.getvalue())
    counts = Counter(r["dx"] for r in rows)
    return {"folder": FOLDER, "csv": f"{FOLDER}/{CSV_NAME}", "csv_sha256": sha256_file(folder / CSV_NAME),
            "num_images": len(rows), "class_counts": {dx_code(c): counts[dx_code(c)] for c in range(len(CLASSES))}}


def read_dataset(sample_dir: Path, manifest: dict[str, Any]) -> list[dict[str, str]]:
    """The rows of a sample stage's data set, after verifying the CSV and every image it lists against the
    sha256s recorded (the manifest's ``dataset``, then the CSV's ``sha256`` column)."""
    where = Path(sample_dir) / "manifest.json"
    record = manifest.get("dataset")
    if not isinstance(record, dict):
        raise UserError(f"{where} records no synthetic data set (made by an earlier lesion-vq); re-make it: "
                        "python launch/pipeline.py --from sample")
    path = verified_file(sample_dir, record.get("csv"), record.get("csv_sha256"), manifest=where)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    folder = path.parent
    for row in rows:
        if row.get("dx") not in {dx_code(c) for c in range(len(CLASSES))}:
            raise UserError(f"{path}: dx {row.get('dx')!r} of {row.get('image_id')!r} is not a class; re-make the "
                            "sample stage")
        verified_file(folder, f"images/{row['dx']}/{row['image_id']}.png", row.get("sha256"), manifest=path)
    return rows
