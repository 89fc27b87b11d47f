"""Hostile input, round 2 (issue 14): every value checked where it enters, every OS error one clear line.

1. Values read from outside are range-checked where they enter: a sample's class must be 0..6, its image
   8-bit RGB at the split's size, its codes 0..K-1 on the manifest's grid (any integer dtype); decoders
   refuse and count other samples. Split manifests' shard names, counts and sizes are checked. Packing
   converts every pixel format by an explicit rule (16-bit scaled, alpha composited) or skips it naming the
   format; ambiguous CSV headers are refused naming the columns. Code shards use the smallest integer dtype.
2. OS errors (disk full, read-only, not a folder, name too long, a folder where a file goes) end a command
   with exit 2 and one ``error: <path>: <cause>`` line, no traceback, and no ``*.tmp-*`` file left.
3. Silent mismatches are stated: a split packed at another size than its folder says is refused; resuming
   with another world size is logged and recorded in the manifest.
4. Clean output: no NumPy "not writable" warning, the report path printed once (by the pipeline), class
   names on the sample grid's rows, and ``--quick`` benchmark tables say their ratios mean nothing.

Disk-full and read-only cases use a real tmpfs (``mount`` needs root, as in CI); they skip with the reason
where it cannot be mounted.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import REPO, FinishedRun, assert_ok, assert_one_line_error, copy_run, run_cli, stage_env, tiny_config
from PIL import Image

from runtime.files import atomic_write_json
from runtime.launcher import accelerate_command
from shards.config import CLASSES, DataConfig
from shards.images import array_to_jpeg
from shards.manifest import CODE_FORMAT, FORMAT, describe_shard, read_manifest
from shards.synth import render_lesion

# ----- helpers ---------------------------------------------------------------------------------------


def _temps(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if ".tmp-" in p.name]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``tmpfs(name, size)``: a fresh tmpfs of ``size`` (e.g. "512k") mounted at tmp_path/name, unmounted after."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip() or done.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def _read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)


def _fill(where: Path, leave: int) -> None:
    """Occupy all but ``leave`` bytes of the file system of ``where``."""
    stat = os.statvfs(where)
    with open(where / "filler", "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, max(0, stat.f_bavail * stat.f_frsize - leave))


def _write_split(folder: Path, samples: list[dict[str, bytes | str]], **declared: Any) -> Path:
    """A hand-made split (one shard, manifest consistent with it) of raw samples."""
    folder.mkdir(parents=True)
    path = folder / "shard-000000.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    atomic_write_json(folder / "manifest.json", {"format": declared.pop("format", FORMAT), "split": folder.name,
                                                 "shards": [describe_shard(path, len(samples))],
                                                 "num_samples": len(samples), **declared})
    return folder


def _jpg(size: int = 32, label: int = 1) -> bytes:
    return array_to_jpeg(render_lesion(3, label, size), 90)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _load_all(loader: Any) -> tuple[list[str], list[str]]:
    batches = list(loader)
    return [k for b in batches for k in b["key"]], [d for b in batches for d in b["dropped"]]


# ----- 1. values range-checked where they enter ---------------------------------------------------------


def test_image_decoder_refuses_classes_sizes_and_pixel_formats_outside_the_split(tmp_path: Path) -> None:
    """Old code: cls 99 / -1 / '1_0' were passed on as labels, a 48-px image was silently resized, 'L' and
    'I;16' images converted (16-bit values clipped to white)."""
    from shards.loader import make_train_loader

    good = [{"__key__": f"ok_{i}", "jpg": _jpg(), "cls": str(i % 7).encode()} for i in range(6)]
    bad = {
        "cls_99": {"jpg": _jpg(), "cls": b"99"},
        "cls_neg": {"jpg": _jpg(), "cls": b"-1"},
        "cls_underscore": {"jpg": _jpg(), "cls": b"1_0"},
        "cls_text": {"jpg": _jpg(), "cls": b"MEL"},
        "size_48": {"jpg": _jpg(48), "cls": b"2"},
        "mode_l": {"jpg": array_to_jpeg(np.full((32, 32), 90, np.uint8), 90), "cls": b"2"},
        "mode_i16": {"png": _png(Image.fromarray(np.full((32, 32), 40000, np.uint16))), "cls": b"2"},
        "mode_rgba": {"png": _png(Image.new("RGBA", (32, 32), (9, 9, 9, 0))), "cls": b"2"},
    }
    samples = good + [{"__key__": key, **members} for key, members in bad.items()]
    split = _write_split(tmp_path / "train", samples, image_size=32)
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


def _code_manifest(k: int, grid: int) -> dict[str, Any]:
    return {"format": CODE_FORMAT, "codebook_size": k, "grid": [grid, grid]}


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
    samples = [{"__key__": key, "codes.npy": _npy(array), "cls": b"99" if key == "cls_99" else b"3"}
               for key, array in {**good, **bad}.items()]
    split = _write_split(tmp_path / "val", samples, **_code_manifest(k, grid))
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

    split = _write_split(tmp_path / "train", [{"__key__": "a", "jpg": _jpg(), "cls": b"1"}] * 1, image_size=32)
    manifest = read_manifest(split)
    change(manifest)
    atomic_write_json(split / "manifest.json", manifest)
    with pytest.raises(ManifestError, match=message):
        list(make_train_loader(split, batch_size=1, rank=0, world_size=1, epoch=0, seed=0))


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
    return {"grey16": "grey 128", "int32": "grey 128", "clear_green": "black", "clear_grey": "black",
            "palette_clear": "black", "grey8": "grey 77", "float": "skipped 'F'", "int32_big": "skipped 0..65535"}


def test_packing_converts_every_pixel_format_by_an_explicit_rule_or_skips_it_naming_it(tmp_path: Path) -> None:
    """Old code: a 16-bit image was clipped to white, transparent pixels kept their hidden colour, a float
    image was clipped and packed."""
    from shards.pack import pack_isic

    expected = _mode_images(tmp_path / "images")
    cfg = DataConfig(source="isic", isic_images=tmp_path / "images", image_size=32, workers=1, val_fraction=0.0,
                     test_fraction=0.0)
    manifest = pack_isic(cfg, tmp_path / "out")
    skipped = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert "pixel format 'F'" in skipped["float"] and "has no faithful conversion" in skipped["float"]
    assert "70000..70000, outside the 16-bit range 0..65535" in skipped["int32_big"]
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


def test_code_shards_use_the_smallest_integer_dtype_holding_the_codebook() -> None:
    """Old code wrote int16 whatever the codebook size."""
    from shards.codes import code_dtype, codes_npy

    sizes = (2, 256, 257, 32768, 32769, 65536, 65537)
    assert [code_dtype(k) for k in sizes] == [np.uint8, np.uint8, np.int16, np.int16, np.uint16, np.uint16, np.int32]
    for k, top in ((256, 255), (32768, 32767), (65536, 65535)):  # the largest code survives the round trip
        grid = np.array([[0, top], [7, 9]])
        stored = np.load(io.BytesIO(codes_npy(grid, k)), allow_pickle=False)
        assert stored.dtype == code_dtype(k) and (stored == grid).all()


@pytest.mark.slow
def test_encode_and_sample_store_uint8_codes_for_a_small_codebook(finished_run: FinishedRun) -> None:
    run_dir = finished_run.run_dir
    for folder in (run_dir / "codes" / "val", run_dir / "samples"):
        sample = next(iter(wds.WebDataset(sorted(str(p) for p in folder.glob("shard-*.tar")), shardshuffle=False,
                                          empty_check=False)))
        assert np.load(io.BytesIO(sample["codes.npy"]), allow_pickle=False).dtype == np.uint8  # K = 32


def _add_to_split(split: Path, samples: list[dict[str, bytes]], name: str = "shard-000099.tar") -> None:
    """Append a shard that is consistent with the split's manifest (so only its contents are hostile)."""
    path = split / name
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    manifest = read_manifest(split)
    manifest["shards"].append(describe_shard(path, len(samples)))
    manifest["num_samples"] += len(samples)
    atomic_write_json(split / "manifest.json", manifest)


@pytest.mark.slow
def test_bad_class_trains_refused_and_encode_stops_with_one_line_naming_the_sample(tmp_path: Path,
                                                                                    tiny_data: Path) -> None:
    """Old code: the VQ-VAE trained on cls 99 / -1 without a word, then encode crashed with an IndexError
    (99) or counted -1 as VASC in the codes manifest."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # 24 steps: more than two epochs of the ~82 training samples, so both bad samples are certainly read.
    tiny_config(run_dir, "vqvae_train.max_steps=24", "vqvae_train.eval_every=100", "encode.num_tasks=1")
    shutil.copytree(tiny_data, run_dir / "data")
    good = [{"__key__": f"ok_{i}", "jpg": _jpg(32, i % 7), "cls": str(i % 7).encode(), "json": b"{}"}
            for i in range(4)]
    _add_to_split(run_dir / "data" / "train", [*good, {"__key__": "bad_99", "jpg": _jpg(), "cls": b"99", "json": b"{}"},
                                               {"__key__": "bad_neg", "jpg": _jpg(), "cls": b"-1", "json": b"{}"}])
    config = str(run_dir / "config.json")
    trained = assert_ok(run_cli("vqvae/train.py", "--config", config))
    assert "bad_99" in trained.stderr and "class 99 is outside 0..6" in trained.stderr
    assert "class -1 is outside 0..6" in trained.stderr
    encoded = run_cli("vqvae/encode.py", "--config", config)
    assert_one_line_error(encoded, "shard-000099.tar", "bad_99: refused: class 99 is outside 0..6")
    assert not (run_dir / "codes" / "manifest.json").exists() and not _temps(run_dir)


def _code_run(run_dir: Path, k: int, grid: int, bad: dict[str, np.ndarray]) -> str:
    """A run dir whose encode stage is a hand-made (lineage-consistent) code folder with ``bad`` samples added."""
    from runtime.lineage import identity
    from runtime.ownership import write_marker

    cfg = tiny_config(run_dir, "prior_train.max_steps=6", "prior_train.eval_every=6", "prior_train.checkpoint_every=6")
    codes_dir = run_dir / "codes"
    ident = identity(cfg, "encode", {})
    write_marker(codes_dir, "stage", stage="encode", identity=ident)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 28), ("val", 14)):
        samples = [{"__key__": f"{split}_{i}", "codes.npy": _npy(rng.integers(0, k, (grid, grid)).astype(np.int16)),
                    "cls": str(i % 7).encode(), "json": b"{}"} for i in range(n)]
        samples += [{"__key__": f"{split}_{key}", "codes.npy": _npy(codes), "cls": b"1", "json": b"{}"}
                    for key, codes in bad.items()]
        _write_split(codes_dir / split, samples, **_code_manifest(k, grid))
        splits[split] = {"num_samples": len(samples)}
    atomic_write_json(codes_dir / "manifest.json", {
        **_code_manifest(k, grid), "splits": splits, "upstream": {}, "identity": ident, "content": "test",
        "settings": {}, "lineage": {}})
    return str(run_dir / "config.json")


@pytest.mark.slow
def test_codes_outside_the_codebook_are_refused_by_prior_training_and_the_report(tmp_path: Path) -> None:
    """Old code: prior training died with an IndexError in the embedding, the report with a broadcast error."""
    config = _code_run(tmp_path / "run", 32, 8, {"code_32": np.full((8, 8), 32, np.int16),
                                                  "code_neg": np.full((8, 8), -3, np.int32)})
    trained = assert_ok(run_cli("prior/train.py", "--config", config))
    assert "codes span 32..32, outside 0..31" in trained.stderr and "codes span -3..-3" in trained.stderr
    assert "Traceback" not in trained.stderr
    report = assert_ok(run_cli("-m", "launch.report", str(tmp_path / "run")))
    assert "Traceback" not in report.stderr
    usage = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())["codebook_train"]
    assert usage, "the code histogram was computed from the in-range codes"


# ----- 2. OS errors: one line, naming the path and the cause, no temporary file left -------------------


def test_os_error_lines_name_path_and_cause_and_leave_real_bugs_alone() -> None:
    """Old code had no such translation: torch's 'unexpected pos' never said the disk was full."""
    from runtime.cli import os_error_line
    from runtime.files import naming

    full = os_error_line(OSError(errno.ENOSPC, "No space left on device", "/r/x.pt.tmp-abc12"))
    assert full is not None and full.startswith("/r/x.pt: No space left on device [ENOSPC]")
    torch_full = os_error_line(RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 576 vs 534"))
    assert torch_full is not None and "is the disk full?" in torch_full
    safetensors_full = os_error_line(RuntimeError("Error while serializing: I/O error: No space left on device "
                                                  "(os error 28)"))
    assert safetensors_full is not None and "No space left on device [ENOSPC]" in safetensors_full
    renamed = os_error_line(IsADirectoryError(errno.EISDIR, "Is a directory", "/r/c.json.tmp-x1", "/r/c.json"))
    assert renamed is not None and renamed.startswith("/r/c.json: Is a directory [EISDIR]")
    # Bugs keep their traceback: not an OS error about the user's files, or an errno that means a bug.
    assert os_error_line(RuntimeError("shape mismatch")) is None and os_error_line(KeyError("x")) is None
    assert os_error_line(OSError(errno.EBADF, "Bad file descriptor")) is None
    with pytest.raises(OSError) as caught, naming(Path("/r/out.tar")):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.filename == "/r/out.tar"


def _pack_on_full_disk(tmpfs) -> tuple[Path, subprocess.CompletedProcess[str]]:
    mnt = tmpfs("disk", "256k")
    return mnt, run_cli("-m", "shards", "synth", "--out", str(mnt / "data"), "data.num_images=300",
                     "data.image_size=64", "data.workers=1")


@pytest.mark.slow
def test_disk_full_while_packing_exits_2_naming_the_folder_and_leaves_no_temporary_file(tmpfs) -> None:
    """Old code: an OSError traceback and a ``shard-000000.tar.tmp-writing`` left behind."""
    mnt, result = _pack_on_full_disk(tmpfs)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {mnt / 'data' / 'train' / 'shard-000000.tar'}: No space left on device [ENOSPC]; "
                      "free some space or choose "
                      "another run_dir, then rerun (finished work is kept)"], result.stderr[-3000:]
    assert "Traceback (most recent call last):\n  File" not in result.stderr.split("error:")[0]
    assert not _temps(mnt) and not (mnt / "data" / "manifest.json").exists()


@pytest.mark.slow
def test_disk_full_while_packing_is_one_line_without_any_traceback(tmpfs) -> None:
    mnt, result = _pack_on_full_disk(tmpfs)
    assert_one_line_error(result, str(mnt / "data"), "No space left on device [ENOSPC]")


def test_save_checkpoint_on_a_full_disk_raises_enospc_naming_the_file_and_cleans_up(tmpfs) -> None:
    """Old code: SafetensorError / torch's 'unexpected pos N vs M' RuntimeError, no errno, no path."""
    from runtime.checkpoint import TrainState, save_checkpoint

    mnt = tmpfs("disk", "64k")
    model = torch.nn.Linear(200, 200)  # 160 kB of weights
    with pytest.raises(OSError) as caught:
        save_checkpoint(mnt / "checkpoints", model, torch.optim.Adam(model.parameters()), TrainState(step=3))
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(mnt / "checkpoints" / "step-00000003" / "model.safetensors")
    assert not _temps(mnt) and not list((mnt / "checkpoints").iterdir())


def _tmpfs_run(mnt: Path, tiny_data: Path, *extra: str) -> str:
    run_dir = mnt / "run"
    run_dir.mkdir()
    tiny_config(run_dir, *extra)
    (run_dir / "data").symlink_to(tiny_data, target_is_directory=True)
    return str(run_dir / "config.json")


@pytest.mark.slow
def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_temporary_checkpoint(tmpfs, tiny_data) -> None:
    """Old code: 'RuntimeError: [enforce fail at inline_container.cc:671] . unexpected pos ...' traceback."""
    mnt = tmpfs("disk", "512k")  # a tiny checkpoint is about 950 kB
    result = run_cli("vqvae/train.py", "--config", _tmpfs_run(mnt, tiny_data))
    assert_one_line_error(result, str(mnt / "run" / "vqvae" / "checkpoints" / "step-00000005"),
                    "No space left on device [ENOSPC]", "free some space")
    assert not _temps(mnt)
    assert not [p for p in (mnt / "run" / "vqvae" / "checkpoints").iterdir()]


@pytest.mark.slow
def test_disk_full_while_encoding_is_one_line_and_leaves_no_temporary_shard(tmpfs, tiny_data) -> None:
    mnt = tmpfs("disk", "8m")
    config = _tmpfs_run(mnt, tiny_data, "vqvae_train.max_steps=5", "vqvae_train.eval_every=100", "encode.num_tasks=1")
    assert_ok(run_cli("vqvae/train.py", "--config", config))
    _fill(mnt, leave=16 * 1024)
    result = run_cli("vqvae/encode.py", "--config", config)
    assert_one_line_error(result, str(mnt / "run" / "codes"), ".tar: No space left on device [ENOSPC]")
    assert not _temps(mnt) and not (mnt / "run" / "codes" / "manifest.json").exists()


@pytest.mark.slow
def test_read_only_run_dir_is_one_line_for_training_and_the_report(tmpfs, tiny_data, finished_run) -> None:
    mnt = tmpfs("ro", "32m")
    fresh = _tmpfs_run(mnt, tiny_data)
    copy_run(finished_run.run_dir, mnt / "done")
    _read_only(mnt)
    assert_one_line_error(run_cli("vqvae/train.py", "--config", fresh), str(mnt / "run"),
                          "Read-only file system [EROFS]")
    assert_one_line_error(run_cli("-m", "launch.report", str(mnt / "done")), str(mnt / "done" / "report"),
                          "Read-only file system [EROFS]")


@pytest.mark.parametrize("case", ["under_a_file", "name_too_long", "config_is_a_folder"])
@pytest.mark.slow
def test_unusable_run_dir_paths_are_one_line(tmp_path: Path, case: str) -> None:
    """Old code: NotADirectoryError / 'File name too long' / IsADirectoryError tracebacks from the pipeline."""
    (tmp_path / "afile").write_text("not a folder")
    run_dir = {"under_a_file": tmp_path / "afile" / "run", "name_too_long": tmp_path / ("x" * 300),
               "config_is_a_folder": tmp_path / "run"}[case]
    if case == "config_is_a_folder":
        (run_dir / "config.json").mkdir(parents=True)
    result = run_cli("launch/pipeline.py", "wandb=disabled", f"run_dir={run_dir}", "--only", "data")
    cause = {"under_a_file": "Not a directory [ENOTDIR]", "name_too_long": "File name too long [ENAMETOOLONG]",
             "config_is_a_folder": "Is a directory [EISDIR]"}[case]
    shown = run_dir / "config.json" if case == "config_is_a_folder" else run_dir
    assert_one_line_error(result, f"{shown}: {cause}")
    assert not _temps(tmp_path)


@pytest.mark.slow
def test_report_on_a_missing_or_empty_dir_says_what_is_wrong(tmp_path: Path) -> None:
    missing = run_cli("-m", "launch.report", str(tmp_path / "nope"))
    assert_one_line_error(missing, f"run directory {tmp_path / 'nope'} does not exist")
    (tmp_path / "empty").mkdir()
    empty = run_cli("-m", "launch.report", str(tmp_path / "empty"))
    assert_one_line_error(empty, f"{tmp_path / 'empty'} is not a lesion-vq run directory: it has no config.json")
    assert not any((tmp_path / "empty").iterdir())


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


# ----- 3. silent mismatches are stated ---------------------------------------------------------------------


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


@pytest.mark.slow
def test_resuming_with_another_world_size_continues_the_epoch_and_is_recorded(tmp_path: Path, tiny_run) -> None:
    """Old code resumed a checkpoint of another world size silently, by global step (another data order)."""
    cfg, config = tiny_run("vqvae_train.max_steps=10", "vqvae_train.eval_every=100", "vqvae_train.checkpoint_every=5")
    out = Path(cfg.run_dir) / "vqvae"
    argv, env = accelerate_command("vqvae/train.py", ["--config", str(config)], processes=2)
    assert_ok(subprocess.run(argv, cwd=REPO, env=stage_env(**env), capture_output=True, text=True, timeout=300))
    meta = json.loads((out / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert meta["extra"]["world_size"] == 2
    assert json.loads((out / "manifest.json").read_text())["world_size_changes"] == []
    shutil.rmtree(out / "checkpoints" / "step-00000010")
    (out / "manifest.json").unlink()
    resumed = assert_ok(run_cli("vqvae/train.py", "--config", str(config)))
    assert "with 1 processes instead of 2" in resumed.stderr and "no sample repeated or skipped" in resumed.stderr
    changes = json.loads((out / "manifest.json").read_text())["world_size_changes"]
    assert changes == [{"step": 5, "from": 2, "to": 1, "epoch": meta["epoch"], "position": meta["position"]}]
    assert (meta["epoch"], meta["position"]) != (0, 0)
    # Killed after its last checkpoint, before the manifest: a rerun writes the outputs and trains no further.
    (out / "manifest.json").unlink()
    assert_ok(run_cli("vqvae/train.py", "--config", str(config)))
    assert json.loads((out / "manifest.json").read_text())["steps"] == 10
    assert not (out / "checkpoints" / "step-00000011").exists()


# ----- 4. clean output -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sampling_prints_no_numpy_not_writable_warning(finished_run: FinishedRun) -> None:
    logs = finished_run.result.stderr
    assert "all 2 tasks done" in logs and "not writable" not in logs and "UserWarning" not in logs


@pytest.mark.slow
def test_sample_grid_rows_carry_their_class_names(finished_run: FinishedRun) -> None:
    """Old code: the grid had no labels (exactly per_class cells wide)."""
    grid = np.asarray(Image.open(finished_run.run_dir / "samples" / "samples.png").convert("L"))
    cell, pad = 32 + 2, 2  # 32-px samples, make_grid padding
    margin = grid.shape[1] - (pad + cell * 1)  # one column: as wide as the rarest class (sample.min_per_class=1)
    assert grid.shape[0] == pad + cell * len(CLASSES) and margin > 20
    for row in range(len(CLASSES)):  # dark text pixels beside every row
        band = grid[pad + row * cell: pad + row * cell + 32, :margin]
        assert (band < 100).sum() > 10, f"no label beside row {row}"


def test_save_grid_labels_rows_on_a_margin(tmp_path: Path) -> None:
    from runtime.images import save_grid

    plain = save_grid(torch.ones(4, 3, 16, 16), tmp_path / "plain.png", nrow=2)
    labelled = save_grid(torch.ones(4, 3, 16, 16), tmp_path / "labelled.png", nrow=2, row_labels=["MEL", "AKIEC"])
    plain_px, labelled_px = (np.asarray(Image.open(p).convert("L")) for p in (plain, labelled))
    assert labelled_px.shape[0] == plain_px.shape[0] and labelled_px.shape[1] > plain_px.shape[1] + 20
    assert (labelled_px[:, : labelled_px.shape[1] - plain_px.shape[1]] < 100).any()


@pytest.mark.slow
def test_the_report_path_is_not_printed_by_the_report_stage(finished_run: FinishedRun, tmp_path: Path) -> None:
    """The pipeline prints it in its summary; old code printed 'report: ...' a second time."""
    run_dir = copy_run(finished_run.run_dir, tmp_path / "run")
    result = assert_ok(run_cli("-m", "launch.report", "--config", run_dir / "config.json"))
    path = str(run_dir / "report" / "report.html")
    assert "report:" not in result.stdout and (result.stdout + result.stderr).count(path) == 1


def test_quick_benchmark_tables_say_their_ratios_mean_nothing() -> None:
    from bench.common import Row, markdown, with_ratios

    table = with_ratios([Row("a", "base", 4.0, "x/s", "base"), Row("a", "fast", 10.0, "x/s", "base")])
    meta = {"host": "h", "device": "cpu", "cpu_model": "m", "cpu_cores": 2, "torch": "t", "python": "p", "date": "d"}
    assert "ratios below mean nothing" in markdown(table, meta | {"quick": True})
    assert "mean nothing" not in markdown(table, meta | {"quick": False})
