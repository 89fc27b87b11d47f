"""Settings of the VQ-VAE (``vqvae``: an architecture and a quantizer, each one of several kinds), of its
training (``vqvae_train``) and of the encode stage (``encode``).

Adding a quantizer kind: its settings class here (a ``kind`` literal, a description on every field), an entry
in :data:`QUANTIZER_CONFIGS` and in the :data:`QuantizerConfig` union, and its module under vqvae/quantizers/
with a builder in ``vqvae.quantizers.QUANTIZERS``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, TypeAdapter, model_validator

from runtime.schema import MAX_ARRAY_TASKS, MAX_COUNT, NOT_IN_IDENTITY, Kinds, Strict, added_setting
from runtime.train_config import OptimConfig

MAX_CODEBOOK_SIZE = 2**16
"""Codes are stored in the smallest integer type holding them (shards/codes.py), so storage sets no limit;
the prior does: it predicts one logit per code and position, and 65,536 codes x 256 positions x a batch of
32 are already 2 GiB of float32 logits."""

CodebookSize = Annotated[int, Field(ge=2, le=MAX_CODEBOOK_SIZE, description="number of codes")]

MAX_LOOKUP_DIM = 1024


def _not_one(value: int) -> int:
    if value == 1:  # one normalised dimension is a sign: 2 codes, whatever codebook_size says
        raise ValueError("lookup_dim=1 leaves each normalised vector only its sign; allowed: 0 (off) or at least 2")
    return value


LookupDim = Annotated[int, AfterValidator(_not_one), Field(
    ge=0, le=MAX_LOOKUP_DIM, json_schema_extra=added_setting(0), description=(
        "0: codes are looked up among code_dim-wide vectors as they are; N >= 2: factorised codes (ViT-VQGAN, "
        "LlamaGen): each vector is projected to N dimensions, l2-normalised and matched to an l2-normalised "
        "codebook by cosine similarity, then projected back to code_dim (learned linear maps); 4-8 keeps most "
        "codes in use"))]
RotationTrick = Annotated[bool, Field(json_schema_extra=added_setting(False), description=(
    "gradient through the quantizer by the rotation trick (Fifty et al. 2024): the output's gradient rotated "
    "from the code to the encoder's vector and rescaled by their norms, instead of copied (straight-through)"))]


# ----- quantizers: one kind each ------------------------------------------------------------------------
class EMAQuantizerConfig(Strict):
    """A K x code_dim codebook, the exponential moving average of the vectors assigned to each code
    (statistics all-reduced across ranks), k-means initialisation and dead-code restarts."""

    kind: Literal["ema"] = Field("ema", description="quantizer kind: ema, loss or fsq")
    codebook_size: CodebookSize = 512
    commitment: float = Field(0.25, ge=0.0, description="weight of the commitment loss ||z - sg(e)||^2")
    decay: float = Field(0.99, gt=0.0, lt=1.0, description="EMA decay of the codebook statistics")
    dead_code_threshold: float = Field(1.0, ge=0.0, description="EMA usage below which a code is restarted")
    kmeans_init: bool = Field(True, description="codebook from k-means on the first batch")
    lookup_dim: LookupDim = 0
    rotation_trick: RotationTrick = False


class LossQuantizerConfig(Strict):
    """The report's codebook: a parameter trained by the codebook loss, plus the commitment loss."""

    kind: Literal["loss"] = Field("loss", description="quantizer kind: ema, loss or fsq")
    codebook_size: CodebookSize = 512
    commitment: float = Field(0.25, ge=0.0, description="weight of the commitment loss ||z - sg(e)||^2")
    kmeans_init: bool = Field(False, description="k-means on the first batch instead of the report's uniform init")
    lookup_dim: LookupDim = 0
    rotation_trick: RotationTrick = False


class FSQQuantizerConfig(Strict):
    """Finite Scalar Quantization (Mentzer et al. 2023): each of len(levels) dimensions is bounded and
    rounded to levels[i] values; no codebook to learn or collapse, no auxiliary loss. code_dim vectors are
    projected to len(levels) dimensions and back (learned linear maps) unless code_dim == len(levels)."""

    kind: Literal["fsq"] = Field("fsq", description="quantizer kind: ema, loss or fsq")
    # >= 3: the library needs its symmetry-preserving variant for 2 levels; the paper's sets are all >= 5.
    levels: list[Annotated[int, Field(ge=3, le=MAX_COUNT)]] = Field(default_factory=lambda: [8, 5, 5, 5], min_length=1,
                                                      max_length=16, description=(
                                                          "values per dimension; codes = their product"))

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @model_validator(mode="after")
    def _fits(self) -> FSQQuantizerConfig:
        if self.codebook_size > MAX_CODEBOOK_SIZE:
            raise ValueError(f"levels {self.levels} make {self.codebook_size} codes; allowed: at most "
                             f"{MAX_CODEBOOK_SIZE} (e.g. [8, 8, 8, 6, 5] = 15360)")
        return self


QUANTIZER_CONFIGS: dict[str, type[Strict]] = {
    "ema": EMAQuantizerConfig, "loss": LossQuantizerConfig, "fsq": FSQQuantizerConfig}
"""Quantizer kind -> its settings (vqvae/quantizers builds the module for each kind)."""

QuantizerConfig = Annotated[EMAQuantizerConfig | LossQuantizerConfig | FSQQuantizerConfig,
                            Field(discriminator="kind")]

QUANTIZER_KINDS = Kinds("kind", QUANTIZER_CONFIGS)
"""``vqvae.quantizer.kind=K`` resets the quantizer to kind K's defaults (no setting carries over)."""


# ----- architectures: one kind each ---------------------------------------------------------------------
_ARCH = "VQ-VAE architecture: seed or improved"


class _Autoencoder(Strict):
    arch: str = Field(description=_ARCH)  # each kind narrows it to its own literal (the discriminator)
    # 1..8 stages (a down-sampling factor up to 256 = 2**8; image_size is at most 4096), widths >= 1.
    channels: list[Annotated[int, Field(ge=1, le=MAX_COUNT)]] = Field(
        default_factory=lambda: [32, 64, 128, 256, 256], min_length=1, max_length=8,
        description="seed: encoder conv widths (one stride-2 conv each); improved: widths of the down-sampling "
                    "stages. The image side shrinks by 2 ** len(channels) (improved: times patch_size)")
    code_dim: int = Field(64, ge=1, le=MAX_COUNT, description="width of each vector the quantizer takes")
    quantizer: QuantizerConfig = Field(default_factory=EMAQuantizerConfig, description=(
        "the quantizer, one of several kinds chosen by its kind (ema, loss, fsq)"))

    @property
    def codebook_size(self) -> int:
        """Codes the quantizer can emit: what the code shards, the prior and the metrics size themselves by."""
        return self.quantizer.codebook_size

    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.channels)


class ImprovedVQVAEConfig(_Autoencoder):
    """Residual conv encoder/decoder (GroupNorm + SiLU), a 1x1 projection to code_dim: one code per position."""

    arch: Literal["improved"] = Field("improved", description=_ARCH)
    res_blocks: int = Field(2, ge=0, le=MAX_COUNT, description="residual blocks per stage")
    patch_size: Literal[1, 2, 4] = Field(1, json_schema_extra=added_setting(1), description=(
        "1: a 3x3 stem conv and a last up-sampling stage at full resolution; 2 or 4: a cheap stem, nothing at full "
        "resolution: the encoder's first layer cuts patch_size x patch_size patches (a stride-patch_size conv) "
        "and the decoder's last layer gives each position's patch (depth-to-space). The image side shrinks by "
        "patch_size * 2 ** len(channels)"))

    @property
    def downsample_factor(self) -> int:
        return self.patch_size * 2 ** len(self.channels)


class SeedVQVAEConfig(_Autoencoder):
    """The report's model: one stride-2 conv per width, the last width split into r x r codes per position."""

    arch: Literal["seed"] = Field("seed", description=_ARCH)

    @model_validator(mode="after")
    def _square_split(self) -> SeedVQVAEConfig:
        per_position, rest = divmod(self.channels[-1], self.code_dim)
        if rest or math.isqrt(per_position) ** 2 != per_position:
            raise ValueError(
                f"vqvae.code_dim={self.code_dim} must split the last encoder width {self.channels[-1]} into a "
                "square number of codes (1, 4, 9, ...): the seed model lays the codes of each position out as "
                "an r×r block of the code grid")
        return self

    @property
    def codes_per_side(self) -> int:
        return math.isqrt(self.channels[-1] // self.code_dim)


VQVAE_CONFIGS: dict[str, type[Strict]] = {"improved": ImprovedVQVAEConfig, "seed": SeedVQVAEConfig}
"""VQ-VAE arch -> its settings (vqvae/models.py builds each)."""

VQVAEConfig = Annotated[ImprovedVQVAEConfig | SeedVQVAEConfig, Field(discriminator="arch")]

VQVAE_KINDS = Kinds("arch", VQVAE_CONFIGS, keep_shared=True)
"""``vqvae.arch=A`` keeps the widths, code_dim and quantizer; only the other arch's settings go."""

_VQVAE = TypeAdapter(VQVAEConfig)


def parse_vqvae_config(data: Any) -> ImprovedVQVAEConfig | SeedVQVAEConfig:
    """A ``vqvae`` section (a dict, e.g. from a config.json) validated as the kind its ``arch`` names."""
    return _VQVAE.validate_python(data)


# ----- training and encoding ----------------------------------------------------------------------------
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class AdversarialConfig(Strict):
    """VQGAN-style adversarial training of the VQ-VAE (vqvae/discriminator.py): a PatchGAN discriminator
    with the hinge loss, its generator term scaled by VQGAN's adaptive weight. Off by default."""

    enabled: bool = Field(False, description="train with a discriminator")
    start_step: int = Field(0, ge=0, le=MAX_COUNT, description=(
        "first step with a discriminator: before it the discriminator is neither trained nor used"))
    weight: float = Field(0.8, ge=0.0, description=(
        "times the adaptive weight ||grad L_rec|| / ||grad L_adv|| at the decoder's last layer"))
    ramp_steps: int = Field(0, ge=0, le=MAX_COUNT, description=(
        "the generator's adversarial weight rises linearly from 0 to full over this many steps from start_step "
        "(the discriminator trains at full rate from start_step); 0 = full at once, as VQGAN. A random critic "
        "at full adaptive weight pushes as hard as the reconstruction loss and can undo it"),
        json_schema_extra=added_setting(0))
    disc_layers: int = Field(3, ge=1, le=8, description="stride-2 convolutions of the discriminator")
    disc_channels: int = Field(64, ge=1, le=1024, description="width of the first; doubled per layer, up to 8x")
    lr: float | None = Field(None, gt=0.0, description="discriminator learning rate; null = vqvae_train.lr")
    betas: tuple[Beta, Beta] = Field((0.5, 0.9), description="Adam betas of the discriminator")


def discriminator_min_size(layers: int) -> int:
    """Smallest image side leaving the PatchGAN (vqvae/discriminator.py) one patch logit: ``layers``
    halvings, then two 4×4 stride-1 convs that each take one pixel off the side."""
    return 3 * 2**layers


class VQVAETrainConfig(OptimConfig):
    """``vqvae_train``: the settings every training shares, plus the VQ-VAE's adversarial option."""

    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig, description=(
        "VQGAN-style discriminator (off by default)"))

    @model_validator(mode="after")
    def _adversary_starts(self) -> VQVAETrainConfig:
        if self.adversarial.enabled and self.adversarial.start_step >= self.max_steps:
            raise ValueError(f"vqvae_train.adversarial.start_step={self.adversarial.start_step} is not below "
                             f"vqvae_train.max_steps={self.max_steps}, so the discriminator would never train; "
                             f"allowed: start_step < {self.max_steps}")
        return self


class EncodeConfig(Strict):
    """``encode``: image shards -> code shards with the trained VQ-VAE (vqvae/encode.py)."""

    batch_size: int = Field(64, gt=0, le=MAX_COUNT, description="images encoded at once")
    num_tasks: int = Field(2, gt=0, le=MAX_ARRAY_TASKS,
                           description="encode tasks (Slurm array size), each over a subset of shards",
                           json_schema_extra=NOT_IN_IDENTITY)  # one output per input shard, whichever task writes it
    train_views: Literal[1, 2, 4, 8] = Field(1, description=(
        "code grids per training image, each of another view of it (vqvae/encode.py VIEWS): 1 = as packed, "
        "2 = also mirrored, 4 = the four flips, 8 = every rotation by 90 degrees, mirrored or not. A dermoscopy "
        "image has no up or left, so each view is another real lesion for the prior: 8 views give it 8x the "
        "training grids. Validation and test splits keep one grid per image"), json_schema_extra=added_setting(1))
