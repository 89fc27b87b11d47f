import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.__main__ import main
from shards.config import DataConfig
from shards.manifest import ManifestError, read_manifest, verify_shards
from shards.pack import pack_isic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def isic_folder(tmp_path, shared_data):
    """The two real sample JPEGs plus one broken file of each kind and a few odd-but-valid ones."""
    src = shared_data / "isic-sample"
    images = tmp_path / "images"
    shutil.copytree(src / "images", images)
    good = (images / "ISIC_0024306.jpg").read_bytes()
    (images / "ISIC_9000001.jpg").write_bytes(b"")  # zero bytes
    (images / "ISIC_9000002.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (images / "ISIC_9000003.jpg").write_bytes(b"not an image at all")  # corrupt
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / "ISIC_9000004.jpg", "PNG")
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(images / "ISIC_9000005.png")
    Image.new("CMYK", (30, 30), (10, 200, 30, 0)).save(images / "ISIC_9000006.jpg")
    Image.new("RGBA", (30, 30), (10, 200, 30, 128)).save(images / "ISIC_9000007.png")
    rows = (src / "HAM10000_metadata.csv").read_text().splitlines()
    rows += [f"HAM_90000{i},ISIC_900000{i},{dx},histo,50,male,back" for i, dx in
             zip(range(1, 8), ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"], strict=True)]
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


@pytest.mark.slow
def test_pack_real_jpegs_skips_broken_files_with_reasons(isic_folder):
    cfg = DataConfig(source="isic", isic_images=isic_folder / "images", isic_csv=isic_folder / "meta.csv",
                     image_size=32, workers=2, val_fraction=0.0, test_fraction=0.0)
    top = pack_isic(cfg, isic_folder / "out")
    packed = sum(s["num_samples"] for s in top["splits"].values())
    assert packed == 6 and len(top["skipped"]) == 3 and top["found"] == packed + len(top["skipped"])
    reasons = {s["id"]: s["reason"] for s in top["skipped"]}
    assert "zero-byte" in reasons["ISIC_9000001"]
    assert "cannot decode" in reasons["ISIC_9000002"] and "cannot decode" in reasons["ISIC_9000003"]
    train = read_manifest(isic_folder / "out" / "train")
    assert train["skipped"] and train["tool_version"] == "0.1.0" and train["image_size"] == 32
    assert verify_shards(isic_folder / "out" / "train") == []


def test_modified_shard_is_caught_and_rerun_rebuilds(pack_synth, tmp_path):
    out = pack_synth(tmp_path / "out", num_images=40)
    shard = out / "train" / read_manifest(out / "train")["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("sha256" in p for p in verify_shards(out / "train"))
    pack_synth(out, num_images=40)  # same inputs but damaged: rebuilt
    assert verify_shards(out / "train") == []
    stamp = (out / "manifest.json").stat().st_mtime_ns
    pack_synth(out, num_images=40)  # intact and same inputs: nothing rewritten
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


_KILL_SCRIPT = """
import sys
from shards.config import DataConfig
from shards.pack import pack_synthetic
pack_synthetic(DataConfig(num_images=4000, image_size=64, shard_max_count=40, workers=1), sys.argv[1])
"""


@pytest.mark.slow
def test_kill_mid_pack_leaves_nothing_complete_and_rerun_completes(tmp_path, pack_synth):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(out)], cwd=REPO, start_new_session=True,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((out / "train").glob("shard-*.tar")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # like a node failure: the whole process group dies
    proc.wait()
    assert list((out / "train").glob("shard-*.tar")), "pack never got going"
    for folder in (out, out / "train"):
        with pytest.raises(ManifestError, match="missing"):
            read_manifest(folder)
    pack_synth(out, num_images=4000, image_size=64, shard_max_count=40)
    assert sum(s["num_samples"] for s in read_manifest(out)["splits"].values()) == 4000
    assert not list(out.rglob("*.tmp-*"))


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["pack", "--out", str(tmp_path / "o")]) == 2
    assert main(["pack", "--out", str(tmp_path / "o"), "--images", str(tmp_path / "nope")]) == 2
    assert main(["synth", "--out", str(tmp_path / "o"), "data.image_size=5"]) == 2
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "does not exist" in err and "data.image_size" in err


def test_cli_synth_and_inspect(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["synth", "--out", str(out), "data.num_images=30", "data.image_size=32", "data.workers=1"]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "checksums: OK" in text and (out / "preview.png").is_file()
    meta = json.loads((out / "train" / "manifest.json").read_text())
    assert meta["format"] == "lesion-vq/image-shards/v1" and sum(meta["class_counts"].values()) == meta["num_samples"]
