"""Fault injection, source data: broken, odd and hostile input images and metadata CSVs.

Every test packs real files with the real packer (a process pool where it matters) and checks the
accounting: each input image either ends up in exactly one shard sample or is named in the manifest's
``skipped`` list with a reason, and ``found == packed + skipped`` exactly. Cases already covered
elsewhere (the two real ISIC JPEGs plus zero-byte / truncated / garbage / PNG-as-.jpg / CMYK / RGBA
files in tests/test_shards_pack.py; ISIC 2019 one-hot CSV with BOM, CRLF and duplicates in
tests/test_shards_ingest.py) are not repeated; see the README, "Reliability: injected faults".
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.ownership import OwnershipError
from shards.config import CLASSES, DataConfig
from shards.images import MAX_PIXELS
from shards.manifest import read_manifest, verify_shards
from shards.pack import pack_isic
from shards.synth import render_lesion

REPO = Path(__file__).resolve().parents[1]
DX = [c.lower() for c in CLASSES]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, *, full: bool) -> bytes:
    """An 8-bit grayscale PNG of the given size. ``full``: every (zero) row really present, so it decodes
    (about 0.1 MB on disk for 10000x10000); otherwise only the header claims the size (a bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    if full:
        packer, row = zlib.compressobj(9), b"\x00" * (width + 1)
        idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    else:
        idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _lesion_jpeg(path: Path, index: int) -> None:
    Image.fromarray(render_lesion(index, index % 7, 40)).save(path, "JPEG", quality=90)


def _packed_keys(out: Path) -> list[str]:
    """Every sample key in every shard of every split, read straight from the tar files."""
    keys = []
    for split in ("train", "val", "test"):
        for shard in read_manifest(out / split)["shards"]:
            with tarfile.open(out / split / shard["name"]) as tar:
                keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return keys


def _check_accounting(top: dict, out: Path) -> tuple[list[str], dict[str, dict]]:
    keys = _packed_keys(out)
    packed = sum(s["num_samples"] for s in top["splits"].values())
    assert len(keys) == len(set(keys)) == packed, "a sample is missing from or doubled in the shards"
    assert top["found"] == packed + len(top["skipped"])
    assert all(s["reason"] and s["kind"] for s in top["skipped"]), "a skip without a reason"
    for split in top["splits"]:
        assert verify_shards(out / split) == []
    return keys, {s["id"]: s for s in top["skipped"]}


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 good lesion JPEGs, 3 of them (5%) then corrupted, plus one file of every odd kind, and a
    HAM10000-style CSV that has a BOM, CRLF line ends, an extra column, blank and missing fields,
    unknown labels and duplicate ids."""
    root = tmp_path_factory.mktemp("bad-images")
    images = root / "images"
    images.mkdir()
    for i in range(60):
        _lesion_jpeg(images / f"img_{i:03d}.jpg", i)
    good = (images / "img_000.jpg").read_bytes()
    (images / "img_010.jpg").write_bytes(good[: len(good) // 3])  # truncated mid-scan
    (images / "img_020.jpg").write_bytes(good[:200])  # truncated in the header
    (images / "img_030.jpg").write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)))
    (images / "odd_zero.jpg").write_bytes(b"")
    Image.fromarray(render_lesion(70, 1, 40)).save(images / "odd_png.jpg", "PNG")  # PNG bytes, .jpg name
    Image.new("CMYK", (40, 30), (20, 180, 40, 10)).save(images / "odd_cmyk.jpg", "JPEG")
    Image.fromarray(render_lesion(71, 2, 40)).convert("L").save(images / "odd_gray.jpg", "JPEG")
    Image.fromarray(render_lesion(72, 3, 40)).convert("P").save(images / "odd_palette.png")
    (images / "odd_huge.png").write_bytes(_png(10000, 10000, full=True))  # 100 MP of zeros, under the guard
    (images / "odd_bomb.png").write_bytes(_png(12000, 12000, full=False))  # 144 MP claimed: over our guard
    (images / "odd_pilbomb.png").write_bytes(_png(30000, 30000, full=False))  # 900 MP: over PIL's own limit
    (images / "odd_nolabel.jpg").write_bytes(good)

    rows = ["lesion_id,image_id,dx,dx_type,age,sex,localization,notes"]
    for i in range(60):
        lesion = f"HAM_{i // 2:04d}" if i % 5 else ""  # some rows have no lesion id: own lesion
        rows.append(f"{lesion},img_{i:03d},{DX[i % 7]},histo,50,male,back,row {i}")
    rows += [
        "HAM_9001,odd_zero,mel,histo,50,male,back,",
        "HAM_9002,odd_png,nv,histo,50,male,back,",
        "HAM_9003,odd_cmyk,bcc,histo,50,male,back,",
        "HAM_9004,odd_gray,akiec,histo,50,male,back,",
        "HAM_9005,odd_palette,bkl,histo,50,male,back,",
        "HAM_9006,odd_huge,df,histo,50,male,back,",
        "HAM_9007,odd_bomb,vasc,histo,50,male,back,",
        "HAM_9008,odd_pilbomb,mel,histo,50,male,back,",
        "HAM_0001,img_001,nv,histo,50,male,back,duplicate row with the same label",
        "HAM_0002,img_002,mel,histo,50,male,back,duplicate row with ANOTHER label",
        "HAM_9010,img_missing,mel,histo,50,male,back,no such image",
        "HAM_9011,odd_scc,scc,histo,50,male,back,unknown label",
        "HAM_9012,odd_blank,,histo,50,male,back,blank label",
        "HAM_9013,odd_short",  # missing trailing fields
        "HAM_9014,img_003,bcc,histo,50,male,back,x,EXTRA,FIELDS",  # conflicting duplicate + extra fields
    ]
    (root / "meta.csv").write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode())
    return root


@pytest.mark.slow
def test_corrupt_odd_and_bomb_images_are_skipped_by_name_and_the_rest_packed(bad_folder, tmp_path):
    cfg = DataConfig(source="isic", isic_images=bad_folder / "images", isic_csv=bad_folder / "meta.csv",
                     image_size=32, workers=2, shard_max_count=16)
    out = tmp_path / "out"
    top = pack_isic(cfg, out)
    keys, skipped = _check_accounting(top, out)

    # Unreadable content (decided by a full decode in the packing pool), each with its reason.
    assert "cannot decode" in skipped["img_010"]["reason"] and "cannot decode" in skipped["img_020"]["reason"]
    assert "cannot decode" in skipped["img_030"]["reason"]
    assert "zero-byte" in skipped["odd_zero"]["reason"]
    assert f"exceeds the decompression-bomb limit of {MAX_PIXELS}" in skipped["odd_bomb"]["reason"]
    assert "DecompressionBombError" in skipped["odd_pilbomb"]["reason"]
    # Metadata problems.
    assert skipped["img_missing"]["kind"] == "no_image"
    assert skipped["odd_nolabel"]["kind"] == "no_label"
    assert skipped["odd_scc"]["kind"] == skipped["odd_blank"]["kind"] == skipped["odd_short"]["kind"] \
        == "unknown_label"
    assert "'scc' is not one of" in skipped["odd_scc"]["reason"]
    dup = [s for s in top["skipped"] if s["kind"] == "duplicate_id"]
    assert {s["id"] for s in dup} == {"img_001", "img_002", "img_003"}
    assert any("conflicting labels" in s["reason"] and s["id"] == "img_002" for s in dup)

    # Odd but valid files are converted, not lost: PNG-as-.jpg, CMYK, grayscale, palette, a 100 MP image.
    for name in ("odd_png", "odd_cmyk", "odd_gray", "odd_palette", "odd_huge", "img_001"):
        assert name in keys, f"{name} was lost"
    # Conflicting labels: neither row is trusted, so the image is not packed; every other good image is.
    unreadable = {"img_010", "img_020", "img_030"}
    expected_good = {f"img_{i:03d}" for i in range(60)} - unreadable - {"img_002", "img_003"}
    assert expected_good <= set(keys)
    assert not (unreadable | {"img_002", "img_003", "odd_bomb", "odd_pilbomb", "odd_zero"}) & set(keys)
    # Every image file on disk is accounted for: packed, or named in the skipped list.
    on_disk = {p.stem for p in (bad_folder / "images").iterdir()}
    assert on_disk <= set(keys) | set(skipped)
    # The stored sample of the huge image is a normal small JPEG with its original size recorded.
    assert top["image_size"] == 32 and top["skipped_counts"]["unreadable"] == 6


def test_pack_rerun_after_input_fix_repacks_and_recounts(bad_folder, tmp_path):
    """Replacing a corrupt file changes the input fingerprint: packing again refuses to touch the old output
    unless told to replace it, and then keeps it aside (never deleted) and packs every file."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("img_000.jpg", "img_004.jpg", "img_005.jpg", "img_010.jpg"):
        (images / name).write_bytes((bad_folder / "images" / name).read_bytes())
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text("image_id,dx\nimg_000,mel\nimg_004,nv\nimg_005,bcc\nimg_010,df\n")
    cfg = DataConfig(source="isic", isic_images=images, isic_csv=csv_path, image_size=32, workers=1,
                     val_fraction=0.0, test_fraction=0.0)
    first = pack_isic(cfg, tmp_path / "out")
    assert [s["id"] for s in first["skipped"]] == ["img_010"]
    _lesion_jpeg(images / "img_010.jpg", 10)  # fixed
    with pytest.raises(OwnershipError, match="another configuration or input"):
        pack_isic(cfg, tmp_path / "out")
    second = pack_isic(cfg, tmp_path / "out", replace=True)
    kept = list((tmp_path / ".history").glob("out@*"))
    assert len(kept) == 1 and (kept[0] / "manifest.json").is_file()
    assert second["skipped"] == [] and second["splits"]["train"]["num_samples"] == 4
    assert sorted(_packed_keys(tmp_path / "out")) == ["img_000", "img_004", "img_005", "img_010"]


@pytest.mark.parametrize(("header", "message"), [
    ("image_idd,dx", "cannot tell the layout"),  # misspelled column
    ("image_id,diagnosis", "cannot tell the layout"),  # required column missing
    ("lesion_id,image_id", "cannot tell the layout"),  # dx missing
])
@pytest.mark.slow
def test_csv_with_missing_or_misspelled_columns_fails_at_once_naming_them(tmp_path, header, message):
    images = tmp_path / "images"
    images.mkdir()
    _lesion_jpeg(images / "img_000.jpg", 0)
    (tmp_path / "m.csv").write_text(f"{header}\nimg_000,mel\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "shards", "pack", "--out", str(out), "--images", str(images),
                             "--csv", str(tmp_path / "m.csv"), "data.image_size=32", "data.workers=1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and message in result.stderr
    assert f"found columns {header.split(',')}" in result.stderr and "expected" in result.stderr
    assert not out.exists() or not any(out.rglob("*.tar")), "work started before the input was checked"


@pytest.mark.slow
def test_csv_with_only_unusable_rows_fails_with_the_skip_summary(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _lesion_jpeg(images / "a.jpg", 0)
    (tmp_path / "m.csv").write_text("image_id,dx\na,scc\na,unk\n")
    result = subprocess.run([sys.executable, "-m", "shards", "pack", "--out", str(tmp_path / "out"),
                             "--images", str(images), "--csv", str(tmp_path / "m.csv"), "data.image_size=32"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no usable labelled images" in result.stderr and "unknown_label: 2" in result.stderr
