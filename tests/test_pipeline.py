"""`python launch/pipeline.py` locally: the whole chain, idempotent reruns, the dry-run plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, FinishedRun, assert_ok, copy_run, run_pipeline, stage_env, tiny_config

STAGE_MANIFESTS = ["data/manifest.json", "vqvae/manifest.json", "codes/manifest.json", "prior/manifest.json",
                   "samples/manifest.json"]


@pytest.mark.slow
def test_runs_every_stage_and_says_where_outputs_are(finished_run: FinishedRun) -> None:
    run_dir, result = finished_run.run_dir, finished_run.result
    for manifest in STAGE_MANIFESTS:
        assert (run_dir / manifest).is_file(), manifest
    report = run_dir / "report" / "report.html"
    assert report.is_file()
    assert f"report:          {report}" in result.stdout
    assert "samples.png" in result.stdout
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert metrics["vqvae"]["val/psnr"] > 0 and metrics["prior"]["val/bits_per_code"] > 0
    assert set(metrics["timings_s"]) >= {"data", "vqvae", "encode", "prior", "sample"}
    page = report.read_text()
    # Self-contained: curves of both stages, reconstructions, codebook histogram and samples embedded.
    assert page.count('src="data:image/png;base64,') == 5
    for section in ("Data", "VQ-VAE", "Prior", "Samples", "Evaluation", "Timings", "Versions", "Configuration"):
        assert f"<h2>{section}</h2>" in page
    assert "not available yet" not in page


@pytest.mark.slow
def test_rerun_skips_complete_stages(finished_run: FinishedRun, tmp_path: Path) -> None:
    run_dir = copy_run(finished_run.run_dir, tmp_path / "run")
    before = {m: (run_dir / m).stat().st_mtime_ns for m in STAGE_MANIFESTS}
    again = assert_ok(run_pipeline(run_dir / "config.json"))
    for stage in ("data", "vqvae", "encode", "prior", "sample"):
        assert f"stage {stage}: skip: up to date" in again.stderr
    assert {m: (run_dir / m).stat().st_mtime_ns for m in STAGE_MANIFESTS} == before


@pytest.mark.slow
def test_only_forces_one_stage(finished_run: FinishedRun, tmp_path: Path) -> None:
    run_dir = copy_run(finished_run.run_dir, tmp_path / "run")
    weights = (run_dir / "vqvae" / "manifest.json").read_text()
    result = assert_ok(run_pipeline(run_dir / "config.json", "--only", "sample"))
    assert "stage sample: run: forced (--from/--only); current outputs kept in" in result.stderr
    assert "stage vqvae" not in result.stderr
    assert (run_dir / "vqvae" / "manifest.json").read_text() == weights
    assert (run_dir / "samples" / "manifest.json").is_file()
    kept = list((run_dir / ".history").glob("samples@*"))
    assert kept and (kept[0] / "manifest.json").is_file(), "the forced stage's old outputs must be kept"


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path: Path) -> None:
    tiny_config(tmp_path / "run")
    result = assert_ok(run_pipeline(tmp_path / "run" / "config.json", "--dry-run", "--processes", "2"))
    for stage in ("data", "vqvae", "encode", "prior", "sample", "report"):
        assert f"[{stage}] run" in result.stdout
    assert "--num_processes 2" in result.stdout and "ACCELERATE_USE_CPU=1" in result.stdout
    assert "depends on: vqvae, data" in result.stdout
    assert not (tmp_path / "run" / "data").exists()
    # Planning must stay instant: no torch (seconds of imports) on the way to the plan.
    traced = subprocess.run([sys.executable, "-X", "importtime", "launch/pipeline.py", "--config",
                             str(tmp_path / "run" / "config.json"), "--dry-run"], cwd=REPO, env=stage_env(),
                            capture_output=True, text=True, timeout=120, check=True)
    assert "torch" not in {line.split("|")[-1].strip() for line in traced.stderr.splitlines()}, "imported torch"
