"""Every input is accounted for, and outputs never land inside an input (issue 28: principle 2 and the medium
cases about inputs): packed + skipped == found with a reason each (dangling links, FIFOs, symlinked sub-folders,
names that are not UTF-8), placeholder lesion ids split per image, pseudo file systems refused, and a run
directory or --out inside an input folder refused in one line."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from helpers import TINY
from PIL import Image

from runtime.config import RunConfig, build_config
from runtime.lineage import claim_run_dir
from runtime.ownership import OwnershipError
from shards.config import DataConfig
from shards.fingerprint import input_fingerprint
from shards.ingest import IngestError, ingest
from shards.pack import pack_isic


def _jpeg(colour: tuple[int, int, int] = (180, 60, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, format="JPEG")
    return buf.getvalue()


BAD_NAME = os.fsdecode(b"stray_\xe9")


@pytest.fixture
def hostile_folders(tmp_path: Path) -> Path:
    """Class folders holding usable images plus every kind of entry that used to vanish from the counts."""
    images = tmp_path / "images"
    for cls in ("MEL", "NV"):
        (images / cls).mkdir(parents=True)
        for i in range(5):
            (images / cls / f"{cls}_{i}.jpg").write_bytes(_jpeg())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for i in range(3):
        (elsewhere / f"LINKED_{i}.jpg").write_bytes(_jpeg((10, 200, 10)))
    (images / "MEL" / "more").symlink_to(elsewhere, target_is_directory=True)
    (images / "NV" / "loop").symlink_to(images, target_is_directory=True)
    (images / "NV" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    os.mkfifo(images / "NV" / "pipe.jpg")
    (images / "MEL" / f"{BAD_NAME}.jpg").write_bytes(_jpeg())
    os.mkfifo(images / "toplevel-pipe")
    return images


def test_every_entry_is_packed_or_skipped_with_a_reason(hostile_folders: Path, tmp_path: Path) -> None:
    found = ingest(hostile_folders, None)
    ids = {r.image_id for r in found.records}
    assert {"LINKED_0", "LINKED_1", "LINKED_2"} <= ids, "images in a symlinked sub-folder are used"
    kinds = {s["kind"] for s in found.skipped}
    assert {"broken_link", "not_a_file", "link_loop", "bad_id"} <= kinds, found.skipped
    assert all(s["reason"] for s in found.skipped)
    manifest = pack_isic(DataConfig(source="isic", isic_images=hostile_folders, image_size=16, workers=1,
                                    val_fraction=0.2, test_fraction=0.2), tmp_path / "out")
    packed = sum(split["num_samples"] for split in manifest["splits"].values())
    assert packed == 13 and packed + len(manifest["skipped"]) == manifest["found"]
    json.dumps(manifest)  # the non-UTF-8 name is recorded (escaped), not a crash


def test_images_behind_a_symlinked_folder_are_part_of_the_data_identity(hostile_folders: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source="isic", isic_images=hostile_folders)
    before = input_fingerprint(cfg)
    (tmp_path / "elsewhere" / "LINKED_0.jpg").write_bytes(_jpeg((0, 0, 255)))
    assert input_fingerprint(cfg) != before


@pytest.mark.parametrize("folder", ["/proc/self", "/proc", "/sys/kernel", "/dev"])
def test_pseudo_file_systems_refused_in_one_line(folder: str) -> None:
    cfg = DataConfig(source="isic", isic_images=Path(folder))
    with pytest.raises(IngestError, match="pseudo file system"):
        input_fingerprint(cfg)
    with pytest.raises(IngestError, match="pseudo file system"):
        ingest(Path(folder), None)


def _ham(tmp_path: Path, lesion_ids: list[str]) -> tuple[Path, Path]:
    images = tmp_path / "ham"
    images.mkdir()
    rows = ["lesion_id,image_id,dx"]
    for i, lesion in enumerate(lesion_ids):
        (images / f"ISIC_{i:07d}.jpg").write_bytes(_jpeg())
        rows.append(f"{lesion},ISIC_{i:07d},{('nv', 'mel')[i % 2]}")
    csv = tmp_path / "meta.csv"
    csv.write_text("\n".join(rows) + "\n")
    return images, csv


@pytest.mark.parametrize("placeholder", ["NA", "", "unknown", "N/A", "null"])
def test_placeholder_lesion_ids_are_split_per_image_and_reported(tmp_path: Path, placeholder: str) -> None:
    images, csv = _ham(tmp_path, [placeholder] * 40)
    found = ingest(images, csv)
    assert all(r.lesion_id is None for r in found.records)
    assert any("no real lesion_id" in note and "40 image(s)" in note for note in found.notes)
    manifest = pack_isic(DataConfig(source="isic", isic_images=images, isic_csv=csv, image_size=16, workers=1,
                                    val_fraction=0.2, test_fraction=0.2), tmp_path / "out")
    sizes = {name: split["num_samples"] for name, split in manifest["splits"].items()}
    assert sizes["val"] > 0 and sizes["test"] > 0 and sizes["train"] > 0, sizes
    assert manifest["notes"] == found.notes


def test_a_lesion_holding_an_implausible_share_is_named(tmp_path: Path) -> None:
    images, csv = _ham(tmp_path, ["HAM_9999999"] * 30 + [f"HAM_{i:07d}" for i in range(30)])
    notes = ingest(images, csv).notes
    assert any("HAM_9999999" in note and "30 of 60" in note for note in notes), notes


def _cfg(tmp_path: Path, images: Path, run_dir: Path) -> RunConfig:
    return build_config("smoke", [*TINY, f"run_dir={run_dir}", "data.source=isic", f"data.isic_images={images}"])


@pytest.mark.parametrize("inside", ["MEL/run", "run", "NV/deeper/run"])
def test_run_dir_inside_the_input_images_is_refused_before_anything_is_written(hostile_folders: Path,
                                                                               tmp_path: Path, inside: str) -> None:
    cfg = _cfg(tmp_path, hostile_folders, hostile_folders / inside)
    with pytest.raises(OwnershipError, match="is inside the input images") as err:
        claim_run_dir(cfg)
    assert "\n" not in str(err.value)
    assert not (hostile_folders / inside).exists()


def test_pack_out_inside_the_images_is_refused(hostile_folders: Path) -> None:
    with pytest.raises(OwnershipError, match="is inside the input images"):
        pack_isic(DataConfig(source="isic", isic_images=hostile_folders, image_size=16, workers=1),
                  hostile_folders / "MEL" / "shards")
    assert not (hostile_folders / "MEL" / "shards").exists()


def test_judged_output_inside_the_judged_images_is_refused(hostile_folders: Path, tmp_path: Path) -> None:
    from judge.evaluate import evaluate_images

    cfg = _cfg(tmp_path, tmp_path / "elsewhere", tmp_path / "run")
    with pytest.raises(OwnershipError, match="is inside the input images"):
        evaluate_images(cfg, hostile_folders, None, hostile_folders / "MEL" / "judged.json")
    inside = _cfg(tmp_path, tmp_path / "elsewhere", hostile_folders / "run")
    with pytest.raises(OwnershipError, match="is inside the input images"):  # RUN_DIR/judged inside --images
        evaluate_images(inside, hostile_folders, None, None)


def test_report_survives_file_names_that_are_not_utf8(tmp_path: Path) -> None:
    from launch.report import write_report
    from runtime.stages import RunLayout

    images, csv = _ham(tmp_path, [f"HAM_{i}" for i in range(12)])
    (images / f"{BAD_NAME}.jpg").write_bytes(_jpeg())  # unlabelled: skipped, its name recorded
    cfg = build_config("smoke", [*TINY, f"run_dir={tmp_path / 'run'}", "data.source=isic",
                                 f"data.isic_images={images}", f"data.isic_csv={csv}", "data.image_size=16",
                                 "vqvae.channels=[8,8]"])
    claim_run_dir(cfg)
    pack_isic(cfg.data, RunLayout.of(cfg).stage_dir("data"))
    page = write_report(cfg).read_text()
    assert "stray_\\udce9" in page


def test_inspect_prints_names_that_are_not_utf8(hostile_folders: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from shards.__main__ import main

    pack_isic(DataConfig(source="isic", isic_images=hostile_folders, image_size=16, workers=1, val_fraction=0.2,
                         test_fraction=0.2), tmp_path / "out")
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "stray_\\udce9" in capsys.readouterr().out
