"""Fault injection, configuration: unknown keys, wrong types, impossible values, hand-edited config files,
and values that are only impossible given the data (more processes than samples, an empty val split).

Each must fail before any work starts, naming the key and what is allowed, and every CLI must exit 2
without a traceback. The single-key cases of tests/test_config.py (batch 0, codebook 1, lr=fast, image
size 70, unknown key) are not repeated one by one; here they go through the real command lines, several
at once, and against files on disk.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, stage_env, tiny_config

from bench.common import free_port
from runtime.config import ConfigError, build_config
from runtime.launcher import accelerate_command


def _cli(*argv: str, env: dict[str, str] | None = None, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=REPO, env=env or stage_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def _assert_clean_usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in: {result.stderr[-2000:]}"


@pytest.mark.parametrize(("overrides", "expected"), [
    (["vqvae_train.max_steps=1.5"], ["vqvae_train.max_steps: Input should be a valid integer"]),
    (["vqvae.channels=abc"], ["vqvae.channels: Input should be a valid list"]),
    (["prior.conditional=maybe"], ["prior.conditional: Input should be a valid boolean"]),
    (["data.workers=-1"], ["data.workers: Input should be greater than or equal to 0"]),
    (["data.val_fraction=0.6"], ["data.val_fraction: Input should be less than 0.5"]),
    (["sample.temperature=0"], ["sample.temperature: Input should be greater than 0"]),
    (["cluster.signal=KILL"], ["cluster.signal: Input should be 'USR1', 'USR2', 'TERM' or 'INT'"]),
    (["data.image_size=8"], ["data.image_size: Input should be greater than or equal to 16"]),
    (["vqvae.arch=seed", "vqvae.channels=[16,24]", "vqvae.code_dim=16"], ["vqvae.code_dim=16 must"]),
    (["data.source=isic"], ["data.source=isic needs data.isic_images"]),
    (["prior_train.lr=-1", "encode.num_tasks=0", "vqvae.kernel=3"],
     ["'kernel' is not in vqvae (arch improved); allowed: arch,"]),
    (["prior_train.lr=-1", "encode.num_tasks=0"], ["prior_train.lr: Input should be greater than 0",
                                                   "encode.num_tasks: Input should be greater than 0"]),
])
def test_more_bad_values_name_the_key_and_what_is_allowed(overrides, expected):
    with pytest.raises(ConfigError) as err:
        build_config("smoke", overrides)
    for text in expected:
        assert text in str(err.value)


@pytest.mark.slow
def test_pipeline_cli_reports_every_bad_value_at_once_and_starts_nothing(tmp_path):
    run_dir = tmp_path / "run"
    result = _cli(sys.executable, "launch/pipeline.py", f"run_dir={run_dir}", "vqvae_train.batch_size=0",
                  "vqvae.quantizer.codebook_size=1", "prior.filters=many")
    _assert_clean_usage_error(result, "vqvae_train.batch_size: Input should be greater than 0",
                              "vqvae.quantizer.codebook_size: Input should be greater than or equal to 2",
                              "prior.filters: Input should be a valid integer")
    assert not run_dir.exists()


@pytest.mark.parametrize(("argv", "needles"), [
    (["vqvae.quantizer.codebok_size=8"], ["unknown config key 'vqvae.quantizer.codebok_size'",
                                          "allowed: codebook_size, commitment, "]),
    (["data.image_size=34"], ["data.image_size=34 is not divisible by the VQ-VAE down-sampling factor 4",
                              "allowed: multiples of 4"]),
    (["--processes", "0"], ["--processes 0: allowed 1..1024"]),
])
@pytest.mark.slow
def test_pipeline_cli_refuses_before_touching_the_run_dir(tmp_path, argv, needles):
    run_dir = tmp_path / "run"
    _assert_clean_usage_error(_cli(sys.executable, "launch/pipeline.py", f"run_dir={run_dir}", *argv), *needles)
    assert not run_dir.exists()


@pytest.mark.parametrize(("script", "edit", "needles"), [
    ("vqvae/train.py", lambda c: c["vqvae_train"].update(bacth_size=8),
     ["vqvae_train.bacth_size: Extra inputs are not permitted"]),
    ("prior/train.py", lambda c: c["prior"].update(layers="six"), ["prior.layers: Input should be a valid integer"]),
    ("prior/sample.py", None, ["is not valid JSON"]),
])
@pytest.mark.slow
def test_hand_edited_config_file_is_refused_by_every_stage(tmp_path, script, edit, needles):
    run_dir = tmp_path / "run"
    tiny_config(run_dir)
    config = run_dir / "config.json"
    if edit is None:
        config.write_text(config.read_text()[:-40])  # cut short, as by a full disk or a bad editor save
    else:
        tree = json.loads(config.read_text())
        edit(tree)
        config.write_text(json.dumps(tree))
    _assert_clean_usage_error(_cli(sys.executable, script, "--config", str(config)), str(config) if edit is None
                              else needles[0], *needles)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]


@pytest.fixture(scope="module")
def one_image_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data stage with ONE training image and empty val / test splits."""
    from shards.pack import pack_synthetic

    cfg = tiny_config(tmp_path_factory.mktemp("one-image-config"), "data.num_images=1")
    out = tmp_path_factory.mktemp("one-image")
    top = pack_synthetic(cfg.data, out)
    assert top["splits"]["train"]["num_samples"] == 1 and top["splits"]["val"]["num_samples"] == 0
    return out


@pytest.mark.slow
def test_more_training_processes_than_samples_fails_before_training(tmp_path, tiny_data, one_image_data):
    run_dir = tmp_path / "run"
    tiny_config(run_dir)
    shutil.copytree(tiny_data, run_dir / "data")
    shutil.rmtree(run_dir / "data" / "train")
    shutil.copytree(one_image_data / "train", run_dir / "data" / "train")  # 1 train sample, tiny val split
    argv, env = accelerate_command("vqvae/train.py", ["--config", str(run_dir / "config.json")], processes=2,
                                   main_port=free_port())
    result = _cli(*argv, env=stage_env(**env), timeout=240)
    _assert_clean_usage_error(result, "2 processes but only 1 training samples", "allowed: 1..1 processes")
    assert not (run_dir / "vqvae").exists()


@pytest.mark.slow
def test_empty_validation_split_fails_before_training_not_at_the_first_evaluation(tmp_path, one_image_data):
    run_dir = tmp_path / "run"
    tiny_config(run_dir, "data.num_images=1")
    (run_dir / "data").symlink_to(one_image_data, target_is_directory=True)
    result = _cli(sys.executable, "vqvae/train.py", "--config", str(run_dir / "config.json"))
    _assert_clean_usage_error(result, "val holds no samples, so validation cannot run", "data.val_fraction > 0")
    assert not (run_dir / "vqvae").exists()
