"""Code grids: stored in the smallest integer type holding the codebook, and a sample whose class or codes are
out of range is refused by training, encode and the report with one line naming it."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from helpers import (
    FinishedRun,
    assert_ok,
    assert_one_line_error,
    code_manifest,
    lesion_jpeg,
    npy_bytes,
    run_cli,
    temp_files,
    tiny_config,
    write_split,
)

from runtime.files import atomic_write_json
from shards.manifest import describe_shard, read_manifest


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
    good = [{"__key__": f"ok_{i}", "jpg": lesion_jpeg(32, i % 7), "cls": str(i % 7).encode(), "json": b"{}"}
            for i in range(4)]
    bad = [{"__key__": key, "jpg": lesion_jpeg(), "cls": cls, "json": b"{}"} for key, cls in (("bad_99", b"99"),
                                                                                             ("bad_neg", b"-1"))]
    _add_to_split(run_dir / "data" / "train", [*good, *bad])
    config = str(run_dir / "config.json")
    trained = assert_ok(run_cli("vqvae/train.py", "--config", config))
    assert "bad_99" in trained.stderr and "class 99 is outside 0..6" in trained.stderr
    assert "class -1 is outside 0..6" in trained.stderr
    encoded = run_cli("vqvae/encode.py", "--config", config)
    assert_one_line_error(encoded, "shard-000099.tar", "bad_99: refused: class 99 is outside 0..6")
    assert not (run_dir / "codes" / "manifest.json").exists() and not temp_files(run_dir)


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
        grids = [rng.integers(0, k, (grid, grid)).astype(np.int16) for _ in range(n)]
        samples = [{"__key__": f"{split}_{i}", "codes.npy": npy_bytes(codes), "cls": str(i % 7).encode(), "json": b"{}"}
                   for i, codes in enumerate(grids)]
        samples += [{"__key__": f"{split}_{key}", "codes.npy": npy_bytes(codes), "cls": b"1", "json": b"{}"}
                    for key, codes in bad.items()]
        write_split(codes_dir / split, samples, **code_manifest(k, grid))
        splits[split] = {"num_samples": len(samples)}
    atomic_write_json(codes_dir / "manifest.json", {
        **code_manifest(k, grid), "splits": splits, "upstream": {}, "identity": ident, "content": "test",
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
