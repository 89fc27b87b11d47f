import json
import pickle
import subprocess
import sys
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
                                   epoch=1, seed=3, position=case.get("start", 0) * 2 * case["batch"],
                                   num_workers=case["workers"], shuffle_buffer=16)
        keys = []
        for batch in loader:
            keys.append(batch["key"])
            step = torch.ones(1)
            dist.all_reduce(step)  # would hang if ranks ran different step counts
        results.append(keys)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.slow
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


@pytest.mark.slow
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
    tail = _train(split, position=3 * 8, num_workers=2)
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


def _phase_main(rank: int, world: int, out: str, split: str, position: int, tag: str) -> None:
    """One rank of a real ``world``-process group reading one epoch of ``split`` from ``position``."""
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous-{tag}", rank=rank, world_size=world)
    loader = make_train_loader(Path(split), batch_size=4, rank=rank, world_size=world, epoch=2, seed=5,
                               position=position, num_workers=1, shuffle_buffer=16)
    batches = []
    for batch in loader:
        batches.append({"keys": batch["key"], "position": batch["position"], "epoch": batch["epoch"]})
        dist.all_reduce(torch.ones(1))  # would hang if ranks ran different step counts
        if position == 0 and len(batches) == 3:
            break  # "killed" after 3 steps: the checkpoint records the position of the last one
    Path(out, f"{tag}-rank{rank}.json").write_text(json.dumps(batches))
    dist.destroy_process_group()


@pytest.mark.slow
def test_resuming_with_another_world_size_continues_the_epoch_exactly_once(pack_synth, tmp_path):
    """2 real processes read 3 steps, then 3 real processes resume at the recorded position: every sample of the
    epoch is read exactly once, and each group's ranks run equal step counts."""
    data = pack_synth(tmp_path / "data", num_images=61, val_fraction=0.0, test_fraction=0.0, shard_max_count=9)
    split = data / "train"
    mp.spawn(_phase_main, args=(2, str(tmp_path), str(split), 0, "first"), nprocs=2, join=True)
    first = [json.loads((tmp_path / f"first-rank{r}.json").read_text()) for r in range(2)]
    position = first[0][-1]["position"]
    assert position == first[1][-1]["position"] == 3 * 2 * 4
    mp.spawn(_phase_main, args=(3, str(tmp_path), str(split), position, "second"), nprocs=3, join=True)
    second = [json.loads((tmp_path / f"second-rank{r}.json").read_text()) for r in range(3)]
    assert len({len(rank) for rank in second}) == 1 and len(second[0]) == steps_per_epoch(61 - position, 4, 3)
    assert second[0][-1]["position"] == 61 and {b["epoch"] for rank in second for b in rank} == {2}
    keys = [k for rank in first + second for b in rank for k in b["keys"]]
    assert len(keys) == 61 and sorted(keys) == sorted(_all_keys(split))


def test_a_reader_reads_only_its_own_samples_bytes(synth_shards):
    """Each rank's bytes read are exactly its own samples' byte ranges: a quarter of the split for 4 ranks."""
    split = synth_shards / "train"
    manifest = read_manifest(split)
    sizes = {(shard["name"], i): shard["offsets"][i + 1] - shard["offsets"][i]
             for shard in manifest["shards"] for i in range(shard["count"])}
    total = sum(sizes.values())
    read = []
    for rank in range(4):
        loader = make_train_loader(split, batch_size=4, rank=rank, world_size=4, epoch=0, seed=0)
        samples = sum(len(b["key"]) for b in loader)
        read.append(loader.dataset.bytes_read)
        assert samples in (manifest["num_samples"] // 4, manifest["num_samples"] // 4 + 1)
    assert sum(read) == total  # every byte of every sample read once, by one rank
    assert max(read) <= 1.1 * total / 4 + max(sizes.values())


@pytest.mark.slow
def test_images_decoded_on_the_device_equal_the_worker_path(synth_shards):
    """The GPU path (workers hand over JPEG bytes and augmentation draws; the training process decodes the batch
    and augments it) gives the worker path's pixels; exercised here on the CPU device."""
    from runtime.train_config import OptimConfig
    from shards.loader import ShardTrainData

    def data(decode_on: str) -> ShardTrainData:
        optim = OptimConfig(batch_size=8, seed=4, decode_on=decode_on)
        return ShardTrainData(synth_shards / "train", synth_shards / "val", optim)

    on_workers, on_device = data("workers"), data("device")
    a = next(iter(on_workers.loader(epoch=1, position=0, rank=0, world_size=1)))
    b = next(iter(on_device.loader(epoch=1, position=0, rank=0, world_size=1)))
    assert "image" not in b and len(b["encoded"]) == 8 and b["augment"].shape == (8, 3)
    assert b["augment"][:, 0].abs().max() > 0  # augmented: rotations were drawn
    a, b = on_workers.to_device(a, torch.device("cpu")), on_device.to_device(b, torch.device("cpu"))
    assert a["key"] == b["key"] and torch.equal(a["label"], b["label"])
    assert b["image"].shape == a["image"].shape == (8, 3, 32, 32) and torch.equal(a["image"], b["image"])


_WANDB_THEN_FORK = """
import json, sys
from pathlib import Path
from runtime.tracking import RunLogger
from shards.loader import make_train_loader

assert "torchvision" not in sys.modules  # what a fresh training stage looks like when its tracker starts
tracker = RunLogger(Path(sys.argv[2]), "vqvae", {}, enabled=True, wandb_mode="offline", resume_step=0)
assert tracker._wandb is not None, "wandb offline did not start"
keys = {}
for workers in (2, 0):  # forked workers first, before the parent has imported anything itself
    loader = make_train_loader(Path(sys.argv[1]), batch_size=8, rank=0, world_size=1, epoch=0, seed=1,
                               num_workers=workers, augment=True)
    keys[workers] = [k for batch in loader for k in batch["key"]]
tracker.close()
print(json.dumps(keys))
"""


@pytest.mark.slow
def test_forked_workers_decode_every_sample_while_wandb_runs(synth_shards, tmp_path):
    """Augmenting workers forked after wandb.init (offline, the default) lose no sample: wandb watches the
    torchvision import, and a worker importing it itself raised wandb's ForkedError, dropping its first sample."""
    from helpers import REPO, stage_env

    done = subprocess.run([sys.executable, "-c", _WANDB_THEN_FORK, str(synth_shards / "train"), str(tmp_path)],
                          cwd=REPO, env=stage_env(WANDB_MODE="offline", WANDB_SILENT="true"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    keys = json.loads(done.stdout.strip().splitlines()[-1])
    assert keys["2"] == keys["0"] and len(keys["0"]) == read_manifest(synth_shards / "train")["num_samples"]
    assert "dropped" not in done.stderr, done.stderr[-2000:]
