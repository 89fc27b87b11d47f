"""The one config mechanism: presets, overrides, validation with messages that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.config import PRESETS, ConfigError, build_config, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_valid(preset: str) -> None:
    cfg = build_config(preset)
    assert cfg.preset == preset
    assert cfg.data.image_size % cfg.downsample_factor == 0


def test_seed_preset_is_the_report() -> None:
    cfg = build_config("seed")
    assert cfg.data.image_size == 256
    assert cfg.vqvae.arch == "seed" and cfg.vqvae.channels == [32, 64, 128, 256, 256]
    assert (cfg.vqvae.codebook_size, cfg.vqvae.code_dim, cfg.vqvae.commitment) == (512, 64, 0.25)
    assert (cfg.vqvae_train.lr, cfg.vqvae_train.batch_size) == (1e-3, 16)
    assert (cfg.prior.arch, cfg.prior.filters, cfg.prior.layers, cfg.prior.kernel_size) == ("pixelcnn", 120, 8, 7)


def test_overrides_are_typed_and_nested() -> None:
    cfg = build_config("smoke", ["vqvae_train.batch_size=7", "vqvae.channels=[8,16]", "wandb=disabled",
                                 "prior.conditional=false", "cluster.train_vqvae.partition=gpu"])
    assert cfg.vqvae_train.batch_size == 7
    assert cfg.vqvae.channels == [8, 16]
    assert cfg.prior.conditional is False
    assert cfg.cluster.train_vqvae.partition == "gpu"


@pytest.mark.parametrize(("override", "expected"), [
    ("vqvae_train.batch_size=0", "vqvae_train.batch_size: Input should be greater than 0"),
    ("vqvae.codebook_size=1", "vqvae.codebook_size: Input should be greater than or equal to 2"),
    ("vqvae_train.lr=fast", "vqvae_train.lr: Input should be a valid number"),
    ("data.image_size=70", "not divisible by the VQ-VAE down-sampling factor 4"),
    ("vqvae.quantizer=kmeans", "vqvae.quantizer: Input should be 'loss' or 'ema'"),
    ("vqvae.nope=1", "unknown config key 'vqvae.nope': 'nope' is not in vqvae; allowed: arch, channels"),
    ("nope.x=1", "'nope' is not in the top level; allowed:"),
    ("batch_size", "is not of the form key=value"),
])
def test_bad_values_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config("smoke", [override])
    assert expected in str(err.value)


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'tiny'; allowed: smoke, seed, improved"):
        build_config("tiny")


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = build_config("seed", ["run_dir=/x/y", "prior_train.max_steps=5"])
    save_config(cfg, tmp_path / "config.json")
    again = load_config(tmp_path / "config.json")
    assert again == cfg
    assert again.digest() == cfg.digest()
    assert load_config(tmp_path / "config.json", ["prior_train.max_steps=6"]).digest("prior_train") != cfg.digest(
        "prior_train")


def test_cli_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "vqvae/train.py", "--preset", "smoke", "vqvae_train.batch_size=0"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "vqvae_train.batch_size: Input should be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr
