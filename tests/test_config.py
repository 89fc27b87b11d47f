"""The one config mechanism: presets, overrides, validation with messages that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.config import PRESETS, ConfigError, build_config, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


PRESET_PATHS = {"ham128": ["data.isic_images=/data/images", "data.isic_csv=/data/meta.csv"]}
"""What a preset needs from the user (real-data presets: where the images are)."""


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_valid(preset: str) -> None:
    cfg = build_config(preset, PRESET_PATHS.get(preset, []))
    assert cfg.preset == preset
    assert cfg.data.image_size % cfg.downsample_factor == 0


def test_seed_preset_is_the_report() -> None:
    cfg = build_config("seed")
    assert cfg.data.image_size == 256
    assert cfg.vqvae.arch == "seed" and cfg.vqvae.channels == [32, 64, 128, 256, 256]
    assert cfg.vqvae.quantizer.kind == "loss" and cfg.vqvae.code_dim == 64
    assert (cfg.vqvae.quantizer.codebook_size, cfg.vqvae.quantizer.commitment) == (512, 0.25)
    assert (cfg.vqvae_train.lr, cfg.vqvae_train.batch_size) == (1e-3, 16)
    assert (cfg.prior.arch, cfg.prior.filters, cfg.prior.layers, cfg.prior.kernel_size) == ("pixelcnn", 120, 8, 7)


@pytest.mark.slow
def test_ham128_preset_is_real_data_at_128_px(tmp_path: Path) -> None:
    cfg = build_config("ham128", PRESET_PATHS["ham128"])
    assert (cfg.data.source, cfg.data.image_size, str(cfg.data.isic_images)) == ("isic", 128, "/data/images")
    assert cfg.data.image_size // cfg.downsample_factor == 16  # the 16x16 code grid of the 256-px presets
    assert cfg.prior.arch == "transformer" and cfg.prior.conditional
    assert cfg.encode.train_views == 8  # the prior sees every exact rotation/mirroring of each training lesion
    with pytest.raises(ConfigError, match=r"data\.source=isic needs data\.isic_images"):
        build_config("ham128")
    for given, named in ((["data.isic_images=/nope"], "data.isic_images=/nope is not an existing folder"),
                         ([f"data.isic_images={tmp_path}", "data.isic_csv=/nope.csv"], "data.isic_csv=/nope.csv")):
        result = subprocess.run([sys.executable, "launch/pipeline.py", "--preset", "ham128", "--dry-run",
                                 f"run_dir={tmp_path / 'run'}", *given], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2 and named in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_overrides_are_typed_and_nested() -> None:
    cfg = build_config("smoke", ["vqvae_train.batch_size=7", "vqvae.channels=[8,16]", "wandb=disabled",
                                 "prior.conditional=false", "cluster.train_vqvae.partition=gpu"])
    assert cfg.vqvae_train.batch_size == 7
    assert cfg.vqvae.channels == [8, 16]
    assert cfg.prior.conditional is False
    assert cfg.cluster.train_vqvae.partition == "gpu"


@pytest.mark.parametrize(("override", "expected"), [
    ("vqvae_train.batch_size=0", "vqvae_train.batch_size: Input should be greater than 0"),
    ("vqvae.quantizer.codebook_size=1", "vqvae.quantizer.codebook_size: Input should be greater than or equal"),
    ("vqvae_train.lr=fast", "vqvae_train.lr: Input should be a valid number"),
    ("data.image_size=70", "not divisible by the VQ-VAE down-sampling factor 4"),
    ("vqvae.quantizer.kind=kmeans", "vqvae.quantizer.kind: unknown kind 'kmeans'; allowed: ema, loss, fsq"),
    ("vqvae.nope=1",
     "unknown config key 'vqvae.nope': 'nope' is not in vqvae (arch improved); allowed: arch, channels"),
    ("nope.x=1", "'nope' is not in the top level; allowed:"),
    ("batch_size", "is not of the form key=value"),
])
def test_bad_values_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config("smoke", [override])
    assert expected in str(err.value)


def test_sample_minimum_must_fit_the_data_mix_total() -> None:
    with pytest.raises(ConfigError, match=r"sample.min_per_class=5 exceeds sample.per_class=4"):
        build_config("smoke", ["sample.class_mix=data", "sample.min_per_class=5"])
    with pytest.raises(ConfigError, match=r"sample.class_mix: Input should be 'uniform', 'data' or 'top_up'"):
        build_config("smoke", ["sample.class_mix=balanced"])
    assert build_config("smoke", ["sample.class_mix=data", "sample.min_per_class=4"]).sample.min_per_class == 4


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'tiny'; allowed: smoke, seed, improved, ham128"):
        build_config("tiny")


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = build_config("seed", ["run_dir=/x/y", "prior_train.max_steps=5"])
    save_config(cfg, tmp_path / "config.json")
    again = load_config(tmp_path / "config.json")
    assert again == cfg
    assert again.digest() == cfg.digest()
    assert load_config(tmp_path / "config.json", ["prior_train.max_steps=6"]).digest("prior_train") != cfg.digest(
        "prior_train")


@pytest.mark.slow
def test_cli_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "vqvae/train.py", "--preset", "smoke", "vqvae_train.batch_size=0"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "vqvae_train.batch_size: Input should be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr
