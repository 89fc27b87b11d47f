"""Job scripts carry the request (issue 28, principle 5): ``python launch/pipeline.py --emit-sbatch STAGE --config C
KEY=VALUE`` writes a script whose stage runs with the same overrides its #SBATCH lines were made from, and
``slurm/stage.sh STAGE --config C KEY=VALUE`` applies them in the job (was: #SBATCH lines with the overrides, the
stage itself with the config's values)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
from helpers import REPO, TINY, need_slurm, run_quiet, stage_env, tiny_config

from launch.pipeline import main, parser
from runtime.config import RunConfig, add_config_args, config_from_args


def _emit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, RunConfig]:
    args = parser().parse_args([*argv])
    assert main(args) == 0
    return capsys.readouterr().out, config_from_args(args)


def _job_config(script: str) -> tuple[str, RunConfig]:
    """The stage and the config the job's exec line gives it (parsed as its stage process parses it)."""
    exec_line = script.strip().splitlines()[-1]
    words = shlex.split(exec_line)
    assert words[0] == "exec" and words[1].endswith("/slurm/stage.sh"), exec_line
    job = argparse.ArgumentParser()
    add_config_args(job)
    return words[2], config_from_args(job.parse_args(words[3:]))


def test_emitted_script_runs_the_stage_with_the_same_overrides(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    tiny_config(tmp_path / "run")
    config = str(tmp_path / "run" / "config.json")
    script, asked = _emit(capsys, "--emit-sbatch", "encode", "--config", config, "encode.num_tasks=8",
                          "vqvae_train.lr=0.5", "cluster.encode.mem_gb=7")
    assert "#SBATCH --array=0-7%8" in script and "#SBATCH --mem=7G" in script
    stage, in_job = _job_config(script)
    assert stage == "encode"
    assert in_job.model_dump() == asked.model_dump()
    assert in_job.encode.num_tasks == 8 and in_job.vqvae_train.lr == 0.5


def test_relative_paths_and_presets_mean_in_the_job_what_they_meant_here(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images" / "MEL").mkdir(parents=True)
    script, asked = _emit(capsys, "--emit-sbatch", "data", "--preset", "smoke", *TINY, "run_dir=runs/x",
                          "data.source=isic", "data.isic_images=images", "sample.per_class=3")
    monkeypatch.chdir(REPO)  # where the job runs (slurm/common.sh cds to the repository)
    _, in_job = _job_config(script)
    assert in_job.run_dir == tmp_path / "runs" / "x" and in_job.data.isic_images == tmp_path / "images"
    assert in_job.model_dump() == asked.model_dump()


def test_override_values_are_quoted_for_the_shell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    odd = tmp_path / "run dir; touch pwned"
    tiny_config(odd)
    script, _ = _emit(capsys, "--emit-sbatch", "report", "--config", str(odd / "config.json"),
                          "sample.per_class=2")
    _, in_job = _job_config(script)
    assert in_job.run_dir == odd and in_job.sample.per_class == 2


@pytest.mark.slow
@pytest.mark.slurm
def test_stage_sh_applies_the_overrides_in_the_job(tmp_path: Path) -> None:
    need_slurm()
    run_dir = tmp_path / "run"
    tiny_config(run_dir)
    out = run_quiet(["slurm/stage.sh", "data", "--config", str(run_dir / "config.json"), "data.num_images=37"],
                    cwd=REPO, env=stage_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    try:
        import time

        deadline = time.monotonic() + 600
        manifest = run_dir / "data" / "manifest.json"
        while not manifest.is_file() and time.monotonic() < deadline:
            state = run_quiet(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"]).stdout.strip()
            assert not state.startswith(("FAILED", "CANCELLED", "TIMEOUT")), (state, (REPO / "logs").glob("*"))
            time.sleep(1)
        splits = json.loads(manifest.read_text())["splits"]
        assert sum(split["num_samples"] for split in splits.values()) == 37  # the override, not the config's 96
    finally:
        run_quiet(["scancel", job])


@pytest.mark.parametrize("flag", [["--processes", "4"], ["--cluster"], ["--until", "vqvae"], ["--only", "encode"],
                                  ["--dry-run"]])
def test_flags_a_job_script_cannot_carry_are_refused(tmp_path: Path, flag: list[str]) -> None:
    from launch.pipeline import PipelineError

    tiny_config(tmp_path / "run")
    with pytest.raises(PipelineError, match="cannot carry"):
        main(parser().parse_args(["--emit-sbatch", "vqvae", "--config", str(tmp_path / "run" / "config.json"),
                                  *flag]))
