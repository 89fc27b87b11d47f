"""Values read from shards are checked where they enter: a sample's class is 0..6 and its image 8-bit RGB at
the split's size, code grids hold 0..K-1 on the manifest's grid; split manifests' shard names, counts and sizes
are checked before any shard is opened; `shards inspect` reads splits and code shards."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    FinishedRun,
    assert_ok,
    assert_one_line_error,
    code_manifest,
    copy_run,
    lesion_jpeg,
    npy_bytes,
    run_cli,
    tiny_config,
    write_split,
)
from PIL import Image

from runtime.files import atomic_write_json
from shards.images import array_to_jpeg
from shards.manifest import read_manifest

# ----- helpers ---------------------------------------------------------------------------------------


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _load_all(loader: Any) -> tuple[list[str], list[str]]:
    batches = list(loader)
    return [k for b in batches for k in b["key"]], [d for b in batches for d in b["dropped"]]


def test_image_decoder_refuses_classes_sizes_and_pixel_formats_outside_the_split(tmp_path: Path) -> None:
    """Old code: cls 99 / -1 / '1_0' were passed on as labels, a 48-px image was silently resized, 'L' and
    'I;16' images converted (16-bit values clipped to white)."""
    from shards.loader import make_train_loader

    good = [{"__key__": f"ok_{i}", "jpg": lesion_jpeg(), "cls": str(i % 7).encode()} for i in range(6)]
    bad = {
        "cls_99": {"jpg": lesion_jpeg(), "cls": b"99"},
        "cls_neg": {"jpg": lesion_jpeg(), "cls": b"-1"},
        "cls_underscore": {"jpg": lesion_jpeg(), "cls": b"1_0"},
        "cls_text": {"jpg": lesion_jpeg(), "cls": b"MEL"},
        "size_48": {"jpg": lesion_jpeg(48), "cls": b"2"},
        "mode_l": {"jpg": array_to_jpeg(np.full((32, 32), 90, np.uint8), 90), "cls": b"2"},
        "mode_i16": {"png": _png(Image.fromarray(np.full((32, 32), 40000, np.uint16))), "cls": b"2"},
        "mode_rgba": {"png": _png(Image.new("RGBA", (32, 32), (9, 9, 9, 0))), "cls": b"2"},
    }
    samples = good + [{"__key__": key, **members} for key, members in bad.items()]
    split = write_split(tmp_path / "train", samples, image_size=32)
    loader = make_train_loader(split, batch_size=4, rank=0, world_size=1, epoch=0, seed=0)
    keys, dropped = _load_all(loader)
    assert sorted(keys) == sorted(s["__key__"] for s in good)
    reasons = dict(d.split(": ", 1) for d in dropped)
    assert set(reasons) == set(bad) and loader.dataset.stats["bad_sample"] == len(bad)
    assert "class 99 is outside 0..6" in reasons["cls_99"] and "class -1 is outside" in reasons["cls_neg"]
    assert "not a class index" in reasons["cls_underscore"] and "not a class index" in reasons["cls_text"]
    assert "image is 48x48" in reasons["size_48"] and "32x32" in reasons["size_48"]
    assert "'L' is not 8-bit RGB" in reasons["mode_l"] and "'I;16'" in reasons["mode_i16"]
    assert "'RGBA'" in reasons["mode_rgba"]


def test_code_decoder_checks_codes_grid_and_class_against_the_manifest_for_any_integer_dtype(tmp_path: Path) -> None:
    """Old code: codes >= K and negative codes reached the prior's embedding (IndexError), a 5x4 grid broke
    batching, class 99 was a label."""
    from shards.codes import make_code_eval_loader

    k, grid = 16, 4
    rng = np.random.default_rng(0)
    codes = rng.integers(0, k, (grid, grid))
    good = {f"ok_{dtype}": codes.astype(dtype) for dtype in ("uint8", "int16", "uint16", "int32", "int64", "uint64")}
    bad = {"too_big": np.full((grid, grid), k, np.int16), "negative": np.full((grid, grid), -1, np.int16),
           "huge_uint64": np.full((grid, grid), 2**63 + 5, np.uint64), "shape": np.zeros((5, grid), np.uint8),
           "float": codes.astype(np.float32), "cls_99": codes.astype(np.uint8)}
    samples = [{"__key__": key, "codes.npy": npy_bytes(array), "cls": b"99" if key == "cls_99" else b"3"}
               for key, array in {**good, **bad}.items()]
    split = write_split(tmp_path / "val", samples, **code_manifest(k, grid))
    loader = make_code_eval_loader(split, batch_size=4)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["key"]) == sorted(good)
    assert all(b["codes"].dtype == torch.long and b["codes"].shape[1:] == (grid, grid) for b in batches)
    reasons = dict(d.split(": ", 1) for b in batches for d in b["dropped"])
    assert set(reasons) == set(bad) and loader.dataset.stats["bad_sample"] == len(bad)
    assert "codes span 16..16, outside 0..15" in reasons["too_big"] and "-1..-1" in reasons["negative"]
    assert "outside 0..15" in reasons["huge_uint64"] and "code grid is 5x4" in reasons["shape"]
    assert "2-d integer grid" in reasons["float"] and "class 99" in reasons["cls_99"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m["shards"][0].update(name="../escape/shard-000000.tar"), "is not of the form shard-NNNNNN.tar"),
    (lambda m: m["shards"][0].update(name="/etc/passwd"), "is not of the form"),
    (lambda m: m["shards"][0].update(count=-1), "count is -1"),
    (lambda m: m.update(num_samples=m["num_samples"] + 5), "the sum of its shards' counts"),
    (lambda m: m.update(image_size="32"), "image_size is '32'"),
    (lambda m: m.update(image_size=True), "image_size is True"),
])
def test_split_manifest_values_are_checked_before_any_shard_is_opened(tmp_path: Path, change, message) -> None:
    """Old code followed any shard name (a path outside the split), took negative counts and a num_samples
    that disagrees with the shards, and used a string image size."""
    from shards.loader import make_train_loader
    from shards.manifest import ManifestError

    split = write_split(tmp_path / "train", [{"__key__": "a", "jpg": lesion_jpeg(), "cls": b"1"}] * 1, image_size=32)
    manifest = read_manifest(split)
    change(manifest)
    atomic_write_json(split / "manifest.json", manifest)
    with pytest.raises(ManifestError, match=message):
        list(make_train_loader(split, batch_size=1, rank=0, world_size=1, epoch=0, seed=0))


@pytest.mark.slow
def test_inspect_reads_a_split_folder_and_code_shards(finished_run: FinishedRun, tmp_path: Path) -> None:
    """Old code: KeyError 'splits' on anything but a packed folder's top level."""
    run_dir = copy_run(finished_run.run_dir, tmp_path / "run")
    for folder, needles in ((run_dir / "data" / "val", ["val ", "checksums: OK", "preview: "]),
                            (run_dir / "codes", ["code shards of a 32-code codebook, grid [8, 8]", "train ",
                                                 "checksums: OK"]),
                            (run_dir / "codes" / "train", ["code shards", "train ", "checksums: OK"])):
        result = assert_ok(run_cli("-m", "shards", "inspect", str(folder)))
        for needle in needles:
            assert needle in result.stdout, (folder, result.stdout)
    assert (run_dir / "data" / "preview-val.png").is_file()
    assert not (run_dir / "data" / "val" / "preview-val.png").exists()


@pytest.mark.slow
def test_a_split_packed_at_another_size_than_its_folder_says_is_refused(tmp_path: Path, tiny_data: Path) -> None:
    """Old code evaluated on the 32-px images resized to the split's claimed 64 px, without a word."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tiny_config(run_dir)
    shutil.copytree(tiny_data, run_dir / "data")
    manifest = read_manifest(run_dir / "data" / "val")
    atomic_write_json(run_dir / "data" / "val" / "manifest.json", manifest | {"image_size": 64})
    result = run_cli("vqvae/train.py", "--config", str(run_dir / "config.json"))
    assert_one_line_error(result, "declares image_size 64", "says 32")
    assert not (run_dir / "vqvae" / "checkpoints").exists()
