"""Manifests: what a split holds, and the checks that its shards are the ones that were written.

``OUT/<split>/manifest.json`` lists every shard with its sample count, size and sha256;
``OUT/manifest.json`` summarises all splits and is written last, so its presence means the data
stage finished.
"""

from __future__ import annotations

import tarfile
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from webdataset.tariterators import base_plus_ext

from runtime.files import sha256_file
from runtime.integrity import IntegrityError, recorded_path
from runtime.stages import ManifestError, stage
from runtime.stages import read_manifest as _read

FORMAT = stage("data").manifest_format
CODE_FORMAT = stage("encode").manifest_format
"""Code shards (vqvae/encode.py) share the split layout, so the same loader and checks read them."""
__all__ = ["CODE_FORMAT", "FORMAT", "ManifestError", "describe_shard", "read_manifest", "sample_offsets",
           "shard_paths", "verify_shards"]


def tool_version() -> str:
    try:
        return version("lesion-vq")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(split_dir: Path) -> dict[str, Any]:
    """The manifest of ``split_dir`` (a split folder or the top-level output folder) of image or code shards."""
    return _read(split_dir, (FORMAT, CODE_FORMAT))


def shard_paths(split_dir: Path) -> list[Path]:
    """Shard files of a split, in manifest order (a recorded name leaving the split folder is refused)."""
    where = Path(split_dir) / "manifest.json"
    return [recorded_path(split_dir, s.get("name"), manifest=where) for s in read_manifest(split_dir)["shards"]]


def sample_offsets(path: Path) -> list[int]:
    """Byte offset where each sample of a tar shard starts, plus the end of the last one: sample i is the
    byte range ``[offsets[i], offsets[i + 1])`` (its members' headers and data). Readers seek straight to
    their own samples with it (shards/stream.py) instead of parsing every shard."""
    offsets: list[int] = []
    key = None
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            base, _ = base_plus_ext(info.name)
            if base != key:  # webdataset groups consecutive members with the same key into one sample
                offsets.append(info.offset)  # header offset (a GNU/pax long-name header included)
                key = base
            end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return [*offsets, end] if offsets else [0]


def describe_shard(path: Path, count: int) -> dict[str, Any]:
    """A split manifest's entry for one shard: name, samples, size, sha256 and the sample index."""
    offsets = sample_offsets(path)
    if len(offsets) != count + 1:
        raise ManifestError(f"{path}: holds {len(offsets) - 1} samples, but {count} were written")
    return {"name": path.name, "count": count, "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "offsets": offsets}


def verify_shards(split_dir: Path) -> list[str]:
    """Problems with a split's shards (missing file, size or sha256 mismatch); empty when intact."""
    problems = []
    where = Path(split_dir) / "manifest.json"
    for shard in read_manifest(split_dir)["shards"]:
        try:
            path = recorded_path(split_dir, shard.get("name"), manifest=where)
        except IntegrityError as err:
            problems.append(str(err))
            continue
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != shard["bytes"]:
            problems.append(f"{path}: size {path.stat().st_size} != manifest {shard['bytes']}")
        elif sha256_file(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (modified or corrupted)")
    return problems
