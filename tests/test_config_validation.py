"""Hostile and careless configuration input: every value from outside is checked where it enters.

Impossible values fail at validation (one line, naming the key and what is allowed), saved configs are
completed from their own preset, relative paths mean what they meant where they were typed, and a
config.json inside a run directory belongs to that directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_cli

from runtime.config import (
    PRESETS,
    ConfigError,
    RunConfig,
    add_config_args,
    build_config,
    config_from_args,
    load_config,
    save_config,
)
from runtime.ownership import write_marker
from runtime.seeding import seed_everything

SEED_KEYS = ("data.seed", "vqvae_train.seed", "prior_train.seed", "sample.seed")


def _refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        build_config("smoke", list(overrides))
    return str(err.value)


# ----- 1. impossible values fail at validation ---------------------------------------------------------
@pytest.mark.parametrize(("override", "key"), [
    ("vqvae_train.lr=1e309", "vqvae_train.lr"),  # JSON 1e309 is inf
    ("sample.temperature=Infinity", "sample.temperature"),
    ("prior_train.weight_decay=NaN", "prior_train.weight_decay"),
    ("vqvae.quantizer.commitment=inf", "vqvae.quantizer.commitment"),  # not JSON: pydantic would parse it
    ("prior_train.grad_clip=-Infinity", "prior_train.grad_clip"),
])
def test_non_finite_floats_are_refused(override: str, key: str) -> None:
    # Accepted before, then saved as null: a config.json that could never load again.
    assert f"{key}: Input should be a finite number" in _refused(override)


def test_non_finite_float_in_a_saved_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    save_config(build_config("smoke"), path)
    path.write_text(path.read_text().replace('"lr": 0.002', '"lr": Infinity', 1))
    with pytest.raises(ConfigError, match=r"vqvae_train\.lr: Input should be a finite number"):
        load_config(path)


@pytest.mark.parametrize(("override", "expected"), [
    ("vqvae.channels=[]", "vqvae.channels: List should have at least 1 item"),  # was an IndexError
    ("vqvae.channels=[16,0]", "vqvae.channels.1: Input should be greater than or equal to 1"),
    ("vqvae.channels=[-8,16]", "vqvae.channels.0: Input should be greater than or equal to 1"),
    ("vqvae.channels=[4,4,4,4,4,4,4,4,4]", "vqvae.channels: List should have at most 8 items"),
])
def test_vqvae_channels_must_be_one_to_eight_positive_widths(override: str, expected: str) -> None:
    assert expected in _refused(override)


def test_eight_stages_are_still_allowed() -> None:
    cfg = build_config("smoke", ["vqvae.channels=[4,4,4,4,4,4,4,4]", "data.image_size=256"])
    assert cfg.downsample_factor == 256


def test_prior_kernel_size_must_be_odd() -> None:
    # An even kernel used to pass and fail at prior step 0, after data, VQ-VAE and encode had run.
    message = _refused("prior.kernel_size=4")
    assert "prior.kernel_size" in message and "must be odd" in message and "allowed: 3, 5, 7" in message
    assert build_config("smoke", ["prior.kernel_size=3"]).prior.kernel_size == 3


@pytest.mark.parametrize("key", SEED_KEYS)
@pytest.mark.parametrize(("value", "expected"), [
    (2**64, "Input should be less than 4294967296"),  # torch.manual_seed overflowed at training start
    (2**32, "Input should be less than 4294967296"),
    (-1, "Input should be greater than or equal to 0"),
])
def test_seeds_are_below_two_to_the_32(key: str, value: int, expected: str) -> None:
    assert f"{key}: {expected}" in _refused(f"{key}={value}")


@pytest.mark.parametrize("key", SEED_KEYS)
def test_largest_seed_is_accepted_and_usable(key: str) -> None:
    cfg = build_config("smoke", [f"{key}={2**32 - 1}"])
    section, name = key.split(".")
    seed_everything(getattr(getattr(cfg, section), name))  # what training does with it first


@pytest.mark.parametrize(("override", "key"), [
    ("cluster.train_vqvae.partition=gpu a100", "cluster.train_vqvae.partition"),
    ("cluster.data.account=lab\n#SBATCH --exclusive", "cluster.data.account"),
    ("cluster.sample.qos=", "cluster.sample.qos"),  # "" was silently dropped
    ("cluster.report.constraint=a\tb", "cluster.report.constraint"),
])
def test_sbatch_words_have_no_whitespace_or_line_breaks(override: str, key: str) -> None:
    message = _refused(override)
    assert f"{key}: Value error, must be one word without spaces, line breaks" in message
    assert "\n" not in message  # the offending value is shown escaped, on the same line


def test_sbatch_words_and_null_are_accepted() -> None:
    cfg = build_config("smoke", ["cluster.train_vqvae.partition=gpu,gpu-long",
                                 "cluster.train_vqvae.constraint=a100|h100", "cluster.train_vqvae.qos=null"])
    assert cfg.cluster.train_vqvae.partition == "gpu,gpu-long" and cfg.cluster.train_vqvae.qos is None


def test_cluster_setup_entries_are_single_lines() -> None:
    message = _refused('cluster.setup=["module load cuda", "source venv/bin/activate\\nrm -rf ~"]')
    assert "cluster.setup.1: Value error, must be a single shell line" in message
    assert build_config("smoke", ['cluster.setup=["module load cuda"]']).cluster.setup == ["module load cuda"]


@pytest.mark.parametrize(("override", "expected"), [
    # The prior predicts one logit per code and position: 2**16 codes are already 2 GiB of logits per batch.
    ("vqvae.quantizer.codebook_size=70000",
     "vqvae.quantizer.codebook_size: Input should be less than or equal to 65536"),
    # logits / 1e-50 overflow float32: softmax NaN, sampling fails after training.
    ("sample.temperature=1e-50", "sample.temperature: Value error, must be at least 0.001"),
    # Slurm would signal the job at once: it would checkpoint and requeue, doing nothing, max_requeues times.
    ("cluster.encode.time_min=2", "cluster.encode.time_min=2 (120 s) must be longer than cluster.signal_delay_s=120"),
    ("cluster.signal_delay_s=70000", "cluster.signal_delay_s: Input should be less than or equal to 65535"),
    ("run_dir=", "run_dir: Value error, must be a path, not empty"),  # "" was the current folder
    ("data.isic_images= ", "data.isic_images: Value error, must be a path, not empty"),
])
def test_other_values_that_used_to_fail_only_later(override: str, expected: str) -> None:
    assert expected in _refused(override)


def test_all_problems_are_reported_on_one_line() -> None:
    message = _refused("vqvae_train.lr=1e309", "prior.kernel_size=4", "sample.seed=-1")
    assert "\n" not in message
    for key in ("vqvae_train.lr", "prior.kernel_size", "sample.seed"):
        assert f"{key}: " in message


# ----- 2. a saved config is completed from its own preset -------------------------------------------------
def test_missing_keys_come_from_the_files_own_preset(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    save_config(build_config("seed", ["prior_train.max_steps=5"]), path)
    tree = json.loads(path.read_text())
    del tree["vqvae"]["arch"], tree["prior"], tree["data"]["image_size"]
    path.write_text(json.dumps(tree))
    cfg = load_config(path)
    # RunConfig's defaults would have been improved / gated / 64 px: another model than the file's preset.
    assert (cfg.vqvae.arch, cfg.prior.arch, cfg.prior.filters, cfg.data.image_size) == ("seed", "pixelcnn", 120, 256)
    assert cfg.prior_train.max_steps == 5  # what the file does hold still wins over the preset


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda t: t.pop("preset"), "has no 'preset' key"),
    (lambda t: t.update(preset=["seed"]), "names an unknown preset ['seed']"),
])
def test_saved_config_must_name_a_known_preset(tmp_path: Path, edit, expected: str) -> None:
    path = tmp_path / "config.json"
    save_config(build_config("smoke"), path)
    tree = json.loads(path.read_text())
    edit(tree)
    path.write_text(json.dumps(tree))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"config file {path} {expected}")
    assert "allowed: smoke, seed, improved" in str(err.value)


@pytest.mark.parametrize("content", ["[1, 2]", '"smoke"', "null", "3"])
def test_config_file_that_is_not_an_object_names_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"config file {path} must hold a JSON object"):
        load_config(path)


# ----- 3. --preset with --config is refused ------------------------------------------------------------------
def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    return parser.parse_args(list(argv))


def test_preset_and_config_cannot_be_combined(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    save_config(build_config("smoke"), path)
    with pytest.raises(ConfigError, match="--preset and --config cannot be combined"):
        config_from_args(_args("--preset", "seed", "--config", str(path)))
    assert config_from_args(_args("--config", str(path))).preset == "smoke"


def test_without_config_the_default_preset_is_smoke() -> None:
    assert config_from_args(_args()).preset == "smoke"
    assert config_from_args(_args("--preset", "seed")).vqvae.arch == "seed"


# ----- 4. relative paths are resolved where they were typed ---------------------------------------------------
def test_relative_paths_resolve_against_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "work"
    here.mkdir()
    monkeypatch.chdir(here)
    cfg = build_config("smoke", ["run_dir=runs/x", "data.isic_images=images", "data.isic_csv=../meta.csv"])
    assert cfg.run_dir == here.resolve() / "runs" / "x"
    assert cfg.data.isic_images == here.resolve() / "images"
    assert cfg.data.isic_csv == tmp_path.resolve() / "meta.csv"
    assert build_config("seed").run_dir == here.resolve() / "runs" / "seed"  # presets' run_dir too
    assert build_config("smoke", ["run_dir=/abs/run"]).run_dir == Path("/abs/run")  # absolute: as typed
    assert RunConfig().run_dir == Path("runs/smoke")  # the bare model keeps its plain default


def test_relative_path_in_a_saved_config_resolves_against_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    template = tmp_path / "templates" / "isic.json"
    template.parent.mkdir()
    tree = {"preset": "smoke", "run_dir": "runs/isic", "data": {"source": "isic", "isic_images": "data/images"}}
    template.write_text(json.dumps(tree))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(template)
    assert cfg.run_dir == elsewhere.resolve() / "runs" / "isic"
    assert cfg.data.isic_images == elsewhere.resolve() / "data" / "images"


# ----- 5. a run directory's config.json belongs to that directory ---------------------------------------------
def _run_dir(path: Path) -> Path:
    write_marker(path, "run")
    save_config(build_config("smoke", [f"run_dir={path}"]), path / "config.json")
    return path


def test_copied_run_directory_works_on_the_copy(tmp_path: Path) -> None:
    base = _run_dir(tmp_path / "runs" / "base")
    copy = tmp_path / "runs" / "copyA"
    shutil.copytree(base, copy)  # cp -a runs/base runs/copyA
    assert load_config(copy / "config.json").run_dir == copy.resolve()
    assert load_config(copy / "config.json", [f"run_dir={tmp_path / 'other'}"]).run_dir == tmp_path / "other"


def test_config_outside_a_run_directory_keeps_its_run_dir(tmp_path: Path) -> None:
    base = _run_dir(tmp_path / "base")
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(base / "config.json", plain / "config.json")  # no run marker: a template kept elsewhere
    assert load_config(plain / "config.json").run_dir == base
    save_config(build_config("smoke", [f"run_dir={tmp_path / 'x'}"]), base / "template.json")  # not config.json
    assert load_config(base / "template.json").run_dir == tmp_path / "x"


# ----- the command line: one line, exit 2, no traceback ---------------------------------------------------------
@pytest.mark.slow
def test_cli_refuses_an_infinite_learning_rate() -> None:
    assert_one_line_error(run_cli("vqvae/train.py", "--preset", "smoke", "vqvae_train.lr=1e309"),
                           "vqvae_train.lr: Input should be a finite number", alone=True)


@pytest.mark.slow
def test_cli_refuses_empty_vqvae_channels() -> None:
    assert_one_line_error(run_cli("vqvae/train.py", "--preset", "smoke", "vqvae.channels=[]"),
                           "vqvae.channels: List should have at least 1 item", alone=True)


@pytest.mark.slow
def test_cli_refuses_preset_with_config(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    save_config(build_config("smoke", [f"run_dir={tmp_path / 'run'}"]), path)
    assert_one_line_error(run_cli("vqvae/train.py", "--preset", "seed", "--config", str(path)),
                           "--preset and --config cannot be combined", alone=True)
    assert not (tmp_path / "run").exists()


def test_every_preset_still_round_trips(tmp_path: Path) -> None:
    for preset in PRESETS:  # a real-data preset needs its images folder
        cfg = build_config(preset, ["data.isic_images=/data/images"] if preset == "ham128" else [])
        save_config(cfg, tmp_path / f"{preset}.json")
        assert load_config(tmp_path / f"{preset}.json") == cfg
