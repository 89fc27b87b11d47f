"""One typed configuration for every stage: presets + ``key=value`` overrides, validated by pydantic.

Every stage (pack, train VQ-VAE, encode, train prior, sample, pipeline, Slurm scripts) parses its
command line with :func:`add_config_args` / :func:`config_from_args`, so an override such as
``vqvae_train.batch_size=32`` means the same thing everywhere. Unknown keys, wrong types and
impossible values fail before any work starts, naming the key and what is allowed.

Each section's model lives beside the code it configures (shards/config.py, vqvae/config.py, prior/config.py,
judge/config.py, runtime/train_config.py, launch/config.py); this module assembles them into :class:`RunConfig`,
checks what spans sections, loads and saves configs and migrates old saved ones. Presets: runtime/presets.py;
the override parser: runtime/overrides.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from judge.config import AugmentConfig, ClassifierConfig, EvaluateConfig
from launch.config import ClusterConfig
from prior.config import GatedPriorConfig, PriorConfig, SampleConfig, TransformerPriorConfig
from runtime.errors import ConfigError
from runtime.overrides import KIND_SECTIONS, apply_override, format_errors, merge
from runtime.ownership import read_marker
from runtime.presets import PRESETS, preset_values
from runtime.schema import NOT_IN_IDENTITY, Strict, UserPath
from runtime.train_config import OptimConfig
from shards.config import CLASSES, DataConfig
from vqvae.config import (
    QUANTIZER_CONFIGS,
    EncodeConfig,
    ImprovedVQVAEConfig,
    VQVAEConfig,
    VQVAETrainConfig,
    discriminator_min_size,
)

__all__ = ["CLASSES", "PRESETS", "ConfigError", "RunConfig", "add_config_args", "build_config", "config_from_args",
           "load_config", "preset_tree", "save_config"]


class RunConfig(Strict):
    """Everything one run is made from: a section per component."""

    preset: str = Field("smoke", min_length=1, description=(
        "the preset the run started from (provenance: a saved config is complete, so a retired preset still loads)"))
    run_dir: UserPath = Field(Path("runs/smoke"), description="the run directory every stage writes into")
    wandb: Literal["offline", "online", "disabled"] = Field("offline", description=(
        "Weights & Biases logging of the trainings"), json_schema_extra=NOT_IN_IDENTITY)
    data: DataConfig = Field(default_factory=DataConfig, description="images and shards")
    vqvae: VQVAEConfig = Field(default_factory=ImprovedVQVAEConfig, description=(
        "the VQ-VAE, one of several architectures chosen by its arch (seed, improved)"))
    vqvae_train: VQVAETrainConfig = Field(default_factory=VQVAETrainConfig, description="training of the VQ-VAE")
    encode: EncodeConfig = Field(default_factory=EncodeConfig, description="image shards -> code shards")
    prior: PriorConfig = Field(default_factory=GatedPriorConfig, description=(
        "the prior, one of several architectures chosen by its arch (pixelcnn, gated, transformer)"))
    prior_train: OptimConfig = Field(default_factory=OptimConfig, description="training of the prior")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="samples drawn from the prior")
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig, description="the judge's classifier")
    classifier_train: OptimConfig = Field(default_factory=OptimConfig, description="training of the judge")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="the evaluate stage")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description=(
        "the augment stage: do synthetic lesions help a classifier"))
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Slurm submission")

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        factor = self.downsample_factor
        if self.data.image_size % factor:
            raise ValueError(
                f"data.image_size={self.data.image_size} is not divisible by the VQ-VAE down-sampling "
                f"factor {factor} (vqvae.patch_size, where the arch has one, x 2 ** len(vqvae.channels)); allowed: "
                f"multiples of {factor}"
            )
        if self.data.source == "isic" and self.data.isic_images is None:
            raise ValueError("data.source=isic needs data.isic_images=/path/to/images")
        self._guidance_possible()
        adv, size = self.vqvae_train.adversarial, self.data.image_size
        if adv.enabled and size < discriminator_min_size(adv.disc_layers):
            fitting = (size // 3).bit_length() - 1  # the largest n with discriminator_min_size(n) <= size
            raise ValueError(f"vqvae_train.adversarial.disc_layers={adv.disc_layers} is too deep for "
                             f"data.image_size={size}: the discriminator needs images of at least "
                             f"{discriminator_min_size(adv.disc_layers)} px; allowed: disc_layers <= {fitting}")
        return self

    def _guidance_possible(self) -> None:
        """Classifier-free guidance needs a null class: refused when planning, not after the prior trained."""
        prior = self.prior
        transformer = isinstance(prior, TransformerPriorConfig)
        needs = [text for broken, text in (
            (not transformer, "prior.arch=transformer (the PixelCNNs have no null class)"),
            (not prior.conditional, "prior.conditional=true"),
            (transformer and prior.label_dropout == 0,
             "prior.label_dropout > 0 (the null class is learned from dropped labels)"),
        ) if broken]
        if self.sample.guidance_scale != 1.0 and needs:
            raise ValueError(f"sample.guidance_scale={self.sample.guidance_scale} (classifier-free guidance) needs "
                             f"{' and '.join(needs)}; allowed with this prior: sample.guidance_scale=1")

    # ----- derived facts every stage agrees on -------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return self.vqvae.downsample_factor

    def digest(self, *sections: str) -> str:
        """Stable hash of the named config sections (all when none): what a stage's outputs depend on."""
        dumped = self.model_dump(mode="json")
        picked = {k: dumped[k] for k in sections} if sections else dumped
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def preset_tree(preset: str) -> dict[str, Any]:
    """The complete, unvalidated config tree of ``preset`` (paths the user must give are still missing)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    return merge(RunConfig().model_dump(mode="json"), preset_values(preset))


def _absolute(path: Path) -> Path:
    """A relative path means what it meant where it was typed: the command's working directory.
    Stages run from another folder (the repository root), so configs carry absolute paths."""
    return path if path.is_absolute() else (Path.cwd() / path).resolve()


def _validated(base: dict[str, Any], overrides: list[str] | tuple[str, ...], what: str) -> RunConfig:
    tree = json.loads(json.dumps(base, default=str))
    for override in overrides:
        apply_override(tree, override)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(err, what)) from None
    cfg.run_dir = _absolute(cfg.run_dir)
    for name in ("isic_images", "isic_csv"):
        if (value := getattr(cfg.data, name)) is not None:
            setattr(cfg.data, name, _absolute(value))
    return cfg


def build_config(preset: str = "smoke", overrides: list[str] | tuple[str, ...] = (),
                 base: dict[str, Any] | None = None) -> RunConfig:
    """A validated config from a preset (or a complete config tree ``base``) plus ``key=value`` overrides.

    Relative paths (``run_dir``, ``data.isic_images``, ``data.isic_csv``) are made absolute against the
    current working directory."""
    return _validated(preset_tree(preset) if base is None else base, overrides, "invalid configuration")


# ----- migration of configs saved by earlier versions ----------------------------------------------------
_OLD_QUANTIZER_KEYS = {"codebook_size": "codebook_size", "commitment": "commitment", "ema_decay": "decay",
                       "dead_code_threshold": "dead_code_threshold", "kmeans_init": "kmeans_init"}


def _old_quantizer_overrides(vqvae: Any) -> list[str] | None:
    """For a vqvae section saved before quantizers had kinds (``quantizer: "ema"`` next to codebook_size,
    ema_decay, ...): the overrides that say the same now. None for a current section."""
    if not isinstance(vqvae, dict):
        return None
    kind = vqvae.get("quantizer")
    if not isinstance(kind, str) and not _OLD_QUANTIZER_KEYS.keys() & vqvae.keys():
        return None
    if not isinstance(kind, str):  # old keys beside a new quantizer section (hand-edited)
        kind = None
    out = [f"vqvae.quantizer.kind={kind}"] if kind else []
    fields = QUANTIZER_CONFIGS[kind].model_fields if kind in QUANTIZER_CONFIGS else _OLD_QUANTIZER_KEYS.values()
    for old, new in _OLD_QUANTIZER_KEYS.items():
        if old in vqvae and new in fields:  # the loss kind dropped ema_decay/dead_code_threshold (a statistic only)
            out.append(f"vqvae.quantizer.{new}={json.dumps(vqvae[old])}")
    return out


def drop_other_kinds(saved: dict[str, Any]) -> list[str]:
    """Configs saved before the prior and the VQ-VAE were unions held every architecture's settings in one flat
    section (a transformer prior with ``filters``, a seed VQ-VAE with ``res_blocks``): the settings its kind does
    not have are dropped (they never changed an output). Returns the dotted keys dropped."""
    dropped = []
    for path, kinds in KIND_SECTIONS.items():
        node: Any = saved
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or node.get(kinds.key) not in kinds.models:
            continue
        mine = kinds.models[node[kinds.key]].model_fields
        others = {name for model in kinds.models.values() for name in model.model_fields}
        for key in [k for k in node if k not in mine and k in others]:
            del node[key]
            dropped.append(".".join((*path, key)))
    return dropped


def load_config(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A saved config file plus overrides.

    Keys the file lacks come from the preset it records (its ``preset`` key), never from another
    preset's defaults; a preset that no longer exists is provenance only (a saved config is complete).
    Sections saved in an earlier layout are migrated (:func:`drop_other_kinds`). ``RUN_DIR/config.json``
    inside a lesion-vq run directory belongs to that directory, so a copied run (``cp -a runs/a runs/b``)
    works on ``runs/b``; an explicit ``run_dir=...`` override still wins."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"config file {path} must hold a JSON object of config sections, "
                          f"not a JSON {type(saved).__name__}")
    preset = saved.get("preset")
    if not isinstance(preset, str) or not preset:
        found = "has no 'preset' key" if "preset" not in saved else f"names an unknown preset {preset!r}"
        raise ConfigError(f"config file {path} {found}: it must name the preset it was made from, which "
                          f"completes any key it lacks; allowed: {', '.join(PRESETS)}")
    if (renamed := _old_quantizer_overrides(saved.get("vqvae"))) is not None:
        # Not converted: every stage identity hashes the vqvae section, so a converted file would not match
        # its own outputs anyway; re-making the config says so plainly.
        raise ConfigError(f"config file {path} uses the old vqvae quantizer keys (before quantizer kinds); re-make "
                          f"it, e.g. python launch/pipeline.py --preset {preset} run_dir=RUN_DIR {' '.join(renamed)}")
    drop_other_kinds(saved)
    base = merge(preset_tree(preset), saved) if preset in PRESETS else saved
    marker = read_marker(path.parent) if path.name == "config.json" else None
    if marker is not None and marker.get("kind") == "run":
        base["run_dir"] = str(path.parent.resolve())
    what = f"invalid configuration in {path}" + (" with overrides" if overrides else "")
    return _validated(base, overrides, what)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    # default None (not "smoke"): config_from_args must tell an explicit --preset from none at all.
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="starting point (default: smoke); not with --config")
    parser.add_argument("--config", type=Path, help="a saved config.json (e.g. RUN_DIR/config.json)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. vqvae_train.batch_size=32 run_dir=runs/x")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    preset = getattr(args, "preset", None)
    if args.config is not None:
        if preset is not None:
            raise ConfigError(f"--preset and --config cannot be combined: {args.config} records its own preset; "
                              f"drop --preset, or drop --config to start from preset {preset!r}")
        return load_config(args.config, args.overrides)
    return build_config(preset or "smoke", args.overrides)


def save_config(cfg: RunConfig, path: Path) -> None:
    from runtime.files import atomic_write_text

    atomic_write_text(path, cfg.model_dump_json(indent=2))
