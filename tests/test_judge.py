"""The judge: Fréchet distance against closed forms, and the evaluate stage deterministic and cached
by lineage (a changed prior re-evaluates but never retrains the classifier)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, stage_env, tiny_config

from judge.classifier import frechet_distance


def test_frechet_distance_matches_closed_forms() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shifted = a + torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)
    assert frechet_distance(a, shifted) == pytest.approx(25.0, abs=1e-6)  # |shift|^2, same covariance
    # b = 3a: C_b = 9 C_a, (C_a C_b)^1/2 = 3 C_a, so FD = |2 mu_a|^2 + (1 + 9 - 6) tr(C_a).
    scaled = a * 3
    expected = float((2 * a.mean(0)).pow(2).sum() + 4 * torch.cov(a.T).trace())
    assert frechet_distance(a, scaled) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)


def _pipeline(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "launch/pipeline.py", "--config", str(config), *args], cwd=REPO,
                          env=stage_env(), capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_evaluate_is_deterministic_and_the_classifier_is_cached_by_lineage(tmp_path: Path, tiny_data: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "data").symlink_to(tiny_data, target_is_directory=True)
    tiny_config(run_dir)
    config = run_dir / "config.json"
    first = _pipeline(config)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = json.loads((run_dir / "evaluate" / "manifest.json").read_text())["metrics"]
    for key in ("classifier_val_accuracy", "fd_reconstructions", "fd_samples", "fd_real_train_floor",
                "sample_class_agreement", "recon_psnr"):
        assert isinstance(metrics[key], float) and metrics[key] == metrics[key], key  # present, not NaN
    assert metrics["fd_reconstructions"] >= 0 and metrics["fd_samples"] >= 0
    assert set(metrics["sample_class_agreement_per_class"]) <= {"MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"}

    again = _pipeline(config, "--only", "evaluate")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "evaluate" / "manifest.json").read_text())["metrics"] == metrics

    weights = (run_dir / "classifier" / "final" / "model.safetensors").read_bytes()
    changed = _pipeline(config, "prior.filters=24")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "stage classifier: skip: up to date" in changed.stderr
    assert "stage evaluate: run: upstream sample is re-made first" in changed.stderr
    assert (run_dir / "classifier" / "final" / "model.safetensors").read_bytes() == weights
    assert "Evaluation" in (run_dir / "report" / "report.html").read_text()
