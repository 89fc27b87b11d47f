"""Smoke test of ``python -m bench all --quick``: every benchmark runs on tiny inputs and the table and
JSON are written with the expected rows and positive numbers. Never asserts on speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, stage_env

from bench.common import Row, markdown, with_ratios

EXPECTED = {
    "data": {"decode+transform limit, 1 process", "shard loader, 1 worker", "shard loader, 2 workers",
             "ImageFolder 600x450 JPEGs, 2 workers", "shard loader, 2 workers (vs folder)",
             "PIL decode, original 600x450", "PIL decode, stored 64 px"},
    "scaling": {*(f"world {w}: samples/s per reader" for w in (1, 4, 16, 64)),
                *(f"world {w}: bytes read per reader / (data set / readers)" for w in (1, 4, 16, 64))},
    "train": {"report loop (Dataset over 600x450 JPEGs)", "ours (runtime.trainer, seed preset, shards)",
              "step only, inputs resident on the device (ceiling)", "ours vs the ceiling"},
    "ddp": {"1 process, 1 thread", "2 processes x 1 thread"},
    "encode": {"tiny, batch 1", "tiny, batch 4", "tiny, batch 16", "tiny, batch 64"},
    "sample": {"tiny, batch 1", "tiny, batch 4", "tiny, batch 32"},
    "memory": {"python + torch + bench imports", "data: shard loader, 1 worker, 64 px",
               "train: ours (runtime.trainer)", "train: report loop", "encode: tiny, batch 64",
               "sample: tiny, batch 32"},
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    # One intra-op thread, like the other stage subprocesses of the test suite (2 cores, shared).
    done = subprocess.run([sys.executable, "-m", "bench", "all", "--quick", "--out", str(out)], cwd=REPO,
                          env=stage_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    jsons = list(out.glob("*.json"))
    assert len(jsons) == 1, f"expected one JSON in {out}: {sorted(p.name for p in out.iterdir())}"
    return out, json.loads(jsons[0].read_text())


@pytest.mark.slow
def test_quick_run_writes_every_expected_row(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, result = quick_run
    names: dict[str, set[str]] = {}
    for row in result["rows"]:
        names.setdefault(row["bench"], set()).add(row["name"])
    assert set(names) == set(EXPECTED)
    for bench, expected in EXPECTED.items():
        assert expected <= names[bench], f"{bench}: missing {expected - names[bench]}"
    table = next(out.glob("*.md")).read_text()
    for row in result["rows"]:
        assert f"| {row['bench']} | {row['name']} |" in table


@pytest.mark.slow
def test_quick_run_numbers_are_positive_with_ratios(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, result = quick_run
    assert result["meta"]["quick"] is True
    assert result["meta"]["device"] and result["meta"]["torch"] and result["meta"]["cpu_cores"] >= 1
    for row in result["rows"]:
        assert math.isfinite(row["value"]) and row["value"] > 0, row
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        if row["name"] == row["baseline"]:
            assert row["ratio"] == pytest.approx(1.0)
        if row["bench"] == "scaling" and row["unit"] == "x share":  # a fact, not a speed: each reader its share
            assert row["value"] <= 1.1, row


def test_ratios_divide_by_the_named_baseline_of_the_same_bench() -> None:
    rows = [Row("a", "base", 4.0, "x/s", "base"), Row("a", "fast", 10.0, "x/s", "base"),
            Row("b", "base", 1.0, "x/s", "base")]
    table = with_ratios(rows)
    assert [r["ratio"] for r in table] == [1.0, 2.5, 1.0]
    meta = {"host": "h", "device": "cpu", "cpu_model": "m", "cpu_cores": 2, "torch": "t", "python": "p",
            "date": "d", "quick": True}
    assert "| a | fast | 10 | x/s | base | 2.50 |  |" in markdown(table, meta)


def test_quality_verdicts_follow_the_issue_targets() -> None:
    """``bench quality`` takes ~80 min of real training, so only its verdict logic runs here."""
    from bench.quality import _verdicts

    base = {"recon_psnr": 25.0, "fd_reconstructions": 0.2, "fd_samples": 1.0, "sample_class_agreement": 0.14,
            "classifier_val_balanced_accuracy": 0.5, "fd_samples_floor": 0.4,
            "classifier_recon_balanced_accuracy": 0.45}
    results = {"seed": base, "ham128-gated": base, "ham128-unguided": base,
               "ham128": base | {"recon_psnr": 27.1, "fd_samples": 0.5, "sample_class_agreement": 0.43}}
    assert [line.endswith("MET") or "MET;" in line for line in _verdicts(results)] == [True, True, True]
    # +1 dB only: met through the Fréchet distance alone when it halves (PSNR no worse), missed otherwise.
    worse = results | {"ham128": results["ham128"] | {"recon_psnr": 26.0, "fd_samples": 0.51,
                                                      "sample_class_agreement": 0.42}}
    assert ["MISSED" in line for line in _verdicts(worse)] == [True, True, True]
    halved = worse | {"ham128": worse["ham128"] | {"fd_reconstructions": 0.1}}
    assert "MET" in _verdicts(halved)[0] and "MISSED" not in _verdicts(halved)[0]
    assert _verdicts(worse)[0].startswith("reconstruction: +1.00 dB PSNR")
    lower = worse | {"ham128": worse["ham128"] | {"recon_psnr": 24.5}}
    assert _verdicts(lower)[0].startswith("reconstruction: -0.50 dB PSNR")  # one sign, not "+-0.50"


def test_quality_rows_compare_sample_fd_with_the_gated_run_and_the_rest_with_seed() -> None:
    """Validation and held-out rows take their baselines from one table (``_METRICS``)."""
    from bench.quality import _rows

    values = {"recon_psnr": 1.0, "fd_samples": 2.0}
    runs = {"seed": values, "ham128": values, "ham128-gated": values}
    for prefix in ("", "held out: "):
        base = {r.name: r.baseline for r in _rows(runs, prefix, ("recon_psnr", "fd_samples"))}
        assert base[f"{prefix}ham128: fd_samples"] == f"{prefix}ham128-gated: fd_samples"
        assert base[f"{prefix}ham128: recon_psnr"] == f"{prefix}seed: recon_psnr"
        assert base[f"{prefix}seed: fd_samples"] == f"{prefix}seed: fd_samples"
    without_gated = {r.name: r.baseline for r in _rows({"seed": values, "ham128": values}, "", ("fd_samples",))}
    assert without_gated["ham128: fd_samples"] == "seed: fd_samples"


def test_quality_variants_are_valid_runs_at_equal_time() -> None:
    """``--variants``: each variant run is a valid ham128 config, and its VQ-VAE steps fill the same time."""
    from argparse import Namespace

    from bench.quality import _run_configs, _step_seconds, _training_step, _vqvae_overrides
    from runtime.config import build_config

    args = Namespace(images=Path("/data/images"), csv=Path("/data/meta.csv"), prior_steps=100, classifier_steps=100,
                     per_class=2, variants=["plain", "adversarial"])
    runs = _run_configs(args)
    assert {"ham128-plain", "ham128-adversarial"} <= set(runs)
    plain = build_config(*runs["ham128-plain"])
    assert plain.vqvae.quantizer.kind == "ema" and plain.vqvae.quantizer.lookup_dim == 0
    assert plain.vqvae.codebook_size == 512 and plain.prior.arch == "transformer"
    assert build_config(*runs["ham128"]).vqvae.quantizer.lookup_dim == 8
    preset, over = runs["ham128-adversarial"]
    adversarial = build_config(preset, [*over, *_vqvae_overrides(build_config(preset, over), 90.0, 1.0, 2.0)])
    # 90 s at 1 s per plain step and 2 s per step with the critic, which starts half-way: 60 steps, 30 each.
    assert adversarial.vqvae_train.max_steps == 60 and adversarial.vqvae_train.adversarial.start_step == 30
    assert adversarial.vqvae_train.adversarial.ramp_steps == 15
    assert adversarial.sample.class_mix == "data" and adversarial.sample.min_per_class == 2  # at most per_class
    assert adversarial.vqvae_train.adversarial.enabled
    # The timing runs the training stage's own adversarial hooks (one small step each way).
    small = build_config(preset, [*over, "vqvae_train.batch_size=2", "data.image_size=64",
                                  "vqvae_train.adversarial.disc_layers=2"])
    seconds = _step_seconds({"plain": _training_step(small, critic=False),
                             "critic": _training_step(small, critic=True)}, rounds=1)
    assert set(seconds) == {"plain", "critic"} and all(value > 0 for value in seconds.values())


def test_quality_measure_only_names_the_missing_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--measure-only`` trains nothing, so under a root without the runs it says which are missing (exit 2)."""
    from bench.quality import main

    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "config.json").write_text("{}")
    (tmp_path / "images").mkdir()
    (tmp_path / "meta.csv").write_text("lesion_id,image_id,dx\n")
    with pytest.raises(SystemExit) as stopped:
        main(["--measure-only", "--root", str(tmp_path), "--images", str(tmp_path / "images"),
              "--csv", str(tmp_path / "meta.csv")])
    assert stopped.value.code == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "ham128, ham128-gated, ham128-unguided" in line and "seed," not in line
