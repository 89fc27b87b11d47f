"""Packing converts every pixel format by an explicit rule (16-bit scaled, alpha composited) or skips it naming
the format; ambiguous CSV headers are refused naming the columns; one-hot values outside 0/1 are named."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from helpers import assert_one_line_error, run_cli
from PIL import Image

from shards.config import CLASSES, DataConfig

# ----- helpers ---------------------------------------------------------------------------------------


def _mode_images(root: Path) -> dict[str, str]:
    """One source image per pixel format (file name -> expected outcome), in class folders."""
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    Image.fromarray(np.full((40, 40), 32896, np.uint16)).save(root / "MEL" / "grey16.png")  # 32896/257 = 128
    Image.fromarray(np.full((40, 40), 32896, np.int32)).save(root / "NV" / "int32.png", format="TIFF")
    Image.new("RGBA", (40, 40), (0, 255, 0, 0)).save(root / "BCC" / "clear_green.png")  # invisible green
    Image.new("LA", (40, 40), (200, 0)).save(root / "AKIEC" / "clear_grey.png")
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(root / "BKL" / "palette_clear.png", transparency=1)
    Image.fromarray(np.full((40, 40), 0.5, np.float32)).save(root / "DF" / "float.png", format="TIFF")
    Image.fromarray(np.full((40, 40), 70000, np.int32)).save(root / "VASC" / "int32_big.png", format="TIFF")
    Image.new("L", (40, 40), 77).save(root / "VASC" / "grey8.png")
    return {"grey16": "grey 128", "int32": "skipped TIFF", "clear_green": "black", "clear_grey": "black",
            "palette_clear": "black", "grey8": "grey 77", "float": "skipped TIFF", "int32_big": "skipped TIFF"}


def test_packing_converts_every_pixel_format_by_an_explicit_rule_or_skips_it_naming_it(tmp_path: Path) -> None:
    """Old code: a 16-bit image was clipped to white, transparent pixels kept their hidden colour, a float
    image was clipped and packed. 32-bit and float pixels exist only in formats other than JPEG/PNG (TIFF here,
    named .png), which are skipped before any pixel is decoded."""
    from shards.pack import pack_isic

    expected = _mode_images(tmp_path / "images")
    cfg = DataConfig(source="isic", isic_images=tmp_path / "images", image_size=32, workers=1, val_fraction=0.0,
                     test_fraction=0.0)
    manifest = pack_isic(cfg, tmp_path / "out")
    skipped = {s["id"]: s["reason"] for s in manifest["skipped"]}
    for key in ("int32", "float", "int32_big"):
        assert "not a JPEG or PNG image (its first bytes look like TIFF)" in skipped[key], skipped[key]
    seen = {}
    for sample in wds.WebDataset(sorted(str(p) for p in (tmp_path / "out" / "train").glob("*.tar")),
                                 shardshuffle=False, empty_check=False):
        pixels = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")).astype(float)
        seen[sample["__key__"]] = (pixels.mean(axis=(0, 1)), json.loads(sample["json"])["original_mode"])
    assert set(seen) == {k for k, v in expected.items() if not v.startswith("skipped")}
    for key, outcome in expected.items():
        if outcome.startswith("grey"):
            assert np.allclose(seen[key][0], float(outcome.split()[1]), atol=2), (key, seen[key])
        elif outcome == "black":
            assert seen[key][0].max() < 3, (key, seen[key])
    assert seen["grey16"][1] == "I;16" and seen["clear_green"][1] == "RGBA" and seen["palette_clear"][1] == "P"


@pytest.mark.parametrize(("header", "needles"), [
    ("image_id,dx,dx", ["['dx'] appear more than once"]),
    ("image_id, dx,lesion_id,dx ", ["['dx'] appear more than once"]),
    ("image,MEL,NV,MEL", ["['MEL'] appear more than once"]),
    ("image_id,dx,image,MEL,NV", ["matches two layouts", "['image_id', 'dx']", "['image', 'MEL', 'NV']"]),
])
@pytest.mark.slow
def test_ambiguous_csv_headers_are_refused_naming_the_columns(tmp_path: Path, header: str, needles: list[str]) -> None:
    """Old code: csv.DictReader kept the last duplicate column's values; a header of both layouts was read
    as HAM10000 without a word."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "img_1.jpg")
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text(f"{header}\nimg_1{',mel' * header.count(',')}\n")
    result = run_cli("-m", "shards", "pack", "--out", str(tmp_path / "out"), "--images", str(images), "--csv",
                  str(csv_path))
    assert_one_line_error(result, str(csv_path), *needles)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_one_hot_class_values_outside_0_1_are_skipped_with_the_values_named(tmp_path: Path) -> None:
    """Old code took MEL=2 or MEL=inf as a MEL label and NV=-1 as 'not NV' without a word."""
    from shards.ingest import ingest

    images = tmp_path / "images"
    images.mkdir()
    rows = {"ok": "1,0", "two": "2,0", "negative": "1,-1", "nan": "nan,1", "inf": "inf,0"}
    for image_id in rows:
        Image.new("RGB", (8, 8)).save(images / f"{image_id}.jpg")
    csv_path = tmp_path / "truth.csv"
    csv_path.write_text("image,MEL,NV\n" + "".join(f"{k},{v}\n" for k, v in rows.items()))
    found = ingest(images, csv_path)
    assert [r.image_id for r in found.records] == ["ok"]
    reasons = {s["id"]: s["reason"] for s in found.skipped}
    assert reasons["two"] == "class values outside 0..1 (MEL=2): not a one-hot row"
    assert "NV=-1" in reasons["negative"] and "MEL=nan" in reasons["nan"] and "MEL=inf" in reasons["inf"]
