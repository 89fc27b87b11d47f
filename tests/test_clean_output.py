"""What a person reads stays clean: no NumPy 'not writable' warning, class names on the sample grid's rows, the
report path printed once (by the pipeline), and quick benchmark tables say their ratios mean nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FinishedRun, assert_ok, copy_run, run_cli
from PIL import Image

from shards.config import CLASSES


@pytest.mark.slow
def test_sampling_prints_no_numpy_not_writable_warning(finished_run: FinishedRun) -> None:
    logs = finished_run.result.stderr
    assert "all 2 tasks done" in logs and "not writable" not in logs and "UserWarning" not in logs


@pytest.mark.slow
def test_sample_grid_rows_carry_their_class_names(finished_run: FinishedRun) -> None:
    """Old code: the grid had no labels (exactly per_class cells wide)."""
    grid = np.asarray(Image.open(finished_run.run_dir / "samples" / "samples.png").convert("L"))
    cell, pad = 32 + 2, 2  # 32-px samples, make_grid padding
    margin = grid.shape[1] - (pad + cell * 1)  # one column: as wide as the rarest class (sample.min_per_class=1)
    assert grid.shape[0] == pad + cell * len(CLASSES) and margin > 20
    for row in range(len(CLASSES)):  # dark text pixels beside every row
        band = grid[pad + row * cell: pad + row * cell + 32, :margin]
        assert (band < 100).sum() > 10, f"no label beside row {row}"


def test_save_grid_labels_rows_on_a_margin(tmp_path: Path) -> None:
    from runtime.images import save_grid

    plain = save_grid(torch.ones(4, 3, 16, 16), tmp_path / "plain.png", nrow=2)
    labelled = save_grid(torch.ones(4, 3, 16, 16), tmp_path / "labelled.png", nrow=2, row_labels=["MEL", "AKIEC"])
    plain_px, labelled_px = (np.asarray(Image.open(p).convert("L")) for p in (plain, labelled))
    assert labelled_px.shape[0] == plain_px.shape[0] and labelled_px.shape[1] > plain_px.shape[1] + 20
    assert (labelled_px[:, : labelled_px.shape[1] - plain_px.shape[1]] < 100).any()


@pytest.mark.slow
def test_the_report_path_is_not_printed_by_the_report_stage(finished_run: FinishedRun, tmp_path: Path) -> None:
    """The pipeline prints it in its summary; old code printed 'report: ...' a second time."""
    run_dir = copy_run(finished_run.run_dir, tmp_path / "run")
    result = assert_ok(run_cli("-m", "launch.report", "--config", run_dir / "config.json"))
    path = str(run_dir / "report" / "report.html")
    assert "report:" not in result.stdout and (result.stdout + result.stderr).count(path) == 1


def test_quick_benchmark_tables_say_their_ratios_mean_nothing() -> None:
    from bench.common import Row, markdown, with_ratios

    table = with_ratios([Row("a", "base", 4.0, "x/s", "base"), Row("a", "fast", 10.0, "x/s", "base")])
    meta = {"host": "h", "device": "cpu", "cpu_model": "m", "cpu_cores": 2, "torch": "t", "python": "p", "date": "d"}
    assert "ratios below mean nothing" in markdown(table, meta | {"quick": True})
    assert "mean nothing" not in markdown(table, meta | {"quick": False})
