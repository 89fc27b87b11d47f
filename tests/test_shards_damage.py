"""Fault injection, shards: damaged, missing, modified and hostile tar shards.

Decided behaviour (README, "Reliability: injected faults"):

- The reader (shards.stream) never stops on bad data: a damaged tar, an undecodable sample, a member
  with a non-allowed extension (.pyd, .pickle: never unpickled) or an unsafe key ('../x', '/abs') is
  skipped, counted and named in a warning, and every rank still runs the same number of steps.
- Training refuses to start (exit 2, one-line error, nothing written) when a shard of its split is
  missing, has another size, or another sha256 than its manifest: such damage would otherwise only show
  up as samples silently missing from every epoch (a tar cut at a member boundary or with a broken
  header in the middle reads as a clean, shorter archive) or as wrong pixels.
- A shard that is consistent with its manifest but hostile (made elsewhere) trains on its good samples
  and refuses the rest: nothing is unpickled and nothing is written outside the run directory.

Already covered elsewhere: truncated shard mid-member and pickle members at loader level
(tests/test_shards_loader.py), modified shard caught and repacked by pack (tests/test_shards_pack.py).
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import REPO, run_cli, tiny_config

from runtime.files import atomic_write_json
from shards.images import array_to_jpeg
from shards.loader import make_train_loader, steps_per_epoch
from shards.manifest import describe_shard, read_manifest, verify_shards
from shards.synth import render_lesion


class _Evil:
    """Unpickling this creates ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _member_offsets(shard: Path) -> list[int]:
    with tarfile.open(shard) as tar:
        return [m.offset for m in tar.getmembers()]


def _copy_split(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _run_loader(split: Path, world: int = 1) -> tuple[list[list[str]], list, int]:
    keys, stats, steps = [], [], steps_per_epoch(read_manifest(split)["num_samples"], 8, world)
    for rank in range(world):
        loader = make_train_loader(split, batch_size=8, rank=rank, world_size=world, epoch=0, seed=0)
        batches = list(loader)
        assert len(batches) == steps, "ranks would run different step counts (DDP hang)"
        keys.append([k for b in batches for k in b["key"]])
        stats.append(loader.dataset.stats)
    return keys, stats, steps


def test_tar_cut_exactly_at_a_member_boundary_is_counted_not_silent(tmp_path, synth_shards):
    """tarfile treats a tar cut between members as a normal end of archive: only the manifest count tells."""
    split = _copy_split(synth_shards / "train", tmp_path / "train")
    shard = split / read_manifest(split)["shards"][1]["name"]
    offsets = _member_offsets(shard)
    cut = offsets[len(offsets) // 2 - (len(offsets) // 2) % 3]  # start of a sample (3 members each)
    shard.write_bytes(shard.read_bytes()[:cut])
    keys, stats, _ = _run_loader(split, world=2)
    n = read_manifest(split)["num_samples"]
    assert len(keys[0]) + len(keys[1]) < n and not set(keys[0]) & set(keys[1])
    assert sum(s["tar_error"] for s in stats) >= 2  # each rank reports it
    assert any("size" in p for p in verify_shards(split))


def test_tar_with_a_broken_member_header_is_counted_and_caught_by_checksum(tmp_path, synth_shards):
    """A corrupt header in the middle: same file size, the rest of the shard reads as 'end of archive'."""
    split = _copy_split(synth_shards / "train", tmp_path / "train")
    shard = split / read_manifest(split)["shards"][0]["name"]
    offsets = _member_offsets(shard)
    data = bytearray(shard.read_bytes())
    data[offsets[6] + 3] ^= 0x5A  # inside the name field: header checksum no longer matches
    shard.write_bytes(bytes(data))
    keys, stats, _ = _run_loader(split)
    assert len(keys[0]) < read_manifest(split)["num_samples"]
    assert stats[0]["tar_error"] >= 1
    assert [p for p in verify_shards(split) if "sha256" in p], "same size: only the checksum can tell"


def _hostile_shard(path: Path, marker: Path) -> int:
    """Good samples mixed with pickle members, path-traversal / absolute names and a symlink member."""
    jpg = array_to_jpeg(render_lesion(5, 1, 32), 90)
    members: list[tuple[str, bytes | None]] = []
    for i in range(6):
        members += [(f"ok_{i:03d}.jpg", jpg), (f"ok_{i:03d}.cls", str(i % 7).encode())]
    payload = pickle.dumps(_Evil(marker))
    members += [("evil_1.jpg", jpg), ("evil_1.cls", b"1"), ("evil_1.pyd", payload),
                ("evil_2.jpg", jpg), ("evil_2.cls", b"1"), ("evil_2.pickle", payload),
                ("../../escape_1.jpg", jpg), ("../../escape_1.cls", b"2"),
                ("/tmp/lesion_vq_escape_2.jpg", jpg), ("/tmp/lesion_vq_escape_2.cls", b"2"),
                ("sub/../../escape_3.jpg", jpg), ("sub/../../escape_3.cls", b"2"),
                ("link_1.jpg", None), ("link_1.cls", b"3")]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:  # a symlink member pointing outside
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return 12  # samples: 6 ok, 2 evil, 3 escape, 1 link


def _add_shard(split: Path, shard: Path, count: int) -> None:
    manifest = read_manifest(split)
    manifest["shards"].append(describe_shard(shard, count))
    manifest["num_samples"] += count
    atomic_write_json(split / "manifest.json", manifest)


def test_hostile_members_are_refused_counted_and_never_unpickled(tmp_path, synth_shards):
    marker = tmp_path / "UNPICKLED"
    split = _copy_split(synth_shards / "train", tmp_path / "train")
    hostile = split / "shard-000099.tar"
    _add_shard(split, hostile, _hostile_shard(hostile, marker))
    keys, stats, _ = _run_loader(split, world=2)
    flat = keys[0] + keys[1]
    assert {f"ok_{i:03d}" for i in range(6)} <= set(flat)
    assert not [k for k in flat if k.startswith(("evil", "link")) or "escape" in k]
    assert sum(s["bad_sample"] for s in stats) == 6  # each refused sample counted once, by the rank owning it
    assert not marker.exists()
    assert not Path("/tmp/lesion_vq_escape_2.jpg").exists()


# ----- training on damaged shards (real subprocesses) ---------------------------------------------
def _own_run(tmp_path: Path, tiny_data: Path, *extra: str) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tiny_config(run_dir, "vqvae_train.max_steps=12", "vqvae_train.eval_every=100", *extra)
    shutil.copytree(tiny_data, run_dir / "data")
    return run_dir, run_dir / "config.json"


def _damage(shard: Path, how: str) -> None:
    if how == "missing":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:  # "modified": one byte inside a JPEG, same size
        data = bytearray(shard.read_bytes())
        data[_member_offsets(shard)[0] + 512 + 300] ^= 0xFF
        shard.write_bytes(bytes(data))


@pytest.mark.parametrize(("how", "message"), [("missing", "missing"), ("truncated", "size"),
                                              ("modified", "sha256 differs"), ("val-missing", "missing")])
@pytest.mark.slow
def test_training_refuses_missing_truncated_or_modified_shards_before_any_work(tmp_path, tiny_data, how, message):
    run_dir, config = _own_run(tmp_path, tiny_data)
    split = run_dir / "data" / ("val" if how.startswith("val-") else "train")
    shard = split / read_manifest(split)["shards"][-1]["name"]
    _damage(shard, how.removeprefix("val-"))
    result = run_cli("vqvae/train.py", "--config", config)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "refusing to train" in result.stderr and shard.name in result.stderr and message in result.stderr
    assert "python -m shards inspect" in result.stderr
    assert not (run_dir / "vqvae" / "checkpoints").exists() and not (run_dir / "vqvae" / "manifest.json").exists()
    if how == "modified":  # the documented full check says the same
        inspect = subprocess.run([sys.executable, "-m", "shards", "inspect", str(run_dir / "data")], cwd=REPO,
                                 capture_output=True, text=True, timeout=120, check=False)
        assert inspect.returncode == 1 and "FAILED" in inspect.stdout and shard.name in inspect.stdout


@pytest.mark.slow
def test_training_on_a_consistent_but_hostile_shard_refuses_its_bad_members(tmp_path, tiny_data):
    marker = tmp_path / "UNPICKLED"
    run_dir, config = _own_run(tmp_path, tiny_data)
    split = run_dir / "data" / "train"
    hostile = split / "shard-000099.tar"
    _add_shard(split, hostile, _hostile_shard(hostile, marker))
    result = run_cli("vqvae/train.py", "--config", config)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert "refused member extension(s) ['pyd']" in log and "refused member extension(s) ['pickle']" in log
    assert "unsafe sample key refused" in log and "../../escape_1" in log
    assert not marker.exists()
    for folder in (REPO, REPO.parent, run_dir, run_dir.parent, tmp_path.parent, Path("/tmp")):
        assert not [p for p in folder.iterdir() if "escape" in p.name], f"a member name escaped into {folder}"
    assert not list(tmp_path.rglob("*escape*"))
    manifest = json.loads((run_dir / "vqvae" / "manifest.json").read_text())
    assert manifest["steps"] == 12
    rows = [json.loads(x) for x in (run_dir / "vqvae" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("train/bad_samples", 0) for r in rows) >= 1  # counted, not silent
