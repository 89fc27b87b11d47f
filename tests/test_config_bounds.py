"""Every count has the upper bound its consumer accepts, and every path can be recorded (issue 28, medium).

``sample.num_tasks=1e18`` parses as an integer; before, it was saved into config.json and then failed as an
OverflowError traceback (or an absurd #SBATCH line). Now the config refuses it in one line naming the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import TINY

from runtime.config import ConfigError, build_config
from runtime.config_reference import sections
from runtime.schema import MAX_ARRAY_TASKS, MAX_COUNT, MAX_TIME_MIN


def test_every_integer_setting_has_an_upper_bound() -> None:
    unbounded = [f"{e.key} ({section.kind or 'any kind'})" for section in sections() for e in section.entries
                 if "int" in e.type and "<" not in e.allowed]
    assert unbounded == []


@pytest.mark.parametrize("override", [
    "sample.num_tasks=1e18", "encode.num_tasks=1e18", "sample.per_class=1e18", "cluster.sample.time_min=1e18",
    "cluster.train_vqvae.time_min=99999999", "encode.num_tasks=5000", "sample.num_tasks=1002",
    "cluster.encode.array_parallelism=1e9", "vqvae_train.max_steps=1e18", "data.num_images=1e12",
    "prior_train.batch_size=1e10", "evaluate.max_images=1e18", "cluster.train_prior.nodes=1e12",
    "data.shard_max_count=9223372036854775808", "sample.min_per_class=1e18", "vqvae.channels=[16,1e18]",
])
def test_huge_counts_refused_naming_the_key(tmp_path: Path, override: str) -> None:
    key = override.split("=")[0].split(".")
    with pytest.raises(ConfigError, match=key[-1]) as err:
        build_config("smoke", [*TINY, f"run_dir={tmp_path / 'run'}", override])
    assert "\n" not in str(err.value)
    assert "less than or equal" in str(err.value) or "exceeds" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_bounds_themselves_are_accepted(tmp_path: Path) -> None:
    cfg = build_config("smoke", [*TINY, f"run_dir={tmp_path / 'run'}", f"sample.num_tasks={MAX_ARRAY_TASKS}",
                                 f"encode.num_tasks={MAX_ARRAY_TASKS}", f"cluster.sample.time_min={MAX_TIME_MIN}",
                                 f"vqvae_train.max_steps={MAX_COUNT}"])
    from launch.cluster import sbatch_script

    script = sbatch_script(cfg, "sample")
    assert f"#SBATCH --array=0-{MAX_ARRAY_TASKS - 1}%" in script
    assert f"#SBATCH --time={MAX_TIME_MIN}\n" in script


@pytest.mark.parametrize("key", ["run_dir", "data.isic_images", "data.isic_csv"])
def test_path_with_undecodable_bytes_refused_before_anything_is_created(tmp_path: Path, key: str) -> None:
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xe9")
    overrides = [*TINY, f"run_dir={tmp_path / 'run'}", "data.source=isic", f"data.isic_images={tmp_path}",
                 f"{key}={bad}"]
    with pytest.raises(ConfigError, match=r"not UTF-8") as err:
        build_config("smoke", overrides)
    assert key.split(".")[-1] in str(err.value) and "\\xe9" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("processes", ["0", "1025", "100000000"])
def test_pipeline_processes_bounded(tmp_path: Path, processes: str) -> None:
    from launch.pipeline import PipelineError, main, parser

    with pytest.raises(PipelineError, match=r"allowed 1\.\.1024"):
        main(parser().parse_args([*TINY, f"run_dir={tmp_path / 'run'}", "--processes", processes, "--dry-run"]))


@pytest.mark.parametrize("argv", [["--num-shards", "5000", "--all-tasks"], ["--num-shards", "1001", "--shard-index",
                                                                               "3"]])
def test_array_task_count_bounded(argv: list[str]) -> None:
    import argparse

    from runtime.array_task import add_task_args, task_slots

    parser = argparse.ArgumentParser()
    add_task_args(parser)
    with pytest.raises(ConfigError, match=f"1..{MAX_ARRAY_TASKS}"):
        task_slots(parser.parse_args(argv))


@pytest.mark.parametrize("command", ["synth", "pack"])
def test_pack_out_with_undecodable_bytes_refused_in_one_line(tmp_path: Path, command: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from shards.__main__ import main

    (tmp_path / "images" / "MEL").mkdir(parents=True)
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/out\xe9")
    extra = ["--images", str(tmp_path / "images")] if command == "pack" else []
    assert main([command, "--out", bad, *extra, "data.num_images=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out:") and "not UTF-8" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["images"]
