"""One typed configuration for every stage: presets + ``key=value`` overrides, validated by pydantic.

Every stage (pack, train VQ-VAE, encode, train prior, sample, pipeline, Slurm scripts) parses its
command line with :func:`add_config_args` / :func:`config_from_args`, so an override such as
``vqvae_train.batch_size=32`` means the same thing everywhere. Unknown keys, wrong types and
impossible values fail before any work starts, naming the key and what is allowed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runtime.errors import UserError

CLASSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
"""The seven ISIC 2018 / HAM10000 diagnosis classes, in ISIC 2018 column order (class index = position)."""


class ConfigError(UserError, ValueError):
    """A configuration problem, with a message meant for the person who typed the command."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    source: Literal["synthetic", "isic"] = "synthetic"
    isic_images: Path | None = Field(None, description="folder of ISIC JPEG/PNG images (source=isic)")
    isic_csv: Path | None = Field(None, description="metadata CSV; omit for class sub-folders")
    num_images: int = Field(700, gt=0, description="synthetic images to generate")
    image_size: int = Field(64, ge=16, le=4096, description="square size images are stored at in shards")
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    shard_max_count: int = Field(256, gt=0)
    shard_max_bytes: int = Field(256 * 2**20, gt=1024)
    jpeg_quality: int = Field(95, ge=50, le=100)
    hair_probability: float = Field(0.5, ge=0.0, le=1.0)
    seed: int = 0
    workers: int = Field(0, ge=0, description="packing processes; 0 = all cores")


class VQVAEConfig(_Strict):
    arch: Literal["seed", "improved"] = "improved"
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 256])
    """seed: encoder conv widths (one stride-2 conv each); improved: widths of the down-sampling stages."""
    res_blocks: int = Field(2, ge=0, description="improved only: residual blocks per stage")
    codebook_size: int = Field(512, ge=2)
    code_dim: int = Field(64, ge=1)
    commitment: float = Field(0.25, ge=0.0)
    quantizer: Literal["loss", "ema"] = "ema"
    """loss: the report's codebook + commitment losses; ema: EMA codebook, all-reduced across ranks."""
    ema_decay: float = Field(0.99, gt=0.0, lt=1.0)
    dead_code_threshold: float = Field(1.0, ge=0.0, description="EMA usage below which a code is restarted")
    kmeans_init: bool = True


class OptimConfig(_Strict):
    batch_size: int = Field(16, gt=0, description="per process")
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(300, gt=0)
    grad_clip: float = Field(0.0, ge=0.0, description="0 = off")
    checkpoint_every: int = Field(100, gt=0)
    eval_every: int = Field(100, gt=0)
    log_every: int = Field(10, gt=0)
    eval_batches: int = Field(8, gt=0)
    num_workers: int = Field(1, ge=0)
    shuffle_buffer: int = Field(256, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    augment: bool = True


class PriorConfig(_Strict):
    arch: Literal["pixelcnn", "gated"] = "gated"
    """pixelcnn: the report's masked PixelCNN (has the blind spot); gated: vertical+horizontal stacks."""
    filters: int = Field(120, gt=0)
    layers: int = Field(8, ge=1)
    kernel_size: int = Field(7, ge=3)
    conditional: bool = True
    embed_dim: int = Field(64, gt=0, description="code embedding width fed to the prior")


class SampleConfig(_Strict):
    per_class: int = Field(4, gt=0)
    temperature: float = Field(1.0, gt=0.0)
    batch_size: int = Field(32, gt=0)
    num_tasks: int = Field(2, gt=0, description="sampling tasks (Slurm array size), each with its own seed")
    seed: int = 0


class EncodeConfig(_Strict):
    batch_size: int = Field(64, gt=0)
    num_tasks: int = Field(2, gt=0, description="encode tasks (Slurm array size), each over a subset of shards")


class SlurmResources(_Strict):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = Field(60, gt=0)
    nodes: int = Field(1, gt=0)
    gpus_per_node: int = Field(0, ge=0)
    processes_per_node: int = Field(1, gt=0, description="accelerate processes per node (training stages)")
    cpus_per_task: int = Field(2, gt=0)
    mem_gb: int = Field(4, gt=0)
    constraint: str | None = None
    array_parallelism: int = Field(8, gt=0)


class ClusterConfig(_Strict):
    signal: Literal["USR1", "USR2", "TERM", "INT"] = "USR2"
    signal_delay_s: int = Field(120, ge=10, description="seconds before the time limit Slurm signals")
    setup: list[str] = Field(default_factory=list, description="shell lines run first (module load, venv)")
    max_requeues: int = Field(5, ge=0)
    data: SlurmResources = Field(default_factory=SlurmResources)
    train_vqvae: SlurmResources = Field(default_factory=SlurmResources)
    encode: SlurmResources = Field(default_factory=SlurmResources)
    train_prior: SlurmResources = Field(default_factory=SlurmResources)
    sample: SlurmResources = Field(default_factory=SlurmResources)
    report: SlurmResources = Field(default_factory=SlurmResources)


class RunConfig(_Strict):
    preset: str = "smoke"
    run_dir: Path = Path("runs/smoke")
    wandb: Literal["offline", "online", "disabled"] = "offline"
    data: DataConfig = Field(default_factory=DataConfig)
    vqvae: VQVAEConfig = Field(default_factory=VQVAEConfig)
    vqvae_train: OptimConfig = Field(default_factory=OptimConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    prior: PriorConfig = Field(default_factory=PriorConfig)
    prior_train: OptimConfig = Field(default_factory=OptimConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        factor = self.downsample_factor
        if self.data.image_size % factor:
            raise ValueError(
                f"data.image_size={self.data.image_size} is not divisible by the VQ-VAE down-sampling "
                f"factor {factor} (2 ** len(vqvae.channels)); allowed: multiples of {factor}"
            )
        per_position, rest = divmod(self.vqvae.channels[-1], self.vqvae.code_dim)
        if self.vqvae.arch == "seed" and (rest or math.isqrt(per_position) ** 2 != per_position):
            raise ValueError(
                f"vqvae.code_dim={self.vqvae.code_dim} must split the last encoder width "
                f"{self.vqvae.channels[-1]} into a square number of codes (1, 4, 9, ...): the seed model lays "
                "the codes of each position out as an r×r block of the code grid"
            )
        if self.data.source == "isic" and self.data.isic_images is None:
            raise ValueError("data.source=isic needs data.isic_images=/path/to/images")
        return self

    # ----- derived facts every stage agrees on -------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.vqvae.channels)

    def digest(self, *sections: str) -> str:
        """Stable hash of the named config sections (all when none): what a stage's outputs depend on."""
        dumped = self.model_dump(mode="json")
        picked = {k: dumped[k] for k in sections} if sections else dumped
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _smoke() -> dict[str, Any]:
    """Minutes on 2 CPU cores, recognisable reconstructions on synthetic data."""
    return {
        "preset": "smoke",
        "run_dir": "runs/smoke",
        "data": {"num_images": 700, "image_size": 64, "shard_max_count": 128},
        # ema_decay 0.95: a short run must notice dead codes quickly (0.99 left 80% of the codebook
        # unused after 300 steps); batch 16 x 600 steps beat 32 x 300 at the same cost (PSNR 25.2 vs 23.5).
        "vqvae": {"arch": "improved", "channels": [32, 64], "res_blocks": 1, "codebook_size": 128,
                  "code_dim": 32, "quantizer": "ema", "ema_decay": 0.95},
        "vqvae_train": {"batch_size": 16, "lr": 2e-3, "max_steps": 600, "checkpoint_every": 200,
                        "eval_every": 200, "schedule": "cosine", "warmup_steps": 20},
        "prior": {"arch": "gated", "filters": 64, "layers": 6, "kernel_size": 5, "embed_dim": 32},
        "prior_train": {"batch_size": 32, "lr": 2e-3, "max_steps": 300, "checkpoint_every": 100,
                        "eval_every": 150, "schedule": "cosine", "augment": False},
        "sample": {"per_class": 4, "num_tasks": 2},
    }


def _seed() -> dict[str, Any]:
    """The report's exact settings: 256x256, five stride-2 convs, 512x64 codebook split 4 per position,
    Adam 1e-3, batch 16, commitment 0.25; PixelCNN 7x7 type-A + 8 residual blocks, 120 filters."""
    return {
        "preset": "seed",
        "run_dir": "runs/seed",
        "data": {"image_size": 256, "num_images": 2000},
        "vqvae": {"arch": "seed", "channels": [32, 64, 128, 256, 256], "codebook_size": 512,
                  "code_dim": 64, "commitment": 0.25, "quantizer": "loss", "kmeans_init": False},
        "vqvae_train": {"batch_size": 16, "lr": 1e-3, "max_steps": 11280, "schedule": "constant",
                        "checkpoint_every": 500, "eval_every": 500},
        "prior": {"arch": "pixelcnn", "filters": 120, "layers": 8, "kernel_size": 7, "conditional": False},
        "prior_train": {"batch_size": 16, "lr": 1e-3, "max_steps": 20000, "augment": False,
                        "checkpoint_every": 1000, "eval_every": 1000},
    }


def _improved() -> dict[str, Any]:
    """A careful modern setup at similar cost: 16x16 one-code-per-position grid, residual blocks,
    EMA codebook with k-means init and dead-code restarts, gated class-conditional PixelCNN."""
    return {
        "preset": "improved",
        "run_dir": "runs/improved",
        "data": {"image_size": 256, "num_images": 2000},
        # 4.8 GMAC per 256-px image forward vs the seed model's 1.0 (channels [64,128,128,256] with
        # 2 residual blocks would be 18.9): the same 256 codes per image, one per position.
        "vqvae": {"arch": "improved", "channels": [32, 64, 128, 256], "res_blocks": 1,
                  "codebook_size": 512, "code_dim": 64, "quantizer": "ema"},
        "vqvae_train": {"batch_size": 16, "lr": 3e-4, "max_steps": 20000, "schedule": "cosine",
                        "warmup_steps": 500, "grad_clip": 1.0, "checkpoint_every": 500, "eval_every": 500},
        "prior": {"arch": "gated", "filters": 128, "layers": 12, "kernel_size": 5, "conditional": True},
        "prior_train": {"batch_size": 32, "lr": 1e-3, "max_steps": 20000, "schedule": "cosine",
                        "warmup_steps": 500, "augment": False, "checkpoint_every": 1000,
                        "eval_every": 1000},
    }


PRESETS = {"smoke": _smoke, "seed": _seed, "improved": _improved}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _parse_value(text: str) -> Any:
    """JSON when it parses (numbers, lists, true/false/null), else the raw string for pydantic to coerce."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. vqvae_train.batch_size=32)")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(keys[:depth]) or "the top level"
            allowed = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
            raise ConfigError(f"unknown config key {dotted!r}: {key!r} is not in {where}; allowed: {allowed}")
        if depth == len(keys) - 1:
            node[key] = _parse_value(raw)
        else:
            node = node[key]


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "config"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"  {key}: {e['msg']}{got}")
    return "invalid configuration:\n" + "\n".join(lines)


def build_config(preset: str = "smoke", overrides: list[str] | tuple[str, ...] = (),
                 base: dict[str, Any] | None = None) -> RunConfig:
    """A validated config from a preset (or a saved config ``base``) plus ``key=value`` overrides."""
    if base is None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
        base = _merge(RunConfig().model_dump(mode="json"), PRESETS[preset]())
    tree = json.loads(json.dumps(base, default=str))
    for override in overrides:
        apply_override(tree, override)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        base = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
    return build_config(base=base, overrides=overrides)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="starting point")
    parser.add_argument("--config", type=Path, help="a saved config.json (e.g. RUN_DIR/config.json)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. vqvae_train.batch_size=32 run_dir=runs/x")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    if args.config is not None:
        return load_config(args.config, args.overrides)
    return build_config(args.preset, args.overrides)


def save_config(cfg: RunConfig, path: Path) -> None:
    from runtime.files import atomic_write_text

    atomic_write_text(path, cfg.model_dump_json(indent=2))
