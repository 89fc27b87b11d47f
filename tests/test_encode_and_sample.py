"""What encode, the prior and sample make: the session's finished run (conftest ``finished_run``), plus a prior
trained by prior/train.py on hand-made code shards and an encode with every training-image view."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from helpers import FinishedRun, assert_ok, copy_run, run_cli, tiny_config, write_class_coded_shards

from runtime.config import CLASSES, load_config


def _code_histograms(split_dir: Path, codebook: int) -> dict[int, np.ndarray]:
    hist = {c: np.zeros(codebook) for c in range(len(CLASSES))}
    for sample in wds.WebDataset(sorted(str(p) for p in split_dir.glob("*.tar")), shardshuffle=False,
                                 empty_check=False):
        codes = np.load(io.BytesIO(sample["codes.npy"]), allow_pickle=False)
        hist[int(sample["cls"])] += np.bincount(codes.ravel(), minlength=codebook)
    return hist


@pytest.mark.slow
def test_encode_writes_one_code_shard_per_image_shard(finished_run: FinishedRun, tmp_path: Path) -> None:
    run_dir = finished_run.run_dir
    codes = json.loads((run_dir / "codes" / "manifest.json").read_text())
    data = json.loads((run_dir / "data" / "train" / "manifest.json").read_text())
    assert codes["codebook_size"] == load_config(finished_run.config).vqvae.codebook_size
    assert codes["grid"] == [8, 8]  # 32 px / 2**2
    vq = json.loads((run_dir / "vqvae" / "manifest.json").read_text())
    assert codes["lineage"]["vqvae"] == f"{vq['identity']}/{vq['content']}"  # made from THESE weights
    split = json.loads((run_dir / "codes" / "train" / "manifest.json").read_text())
    assert [s["name"] for s in split["shards"]] == [s["name"] for s in data["shards"]]
    assert split["num_samples"] == data["num_samples"]
    assert split["class_counts"] == data["class_counts"]
    copy = copy_run(run_dir, tmp_path / "run")
    rerun = assert_ok(run_cli("vqvae/encode.py", "--config", copy / "config.json", "--shard-index", "0",
                              "--num-shards", "2"))
    assert "already encoded for this identity, skipped" in rerun.stderr


@pytest.mark.slow
def test_code_shards_hold_integer_grids_keyed_like_the_images(finished_run: FinishedRun) -> None:
    run_dir = finished_run.run_dir
    image_keys = {s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in (run_dir / "data/val").glob("*.tar")),
                                                       shardshuffle=False, empty_check=False)}
    samples = list(wds.WebDataset(sorted(str(p) for p in (run_dir / "codes/val").glob("*.tar")),
                                  shardshuffle=False, empty_check=False))
    assert {s["__key__"] for s in samples} == image_keys
    grid = np.load(io.BytesIO(samples[0]["codes.npy"]), allow_pickle=False)
    assert grid.shape == (8, 8) and grid.dtype == np.uint8
    assert set(samples[0]) == {"__key__", "__url__", "__local_path__", "codes.npy", "cls", "json"} - (
        {"__local_path__"} - set(samples[0]))


@pytest.mark.slow
def test_prior_learns_well_below_uniform(finished_run: FinishedRun) -> None:
    rows = [json.loads(line) for line in (finished_run.run_dir / "prior" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/bits_per_code" in r]
    uniform = math.log2(load_config(finished_run.config).vqvae.codebook_size)
    assert val[-1]["val/uniform_bits_per_code"] == uniform
    assert val[-1]["val/bits_per_code"] < 0.6 * uniform
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    assert train[-1] < train[0]


def _shard_samples(split_dir: Path) -> list[dict]:
    return list(wds.WebDataset([str(split_dir / s["name"]) for s in json.loads((split_dir / "manifest.json")
                                                                               .read_text())["shards"]],
                               shardshuffle=False, empty_check=False))


@pytest.mark.slow
def test_train_views_encode_every_symmetry_of_each_training_image(finished_run: FinishedRun, tmp_path: Path) -> None:
    """encode.train_views=8: every training image encoded in its 8 exact rotations/mirrorings, view by view
    (view 0 byte-identical to a plain encode), validation left at one grid per image; the prior trains on them."""
    import torch

    from runtime.checkpoint import load_weights
    from shards.loader import make_eval_loader
    from vqvae.encode import VIEWS
    from vqvae.models import build_vqvae

    run_dir = tmp_path / "views"
    run_dir.mkdir()
    for stage in ("data", "vqvae"):  # the chain's data and VQ-VAE: only the encode settings differ
        (run_dir / stage).symlink_to((finished_run.run_dir / stage).resolve(), target_is_directory=True)
    cfg = tiny_config(run_dir, "prior_train.max_steps=4", "prior_train.eval_every=4", "prior_train.checkpoint_every=4",
                      "encode.train_views=8")
    assert_ok(run_cli("vqvae/encode.py", "--config", run_dir / "config.json"))
    plain, views = finished_run.run_dir / "codes", run_dir / "codes"
    for split, factor in (("train", 8), ("val", 1), ("test", 1)):
        before, after = (json.loads((d / split / "manifest.json").read_text()) for d in (plain, views))
        assert after["num_samples"] == factor * before["num_samples"], split
        assert after["class_counts"] == {c: factor * n for c, n in before["class_counts"].items()}, split
    val = [[s["codes.npy"] for s in _shard_samples(d / "val")] for d in (plain, views)]
    assert val[0] == val[1]

    names = [name for name, _ in VIEWS]
    stored = _shard_samples(views / "train")
    originals = _shard_samples(plain / "train")
    first = json.loads((plain / "train" / "manifest.json").read_text())["shards"][0]["count"]
    # Shard 0 holds its images as packed (the plain encode's bytes), then all mirrored, ... one view at a time.
    assert [s["__key__"] for s in stored[:8 * first]] == [
        f"{s['__key__']}@{name}" if name else s["__key__"] for name in names for s in originals[:first]]
    assert [s["codes.npy"] for s in stored[:first]] == [s["codes.npy"] for s in originals[:first]]
    assert all(json.loads(s["json"])["view"] == s["__key__"].split("@")[1] for s in stored if "@" in s["__key__"])

    model = build_vqvae(cfg.vqvae).eval()
    vqvae = finished_run.run_dir / "vqvae"
    load_weights(model, vqvae / json.loads((vqvae / "manifest.json").read_text())["weights"])
    batch = next(iter(make_eval_loader(finished_run.run_dir / "data" / "train", batch_size=first)))
    by_key = {s["__key__"]: np.load(io.BytesIO(s["codes.npy"]), allow_pickle=False) for s in stored}
    with torch.no_grad():
        for name, view in VIEWS:
            expected = model.encode(view(batch["image"])).numpy()
            got = np.stack([by_key[f"{k}@{name}" if name else k] for k in batch["key"]])
            assert (got == expected).mean() > 0.99, name  # (batch composition may move a float tie)
    rotated = np.stack([by_key[f"{k}@rot90"] for k in batch["key"]])
    assert (rotated != np.stack([by_key[k] for k in batch["key"]])).mean() > 0.3  # another image, other codes

    assert_ok(run_cli("prior/train.py", "--config", run_dir / "config.json"))
    assert json.loads((run_dir / "prior" / "manifest.json").read_text())["lineage"]["encode"].startswith(
        json.loads((views / "manifest.json").read_text())["identity"])


@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.slow
def test_class_conditional_samples_differ_by_class(tmp_path: Path, conditional: bool) -> None:
    """Trained with prior/train.py on class-dependent codes, a conditional prior's samples of class c
    are dominated by code c; an unconditional prior's samples cannot tell the classes apart."""
    import torch

    from prior.models import build_prior
    from runtime.checkpoint import load_weights

    codes_dir = tmp_path / "codes"
    cfg = tiny_config(tmp_path / "run", f"prior.conditional={str(conditional).lower()}", "prior.filters=32",
                      "prior_train.max_steps=120", "prior_train.lr=3e-3", "prior_train.eval_every=120",
                      "prior_train.checkpoint_every=120")
    write_class_coded_shards(codes_dir, codebook=16, grid=6, per_class=24, cfg=cfg)
    assert_ok(run_cli("prior/train.py", "--config", tmp_path / "run" / "config.json", "--codes", codes_dir))
    model = build_prior(cfg.prior, 16, len(CLASSES))
    load_weights(model, tmp_path / "run" / "prior" / "final" / "model.safetensors")
    labels = torch.arange(len(CLASSES)).repeat_interleave(8)
    samples = model.sample(len(labels), (6, 6), labels, temperature=1.0,
                           generator=torch.Generator().manual_seed(0))
    # Each sample's most frequent code names the class it looks like.
    dominant = torch.stack([torch.bincount(grid.flatten(), minlength=16).argmax() for grid in samples])
    accuracy = (dominant == labels).float().mean().item()
    if conditional:
        assert accuracy >= 0.9, accuracy
    else:  # the label cannot steer it: about chance (1/7)
        assert accuracy <= 0.4, accuracy
