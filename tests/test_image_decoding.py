"""Decode only what we accept (issue 28, principle 1): every site that decodes an image opens JPEG or PNG only,
refuses animated / multi-frame images with one reason, and never hands the bytes to another PIL plugin (an EPS
named .jpg would start Ghostscript). These tests pass whether or not Ghostscript is installed: its entry point is
replaced by one that records a call."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import EpsImagePlugin, Image

from shards.config import DataConfig
from shards.images import ACCEPTED_FORMATS, ImageRejected, decode_rgb, load_rgb, open_image, read_image_file
from shards.loader import ImageDecoder, decode_on_device
from shards.stream import SampleRefused

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n{ } loop\n"


@pytest.fixture(autouse=True)
def ghostscript_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """PIL's EPS plugin behaves as if Ghostscript were installed, and every call to it is recorded (and fails
    at once instead of looping forever)."""
    calls: list[object] = []

    def fake(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise OSError("Ghostscript must never be started by lesion-vq")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", fake)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    yield calls
    assert calls == [], "an EPS file reached PIL's EPS plugin, which starts Ghostscript"


def _encoded(fmt: str, size: int = 32, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buf, format=fmt, **save)
    return buf.getvalue()


def _animated(fmt: str, size: int = 32) -> bytes:
    frames = [Image.new("RGB", (size, size), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


OTHER_FORMATS = ["WEBP", "BMP", "GIF", "TIFF", "TGA", "JPEG2000", "PPM", "ICO", "PCX", "SGI", "QOI", "DDS", "IM"]


@pytest.mark.parametrize("fmt", OTHER_FORMATS)
def test_other_formats_named_jpg_refused(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "ISIC_0000001.jpg"
    path.write_bytes(_encoded(fmt))
    with pytest.raises(ImageRejected, match="only JPEG, PNG files are accepted"):
        read_image_file(path, 32, 95)


def test_eps_named_jpg_never_reaches_ghostscript(tmp_path: Path) -> None:
    path = tmp_path / "ISIC_9999999.jpg"
    path.write_bytes(EPS)
    with pytest.raises(ImageRejected, match="PostScript/EPS"):
        read_image_file(path, 32, 95)


@pytest.mark.parametrize("fmt", ["PNG", "MPO", "GIF", "TIFF", "WEBP"])
def test_animated_or_multiframe_refused(fmt: str) -> None:
    data = _animated(fmt)
    with pytest.raises(ImageRejected, match=r"frames|only JPEG, PNG"):
        load_rgb(data, "x")
    if fmt in ACCEPTED_FORMATS or fmt == "MPO":  # an accepted container: refused for its frames, by name
        with pytest.raises(ImageRejected, match="multi-frame"):
            open_image(data, "x")


def test_accepted_formats_still_decode() -> None:
    for fmt in ACCEPTED_FORMATS:
        img, found, mode = load_rgb(_encoded(fmt), "x")
        assert (found, mode, img.size) == (fmt, "RGB", (32, 32))


def test_decode_rgb_refuses_before_decoding() -> None:
    with pytest.raises(ImageRejected, match="PostScript"):
        decode_rgb(EPS, "sample shard-000000.tar: a")
    with pytest.raises(ImageRejected, match="only PNG"):  # a site accepting PNG alone
        decode_rgb(_encoded("JPEG"), "x", ("PNG",))


@pytest.mark.parametrize("member", [EPS, _encoded("WEBP"), _encoded("GIF"), _animated("PNG")])
@pytest.mark.parametrize("defer", [False, True])
def test_training_decoder_refuses_other_formats(member: bytes, defer: bool) -> None:
    decode = ImageDecoder(32, defer=defer)
    with pytest.raises(SampleRefused):
        decode("k", {"jpg": member, "cls": b"0"}, 0)


def test_deferred_png_decoded_as_png() -> None:
    decode = ImageDecoder(32, defer=True)
    samples = [decode(key, {"png": _encoded("PNG"), "cls": b"1"}, 0) for key in ("a", "b")]
    batch = {"encoded": [s["encoded"] for s in samples], "augment": torch.stack([s["augment"] for s in samples]),
             "label": torch.tensor([1, 1])}
    out = decode_on_device(batch, torch.device("cpu"), 32)
    assert out["image"].shape == (2, 3, 32, 32)
    assert abs(out["image"][0, 0].mean().item() - 200 / 255) < 0.01


def _split_with(tmp_path: Path, samples: list[tuple[str, bytes]]) -> Path:
    split = tmp_path / "train"
    split.mkdir()
    with wds.TarWriter(str(split / "shard-000000.tar")) as sink:
        for key, data in samples:
            sink.write({"__key__": key, "jpg": data, "cls": b"0"})
    (split / "manifest.json").write_text(json.dumps({"format": "lesion-vq/image-shards/v1",
                                                     "shards": [{"name": "shard-000000.tar"}]}))
    return split


def test_preview_leaves_out_other_formats(tmp_path: Path) -> None:
    from shards.preview import preview_grid

    split = _split_with(tmp_path, [("a", EPS), ("b", _encoded("WEBP")), ("c", _encoded("JPEG"))])
    out = preview_grid(split, tmp_path / "preview.png", per_class=2, cell=16)
    grid = np.asarray(Image.open(out).convert("RGB"))
    first, second = grid[2:14, 56 + 2:56 + 14], grid[2:14, 56 + 16 + 2:56 + 30]
    assert abs(int(first[..., 0].mean()) - 200) < 8, "the JPEG sample is shown first"
    assert second.min() == 255, "nothing else was decoded into the row"


def test_judge_and_sampler_read_png_only(tmp_path: Path) -> None:
    from judge.evaluate import _pixels

    assert _pixels(_encoded("PNG"), "x").shape == (3, 32, 32)
    for data in (EPS, _encoded("GIF"), _animated("PNG")):
        with pytest.raises(ImageRejected):
            _pixels(data, "samples/shard-000000.tar: s_0")


def test_pack_skips_other_formats_with_reasons(tmp_path: Path) -> None:
    from shards.pack import pack_isic

    images = tmp_path / "images"
    (images / "MEL").mkdir(parents=True)
    for i in range(6):
        (images / "MEL" / f"ISIC_000000{i}.jpg").write_bytes(_encoded("JPEG"))
    bad = {"ISIC_9999999": EPS, "ISIC_9999998": _encoded("WEBP"), "ISIC_9999997": _encoded("BMP"),
           "ISIC_9999996": _animated("PNG"), "ISIC_9999995": _encoded("TIFF")}
    for name, data in bad.items():
        (images / "MEL" / f"{name}.jpg").write_bytes(data)
    cfg = DataConfig(source="isic", isic_images=images, image_size=32, workers=1, val_fraction=0.2,
                     test_fraction=0.2)
    manifest = pack_isic(cfg, tmp_path / "out")
    reasons = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == set(bad)
    assert "PostScript/EPS" in reasons["ISIC_9999999"] and "frames" in reasons["ISIC_9999996"]
    assert sum(v["num_samples"] for v in manifest["splits"].values()) == 6
