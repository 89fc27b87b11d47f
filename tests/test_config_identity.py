"""Config sections of one kind (prior and VQ-VAE arch, quantizer kind), identity metadata on the fields, and
migration of configs saved by earlier versions. The slow test runs a tiny pipeline: a setting marked as changing
no output leaves prior, sample, evaluate and export up to date, in the dry run and in the real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import FinishedRun, assert_ok, copy_run, run_pipeline
from pydantic import BaseModel

from prior.config import GatedPriorConfig, TransformerPriorConfig
from runtime.config import ConfigError, RunConfig, build_config, load_config, save_config
from runtime.lineage import identity, settings
from runtime.schema import identity_values, in_identity

PIXELCNN_ONLY = ("filters", "kernel_size", "embed_dim")
TRANSFORMER_ONLY = ("d_model", "heads", "kv_heads", "label_dropout", "max_grid_side")


# ----- unions: each kind has only its own settings ------------------------------------------------------
@pytest.mark.parametrize("setting", [f"prior.{key}=96" for key in ("filters", "embed_dim")] + ["prior.kernel_size=5"])
def test_pixelcnn_settings_cannot_be_set_on_a_transformer_prior(setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config("improved", [setting])
    key = setting.split("=")[0].split(".")[1]
    assert f"'{key}' is not in prior (arch transformer)" in str(err.value)
    assert "set prior.arch=pixelcnn before it" in str(err.value)


def test_a_transformer_setting_on_a_pixelcnn_prior_says_which_arch_has_it() -> None:
    with pytest.raises(ConfigError, match=r"'d_model' belongs to arch transformer: set prior\.arch=transformer"):
        build_config("smoke", ["prior.d_model=64"])


def test_res_blocks_is_not_a_setting_of_the_seed_vqvae() -> None:
    with pytest.raises(ConfigError, match="'res_blocks' is not in vqvae \\(arch seed\\)"):
        build_config("seed", ["vqvae.res_blocks=1"])


def test_a_prior_hashes_only_its_own_archs_settings() -> None:
    transformer = settings(build_config("improved"), "prior")
    gated = settings(build_config("smoke"), "prior")
    assert not any(f"prior.{key}" in transformer for key in PIXELCNN_ONLY)
    assert not any(f"prior.{key}" in gated for key in TRANSFORMER_ONLY)
    assert transformer["prior.arch"] == "transformer" and transformer["prior.d_model"] == 256
    assert gated["prior.filters"] == 64


def test_switching_arch_keeps_shared_settings_and_takes_the_presets_values_for_the_new_one() -> None:
    assert build_config("improved", ["prior.arch=gated"]).prior == GatedPriorConfig(
        filters=128, kernel_size=5, layers=12)  # the preset's gated baseline, its 12 layers kept
    assert build_config("smoke", ["prior.layers=2", "prior.arch=transformer"]).prior == TransformerPriorConfig(
        layers=2, d_model=128, heads=4)  # smoke's transformer width; layers set before the switch kept
    seed = build_config("smoke", ["vqvae.arch=seed", "vqvae.channels=[16,16]", "vqvae.code_dim=4"]).vqvae
    assert seed.arch == "seed" and seed.codebook_size == 128  # the quantizer carried over


def test_the_discriminator_tag_is_not_in_error_keys() -> None:
    with pytest.raises(ConfigError) as err:
        build_config("improved", ["prior.heads=0"])
    assert "prior.heads: Input should be greater than 0" in str(err.value)


# ----- identity metadata ----------------------------------------------------------------------------------
def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel], str]]:
    out = []
    for name, info in model.model_fields.items():
        out.append((f"{prefix}{name}", model, name))
        kinds = [a for a in getattr(info.annotation, "__args__", (info.annotation,)) if isinstance(a, type)]
        for kind in kinds:
            if issubclass(kind, BaseModel):
                out += _fields(kind, f"{prefix}{name}.")
    return out


def test_the_settings_that_change_no_output_are_marked_on_their_fields() -> None:
    marked = {key for key, model, name in _fields(RunConfig) if not in_identity(model, name)}
    for section in ("vqvae_train", "prior_train", "classifier_train"):
        assert {f"{section}.{k}" for k in ("num_workers", "log_every", "eval_every", "eval_batches",
                                           "checkpoint_every", "prefetch_factor")} <= marked
    assert {"data.workers", "data.isic_images", "data.isic_csv", "encode.num_tasks"} <= marked
    assert "prior_train.lr" not in marked and "sample.num_tasks" not in marked  # these do change outputs


@pytest.mark.parametrize("override", ["prior_train.log_every=7", "prior_train.num_workers=3", "data.workers=2",
                                      "vqvae_train.checkpoint_every=50", "encode.num_tasks=5"])
def test_a_marked_setting_leaves_every_identity_alone(override: str) -> None:
    base, changed = build_config("smoke"), build_config("smoke", [override])
    for stage in ("data", "vqvae", "encode", "prior", "sample", "classifier", "evaluate", "export"):
        assert identity(changed, stage, {}) == identity(base, stage, {}), stage


def test_an_added_setting_is_hashed_only_away_from_its_old_value() -> None:
    for key, model, name in _fields(RunConfig):
        extra = model.model_fields[name].json_schema_extra
        if isinstance(extra, dict) and "identity_unless" in extra:  # the default reproduces the old outputs
            assert model.model_fields[name].default == extra["identity_unless"], key
    assert "train_views" not in identity_values(build_config("smoke").encode)
    assert identity_values(build_config("smoke", ["encode.train_views=8"]).encode)["train_views"] == 8


# ----- saved configs -----------------------------------------------------------------------------------
def test_a_saved_config_naming_a_retired_preset_still_loads(tmp_path: Path) -> None:
    cfg = build_config("improved", ["prior_train.max_steps=7"])
    save_config(cfg, tmp_path / "config.json")
    tree = json.loads((tmp_path / "config.json").read_text())
    tree["preset"] = "retired-2025"
    (tmp_path / "config.json").write_text(json.dumps(tree))
    loaded = load_config(tmp_path / "config.json", ["sample.seed=3"])
    assert loaded.preset == "retired-2025" and loaded.sample.seed == 3
    assert loaded.model_dump(exclude={"preset", "sample"}) == cfg.model_dump(exclude={"preset", "sample"})


def test_an_old_flat_prior_section_is_migrated(tmp_path: Path) -> None:
    """Saved before the unions: every arch's settings in one prior section (a transformer with filters)."""
    cfg = build_config("improved")
    tree = json.loads(cfg.model_dump_json())
    tree["prior"].update(filters=96, kernel_size=5, embed_dim=64)
    (tmp_path / "config.json").write_text(json.dumps(tree))
    loaded = load_config(tmp_path / "config.json")
    assert loaded.prior == cfg.prior
    assert settings(loaded, "prior") == settings(cfg, "prior")


# ----- a real run ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_setting_marked_as_changing_nothing_leaves_prior_sample_evaluate_up_to_date(
        tmp_path: Path, finished_transformer_run: FinishedRun) -> None:
    run = copy_run(finished_transformer_run.run_dir, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["prior_train"]["log_every"] = 3
    config["prior"]["filters"] = 96  # a PixelCNN-only setting in a saved transformer config (old flat layout)
    (run / "config.json").write_text(json.dumps(config))
    dry = assert_ok(run_pipeline(run / "config.json", "--dry-run")).stdout
    for stage in ("vqvae", "encode", "prior", "sample", "classifier", "evaluate", "export"):
        assert f"[{stage}] skip: up to date" in dry, dry
    manifests = {s: (run / s / "manifest.json").read_text() for s in ("prior", "samples", "evaluate", "export")}
    assert_ok(run_pipeline(run / "config.json"))
    assert {s: (run / s / "manifest.json").read_text() for s in manifests} == manifests  # nothing was re-made
