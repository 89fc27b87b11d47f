import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds

from runtime.files import atomic_write_json
from shards.images import array_to_jpeg
from shards.loader import make_eval_loader, make_train_loader, steps_per_epoch
from shards.manifest import FORMAT, describe_shard, read_manifest
from shards.synth import render_lesion


def _keys(loader) -> list[list[str]]:
    return [batch["key"] for batch in loader]


def test_steps_per_epoch_folds_tiny_last_batch():
    assert steps_per_epoch(82, 8, 2) == 6  # 82 = 5*16 + 2: last global batch gives each rank one
    assert steps_per_epoch(81, 8, 2) == 5  # 81 = 5*16 + 1: the leftover joins step 4
    assert steps_per_epoch(80, 8, 2) == 5
    with pytest.raises(ValueError, match="cannot feed 4 ranks"):
        steps_per_epoch(3, 8, 4)


def _rank_main(rank: int, out: str, cases: list[dict]) -> None:
    """One DDP rank (a real spawned process): run every case and save its batches' keys."""
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    results = []
    for case in cases:
        loader = make_train_loader(Path(case["dir"]), batch_size=case["batch"], rank=rank, world_size=2,
                                   epoch=1, seed=3, start_step=case.get("start", 0),
                                   num_workers=case["workers"], shuffle_buffer=16)
        keys = []
        for batch in loader:
            keys.append(batch["key"])
            step = torch.ones(1)
            dist.all_reduce(step)  # would hang if ranks ran different step counts
        results.append(keys)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_two_ranks_cover_every_sample_exactly_once_with_equal_steps(synth_shards, pack_synth, tmp_path):
    odd = pack_synth(tmp_path / "odd", num_images=81, val_fraction=0.0, test_fraction=0.0, shard_max_count=10)
    cases = [{"dir": str(synth_shards / "train"), "batch": 8, "workers": 0},
             {"dir": str(synth_shards / "train"), "batch": 8, "workers": 2},
             {"dir": str(odd / "train"), "batch": 8, "workers": 0},
             {"dir": str(odd / "train"), "batch": 8, "workers": 2, "start": 2}]
    mp.spawn(_rank_main, args=(str(tmp_path), cases), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for i, case in enumerate(cases):
        split = Path(case["dir"])
        n = read_manifest(split)["num_samples"]
        b0, b1 = ranks[0][i], ranks[1][i]
        assert len(b0) == len(b1) == steps_per_epoch(n, 8, 2) - case.get("start", 0)
        k0, k1 = [k for b in b0 for k in b], [k for b in b1 for k in b]
        assert not set(k0) & set(k1)
        if "start" not in case:
            assert sorted(k0 + k1) == sorted(_all_keys(split)) and len(k0 + k1) == n
    assert ranks[0][0] == ranks[0][1] and ranks[1][0] == ranks[1][1]  # 0 vs 2 workers
    assert ranks[0][3] == ranks[0][2][2:] and ranks[1][3] == ranks[1][2][2:]  # start_step = tail


def _all_keys(split: Path) -> list[str]:
    return [k for b in make_eval_loader(split, batch_size=16) for k in b["key"]]


def _train(split: Path, **kw) -> list[dict]:
    args = {"batch_size": 8, "rank": 0, "world_size": 1, "epoch": 0, "seed": 1, **kw}
    return list(make_train_loader(split, **args))


def test_same_seed_and_epoch_give_identical_batches_for_any_worker_count(synth_shards):
    split = synth_shards / "train"
    a, b = _train(split), _train(split, num_workers=2)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert [x["key"] for x in _train(split, epoch=1)] != [x["key"] for x in a]
    first = a[0]
    assert first["image"].dtype == torch.float32 and first["image"].shape == (8, 3, 32, 32)
    assert first["image"].min() >= 0.0 and first["image"].max() <= 1.0 and first["label"].dtype == torch.long
    tail = _train(split, start_step=3, num_workers=2)
    assert [x["key"] for x in tail] == [x["key"] for x in a[3:]]


def test_eval_loader_is_ordered_disjoint_and_limited(synth_shards):
    split = synth_shards / "val"
    n = read_manifest(split)["num_samples"]
    r0 = _keys(make_eval_loader(split, batch_size=2, rank=0, world_size=2))
    r1 = _keys(make_eval_loader(split, batch_size=2, rank=1, world_size=2))
    flat0, flat1 = [k for b in r0 for k in b], [k for b in r1 for k in b]
    assert not set(flat0) & set(flat1) and len(flat0 + flat1) == n
    assert len(_keys(make_eval_loader(split, batch_size=2, max_batches=1))) == 1


class _Evil:
    """Unpickling this creates ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _handmade_split(folder: Path, marker: Path) -> Path:
    folder.mkdir()
    good = [{"__key__": f"ok_{i:03d}", "jpg": array_to_jpeg(render_lesion(i, i % 7, 32), 90),
             "cls": str(i % 7).encode()} for i in range(10)]
    bad = [{"__key__": "corrupt_001", "jpg": b"\xff\xd8\xff garbage", "cls": b"1"},
           {"__key__": "evil_001", "jpg": good[0]["jpg"], "cls": b"2", "pyd": pickle.dumps(_Evil(marker))},
           {"__key__": "evil_002", "jpg": good[0]["jpg"], "cls": b"2", "pickle": pickle.dumps(_Evil(marker))}]
    shards = []
    for i, samples in enumerate([good[:5] + bad, good[5:]]):
        path = folder / f"shard-{i:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as writer:
            for s in samples:
                writer.write(s)
        shards.append(describe_shard(path, len(samples)))
    atomic_write_json(folder / "manifest.json", {"format": FORMAT, "shards": shards, "num_samples": 13,
                                                 "image_size": 32})
    return folder


def test_corrupt_images_and_pickle_members_are_dropped_and_counted(tmp_path):
    marker = tmp_path / "UNPICKLED"
    split = _handmade_split(tmp_path / "split", marker)
    loader = make_train_loader(split, batch_size=4, rank=0, world_size=1, epoch=0, seed=0)
    batches = list(loader)
    assert len(batches) == steps_per_epoch(13, 4, 1)
    keys = [k for b in batches for k in b["key"]]
    dropped = [d for b in batches for d in b["dropped"]]
    assert sorted(keys) == [f"ok_{i:03d}" for i in range(10)]
    assert sorted(d.split(":")[0] for d in dropped) == ["corrupt_001", "evil_001", "evil_002"]
    assert any("refused member extension(s) ['pyd']" in d for d in dropped)
    assert loader.dataset.stats["bad_sample"] == 3
    assert not marker.exists()


def test_truncated_shard_is_counted_and_steps_stay_equal(tmp_path, synth_shards):
    import shutil

    split = tmp_path / "train"
    shutil.copytree(synth_shards / "train", split)
    first = split / read_manifest(split)["shards"][0]["name"]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    n = read_manifest(split)["num_samples"]
    loader = make_train_loader(split, batch_size=8, rank=0, world_size=1, epoch=0, seed=0)
    batches = list(loader)
    assert len(batches) == steps_per_epoch(n, 8, 1)
    assert loader.dataset.stats["tar_error"] >= 1
    assert sum(len(b["key"]) for b in batches) < n
