"""Never destroy what lesion-vq did not create: outputs are refused where they would touch inputs, user files or
the repository (exit 2, one line, nothing deleted), and a copied run directory is run where its config lives."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, TINY, assert_one_line_error, run_cli, run_pipeline, tiny_config

from shards.synth import render_lesion


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _images(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(render_lesion(i, i % 7, 40)).save(folder / f"img_{i:03d}.jpg", "JPEG", quality=90)


# ----- 1. never destroy the inputs ---------------------------------------------------------------------
@pytest.mark.slow
def test_pack_into_the_folder_holding_its_inputs_is_refused_and_deletes_nothing(tmp_path: Path) -> None:
    ds = tmp_path / "DS"
    _images(ds / "train", 8)
    (ds / "meta.csv").write_text("image_id,dx\n" + "".join(f"img_{i:03d},nv\n" for i in range(8)))
    before = _tree(ds)
    result = run_cli("-m", "shards", "pack", "--images", str(ds / "train"), "--csv",
                     str(ds / "meta.csv"), "--out", str(ds))
    assert_one_line_error(result, "contains the input images", alone=True)
    assert _tree(ds) == before


@pytest.mark.slow
def test_pack_into_a_folder_of_foreign_files_is_refused(tmp_path: Path) -> None:
    _images(tmp_path / "images", 4)
    (tmp_path / "meta.csv").write_text("image_id,dx\n" + "".join(f"img_{i:03d},nv\n" for i in range(4)))
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "notes.txt").write_text("mine")
    result = run_cli("-m", "shards", "pack", "--images", str(tmp_path / "images"), "--csv",
                     str(tmp_path / "meta.csv"), "--out", str(out))
    assert_one_line_error(result, "lesion-vq did not create", "nothing was changed", alone=True)
    assert (out / "train" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_packing_that_yields_no_image_exits_non_zero_and_writes_no_manifest(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"img_{i}.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "meta.csv").write_text("image_id,dx\nimg_0,nv\nimg_1,mel\nimg_2,bcc\n")
    result = run_cli("-m", "shards", "pack", "--images", str(images), "--csv",
                     str(tmp_path / "meta.csv"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "no image could be packed")  # after one warning per skipped image
    assert not (tmp_path / "out" / "manifest.json").exists()


# ----- 2./3. a run_dir with user files, or the repository -------------------------------------------------
@pytest.mark.slow
def test_run_dir_with_user_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    run_dir = tmp_path / "R"
    (run_dir / "data" / "raw").mkdir(parents=True)
    (run_dir / "data" / "raw" / "keep").write_text("precious")
    result = run_cli("launch/pipeline.py", *TINY, f"run_dir={run_dir}", "--only", "data")
    assert_one_line_error(result, "lesion-vq did not create", "nothing was changed", alone=True)
    assert (run_dir / "data" / "raw" / "keep").read_text() == "precious"


@pytest.mark.slow
def test_run_dir_holding_the_input_images_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "R"
    _images(run_dir / "data" / "isic", 4)
    before = _tree(run_dir)
    result = run_cli("launch/pipeline.py", *TINY, f"run_dir={run_dir}", "data.source=isic",
                     f"data.isic_images={run_dir / 'data' / 'isic'}")
    assert_one_line_error(result, "contains the input images", alone=True)
    assert _tree(run_dir) == before


@pytest.mark.slow
def test_run_dir_that_is_a_clone_of_the_repository_is_refused(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    result = run_cli("launch/pipeline.py", *TINY, "run_dir=.", cwd=clone)
    assert_one_line_error(result, "contains the lesion-vq repository", alone=True)
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout
    assert [line for line in status.splitlines() if "__pycache__" not in line] == [], status


# ----- 4. a copied run directory works on the copy ---------------------------------------------------------
@pytest.mark.slow
def test_copied_run_directory_is_run_where_its_config_lives(tmp_path: Path) -> None:
    base = tmp_path / "runs" / "base"
    tiny_config(base)
    assert run_pipeline(str(base / "config.json"), "--only", "data").returncode == 0
    before = _tree(base)
    copy = tmp_path / "runs" / "copyA"
    shutil.copytree(base, copy, symlinks=True)
    result = run_pipeline(str(copy / "config.json"), "--only", "data")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _tree(base) == before, "the run the copy came from was changed"
    assert json.loads((copy / "config.json").read_text())["run_dir"] == str(copy)
    assert list((copy / ".history").glob("data@*")), "the forced stage's old outputs must be kept in the copy"


# ----- 8. one lineage -----------------------------------------------------------------------------------
# A vqvae identity fixed before vqvae_train.adversarial.ramp_steps existed (tiny config, no upstream): adding
# an option must not make outputs of the old behaviour stale, or every upgrade would retrain every stage.
IDENTITY_BEFORE_RAMP_STEPS = "d18fd603ad70cf20"


ENCODE_IDENTITY_BEFORE_TRAIN_VIEWS = "f68e0843571f6430"  # the smoke encode stage's, no upstream
