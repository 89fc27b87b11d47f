"""Recorded files are verified before they are trusted (runtime/integrity.py): a path a manifest records stays
inside its stage folder, and its bytes are the ones whose sha256 the producer recorded (issue 28, principle 3)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from runtime.integrity import IntegrityError, recorded_problems, stage_weights, verified_file


def _stage(tmp_path: Path, payload: bytes = b"weights") -> tuple[Path, dict]:
    folder = tmp_path / "vqvae"
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "model.safetensors").write_bytes(payload)
    manifest = {"weights": "final/model.safetensors", "weights_sha256": hashlib.sha256(payload).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, manifest


def test_intact_weights_pass(tmp_path: Path) -> None:
    folder, manifest = _stage(tmp_path)
    assert stage_weights(folder, manifest) == folder / "final" / "model.safetensors"
    assert recorded_problems(folder, manifest) == []


def test_replaced_weights_refused(tmp_path: Path) -> None:
    folder, manifest = _stage(tmp_path)
    (folder / "final" / "model.safetensors").write_bytes(b"a checkpoint copied over")
    with pytest.raises(IntegrityError, match=r"not the file .* recorded"):
        stage_weights(folder, manifest)
    assert recorded_problems(folder, manifest)


def test_missing_weights_refused(tmp_path: Path) -> None:
    folder, manifest = _stage(tmp_path)
    (folder / "final" / "model.safetensors").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        stage_weights(folder, manifest)


@pytest.mark.parametrize("recorded", ["../other/model.safetensors", "/etc/passwd", "final/../../x", "", None, 7,
                                      "final\\..\\x"])
def test_recorded_path_outside_folder_refused(tmp_path: Path, recorded: object) -> None:
    folder, manifest = _stage(tmp_path)
    with pytest.raises(IntegrityError, match=r"refusing to follow|not a relative path"):
        verified_file(folder, recorded, manifest["weights_sha256"], manifest=folder / "manifest.json")


def test_recorded_symlink_leaving_folder_refused(tmp_path: Path) -> None:
    folder, manifest = _stage(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"weights")  # the same bytes: the place alone is refused
    (folder / "final" / "link.safetensors").symlink_to(outside)
    with pytest.raises(IntegrityError, match="outside"):
        verified_file(folder, "final/link.safetensors", manifest["weights_sha256"], manifest=folder / "manifest.json")


def test_missing_sha_refused(tmp_path: Path) -> None:
    folder, manifest = _stage(tmp_path)
    with pytest.raises(IntegrityError, match="no recorded sha256"):
        verified_file(folder, manifest["weights"], None, manifest=folder / "manifest.json")


def test_split_shards_checked(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "shard-000000.tar").write_bytes(b"tar")
    (folder / "train" / "manifest.json").write_text(json.dumps(
        {"shards": [{"name": "shard-000000.tar", "sha256": hashlib.sha256(b"tar").hexdigest()}]}))
    manifest = {"splits": {"train": {}}}
    assert recorded_problems(folder, manifest) == []
    (folder / "train" / "shard-000000.tar").write_bytes(b"tampered")
    assert "not the file" in recorded_problems(folder, manifest)[0]
    assert "refusing to follow" in recorded_problems(folder, {"splits": {"../x": {}}})[0]
