"""The sample stage's samples as a labelled data set (prior/dataset.py): HAM10000-layout CSV + PNGs in class
sub-folders, provenance columns, reruns that neither duplicate nor lose a sample, verified reads, the top-up
class mix; slow: the smoke run's data set packed by ``python -m shards pack`` and read by torchvision's
ImageFolder, every sample found with its class."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from helpers import FinishedRun, assert_ok, run_cli
from PIL import Image

from prior.dataset import COLUMNS, CSV_NAME, image_id, read_dataset, write_dataset
from runtime.balance import top_up_allocation
from runtime.config import CLASSES
from runtime.errors import UserError
from runtime.files import sha256_file
from runtime.integrity import IntegrityError
from runtime.ownership import OwnershipError

IDENTITY = "0123456789abcdef"
PROVENANCE = {"num_tasks": 2, "seed": 3, "temperature": 0.9, "top_k": 0, "top_p": 1.0, "guidance_scale": 3.0,
              "prior": "p-id/p-content", "tokenizer": "v-id/v-content"}


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _sample_shards(folder: Path, labels: list[int], tasks: int = 2) -> list[Path]:
    """Shards as the sample stage writes them: sample j in task j % tasks."""
    folder.mkdir(parents=True)
    shards = [folder / f"shard-{t:06d}.tar" for t in range(tasks)]
    for t, shard in enumerate(shards):
        with wds.TarWriter(str(shard), mtime=0, compress=False) as sink:
            for j in range(t, len(labels), tasks):
                sink.write({"__key__": f"sample_{j:06d}", "png": _png(j), "cls": str(labels[j]).encode(),
                            "json": json.dumps({"class": CLASSES[labels[j]], "task": t}).encode()})
    return shards


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_dataset_layout_and_provenance(tmp_path: Path) -> None:
    labels = [0, 1, 5, 6, 5, 2, 3]
    record = write_dataset(tmp_path / "samples" / "dataset", _sample_shards(tmp_path / "samples", labels),
                           IDENTITY, PROVENANCE)
    folder = tmp_path / "samples" / "dataset"
    rows = list(csv.DictReader((folder / CSV_NAME).open()))
    assert tuple(rows[0]) == COLUMNS
    assert [int(r["sample_index"]) for r in rows] == list(range(len(labels)))
    assert len({r["lesion_id"] for r in rows}) == len({r["image_id"] for r in rows}) == len(labels)
    for j, row in enumerate(rows):
        assert row["dx"] == CLASSES[labels[j]].lower() and row["dx_type"] == "synthetic"
        assert row["image_id"] == image_id(IDENTITY, j) and int(row["sample_task"]) == j % 2
        assert {k: row[k] for k in PROVENANCE} == {k: str(v) for k, v in PROVENANCE.items()}
        path = folder / "images" / row["dx"] / f"{row['image_id']}.png"
        assert path.read_bytes() == _png(j) and sha256_file(path) == row["sha256"]
    assert record["num_images"] == len(labels) and record["class_counts"]["df"] == 2
    assert record["csv_sha256"] == sha256_file(folder / CSV_NAME)
    assert read_dataset(tmp_path / "samples", {"dataset": record}) == rows


def test_rerun_never_duplicates_or_loses_a_sample(tmp_path: Path) -> None:
    shards = _sample_shards(tmp_path / "samples", [4, 4, 1, 0, 6])
    folder = tmp_path / "samples" / "dataset"
    first = write_dataset(folder, shards, IDENTITY, PROVENANCE)
    files, table = _files(folder), (folder / CSV_NAME).read_bytes()
    assert write_dataset(folder, shards, IDENTITY, PROVENANCE) == first
    assert _files(folder) == files and (folder / CSV_NAME).read_bytes() == table
    # A run killed half-way: one image and the CSV missing. The rerun restores exactly the same set.
    next(iter((folder / "images").rglob("*.png"))).unlink()
    (folder / CSV_NAME).unlink()
    assert write_dataset(folder, shards, IDENTITY, PROVENANCE) == first
    assert _files(folder) == files and (folder / CSV_NAME).read_bytes() == table


def test_reads_verify_every_file_and_writes_stay_in_our_folder(tmp_path: Path) -> None:
    shards = _sample_shards(tmp_path / "samples", [0, 1, 2])
    folder = tmp_path / "samples" / "dataset"
    record = write_dataset(folder, shards, IDENTITY, PROVENANCE)
    victim = folder / "images" / "nv" / f"{image_id(IDENTITY, 1)}.png"
    victim.write_bytes(_png(99))
    with pytest.raises(IntegrityError, match="not the file"):
        read_dataset(tmp_path / "samples", {"dataset": record})
    with pytest.raises(UserError, match="--from sample"):
        read_dataset(tmp_path / "samples", {})
    with pytest.raises(OwnershipError, match="other samples"):
        write_dataset(folder, shards, "another-identity", PROVENANCE)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OwnershipError, match="did not write"):
        write_dataset(foreign, shards, IDENTITY, PROVENANCE)
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1


def test_top_up_allocation() -> None:
    counts = {"MEL": 10, "NV": 70, "BCC": 5, "AKIEC": 0, "BKL": 30, "DF": 2, "VASC": 1}
    assert top_up_allocation(counts, 30, Path("m.json")) == [20, 0, 25, 0, 0, 28, 29]  # AKIEC: never learned
    with pytest.raises(UserError, match="NV"):
        top_up_allocation({**counts, "NV": -1}, 30, Path("m.json"))


# ----- the smoke run's data set -------------------------------------------------------------------------
def _packed(out: Path) -> dict[str, str]:
    """image id -> class name of every sample in a packed folder (all splits)."""
    found = {}
    for split in ("train", "val", "test"):
        manifest = json.loads((out / split / "manifest.json").read_text())
        for shard in manifest["shards"]:
            for sample in wds.WebDataset(str(out / split / shard["name"]), shardshuffle=False, empty_check=False):
                found[sample["__key__"]] = CLASSES[int(sample["cls"])]
    return found


@pytest.mark.slow
def test_shards_pack_finds_every_sample_with_its_class(finished_run: FinishedRun, tmp_path: Path) -> None:
    dataset = finished_run.run_dir / "samples" / "dataset"
    rows = list(csv.DictReader((dataset / CSV_NAME).open()))
    assert len(rows) == json.loads((finished_run.run_dir / "samples" / "manifest.json").read_text())["num_samples"]
    expected = {r["image_id"]: r["dx"].upper() for r in rows}
    assert_ok(run_cli("-m", "shards", "pack", "--images", dataset / "images", "--csv", dataset / CSV_NAME,
                      "--out", tmp_path / "with-csv", "data.image_size=32", "data.workers=1"))
    assert _packed(tmp_path / "with-csv") == expected
    # The class sub-folders alone: packing's folders layout, and torchvision's ImageFolder.
    assert_ok(run_cli("-m", "shards", "pack", "--images", dataset / "images", "--out", tmp_path / "folders",
                      "data.image_size=32", "data.workers=1"))
    assert _packed(tmp_path / "folders") == expected
    from torchvision.datasets import ImageFolder

    view = ImageFolder(str(dataset / "images"))
    assert {Path(p).stem: view.classes[c].upper() for p, c in view.samples} == expected
