"""Settings of the prior (``prior``: one of several architectures, chosen by ``arch``) and of the sample stage
(``sample``).

Adding a prior kind: its settings class here (an ``arch`` literal, only its own fields, a description on
each), an entry in :data:`PRIOR_CONFIGS` and the :data:`PriorConfig` union, its module under prior/ (a subclass
of ``prior.base.AutoregressivePrior``) and one line in ``prior.models.PRIORS``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, TypeAdapter, model_validator

from runtime.schema import MAX_ARRAY_TASKS, MAX_COUNT, ClassBalance, Kinds, Seed, Strict, added_setting


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise ValueError(f"must be odd (a masked convolution needs a centre tap); allowed: 3, 5, 7, ... "
                         f"(got {value})")
    return value


_ARCH = "prior architecture: pixelcnn, gated or transformer"


class _Prior(Strict):
    """What every prior has."""

    arch: str = Field(description=_ARCH)  # each kind narrows it to its own literal (the discriminator)
    conditional: bool = Field(True, description="conditioned on the lesion class (else one model for all)")
    balance: ClassBalance = Field("none", description=(
        "class weights of the training loss, from the codes' train class counts (as classifier.balance): "
        "inverse trains every class's conditional model equally; none = the data's own mix (the report's). On "
        "HAM10000 inverse made the conditional transformer worse at everything: bits/code, sample Fréchet "
        "distance and class agreement (bench quality, docs/results.md)"))


class _PixelCNN(_Prior):
    filters: int = Field(120, gt=0, le=MAX_COUNT, description="channels")
    layers: int = Field(8, ge=1, le=MAX_COUNT, description="residual (pixelcnn) or gated (gated) layers")
    kernel_size: Annotated[int, Field(ge=3, le=MAX_COUNT), AfterValidator(_odd)] = Field(7, description=(
        "side of the masked convolutions (odd)"))
    embed_dim: int = Field(64, gt=0, le=MAX_COUNT, description="code embedding width")


class PixelCNNPriorConfig(_PixelCNN):
    """The report's masked PixelCNN: a 7x7 type-A convolution then residual blocks (it has the blind spot)."""

    arch: Literal["pixelcnn"] = Field("pixelcnn", description=_ARCH)


class GatedPriorConfig(_PixelCNN):
    """Gated PixelCNN with vertical + horizontal stacks (no blind spot)."""

    arch: Literal["gated"] = Field("gated", description=_ARCH)


class TransformerPriorConfig(_Prior):
    """Decoder-only causal transformer over the raster-ordered codes, sampled with a KV cache; label dropout
    gives it a null class for classifier-free guidance."""

    arch: Literal["transformer"] = Field("transformer", description=_ARCH)
    layers: int = Field(8, ge=1, le=MAX_COUNT, description="transformer blocks")
    d_model: int = Field(256, gt=0, le=MAX_COUNT, description="width of tokens and residual stream")
    heads: int = Field(8, gt=0, le=MAX_COUNT, description="attention heads (must divide d_model)")
    # 1 (multi-query attention) by default: sampling reads the whole KV cache at every step, and one
    # shared key/value head made KV-cache sampling 2.5x faster than 8 heads on CPU (bench sample).
    kv_heads: int = Field(1, ge=0, le=MAX_COUNT, description=(
        "key/value heads, each shared by heads / kv_heads query heads (1 = multi-query, "
        "1 < kv_heads < heads = grouped-query attention: a smaller KV cache, faster sampling); "
        "0 = heads (plain multi-head attention)"))
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0, description=(
        "conditional: fraction of training labels replaced by the null class, so one model "
        "also learns the unconditional distribution (classifier-free guidance needs it > 0)"))
    max_grid_side: int = Field(64, gt=0, le=MAX_COUNT, description=(
        "largest code-grid height/width (rows of the learned row and column embeddings)"))

    @model_validator(mode="after")
    def _shape(self) -> TransformerPriorConfig:
        if self.d_model % self.heads:
            raise ValueError(f"prior.d_model={self.d_model} is not divisible by prior.heads={self.heads} "
                             "(each head gets d_model / heads channels); allowed: heads dividing d_model")
        if self.kv_heads and self.heads % self.kv_heads:
            raise ValueError(f"prior.heads={self.heads} is not divisible by prior.kv_heads={self.kv_heads} "
                             "(each key/value head serves an equal group of query heads); allowed: 0 or "
                             "kv_heads dividing heads")
        return self

    @property
    def guidance(self) -> bool:
        """Whether it learns the null class classifier-free guidance needs."""
        return self.conditional and self.label_dropout > 0


PRIOR_CONFIGS: dict[str, type[Strict]] = {
    "pixelcnn": PixelCNNPriorConfig, "gated": GatedPriorConfig, "transformer": TransformerPriorConfig}
"""Prior arch -> its settings (prior/models.py builds each)."""

PriorConfig = Annotated[PixelCNNPriorConfig | GatedPriorConfig | TransformerPriorConfig, Field(discriminator="arch")]

PRIOR_KINDS = Kinds("arch", PRIOR_CONFIGS, keep_shared=True)
"""``prior.arch=A`` keeps layers, conditional and balance; the other arch's own settings go."""

_PRIOR = TypeAdapter(PriorConfig)


def parse_prior_config(data: Any) -> PixelCNNPriorConfig | GatedPriorConfig | TransformerPriorConfig:
    """A ``prior`` section (a dict, e.g. from a config.json) validated as the kind its ``arch`` names."""
    return _PRIOR.validate_python(data)


MIN_TEMPERATURE = 1e-3


def _usable_temperature(value: float) -> float:
    # logits / temperature overflows float32 for tiny temperatures: softmax gives NaN, sampling fails.
    if value < MIN_TEMPERATURE:
        raise ValueError(f"must be at least {MIN_TEMPERATURE} (smaller values overflow the logits to "
                         f"inf and sampling fails); got {value}")
    return value


Temperature = Annotated[float, Field(gt=0.0), AfterValidator(_usable_temperature)]


class SampleConfig(Strict):
    """``sample``: code grids drawn from the prior and decoded by the VQ-VAE (prior/sample.py)."""

    per_class: int = Field(4, gt=0, le=MAX_COUNT // 7, description=(
        "samples per class (class_mix=uniform), or on average over the classes (class_mix=data): "
        "per_class x classes samples in all"))
    class_mix: Literal["uniform", "data", "top_up"] = Field("uniform", description=(
        "uniform: per_class samples of every class; data: the classes in the train split's proportions, at "
        "least min_per_class of each class it holds (the model's own marginal, which a Fréchet distance "
        "against real images measures; the evaluate stage weights samples to the real images' mix either way); "
        "top_up: top_up_to minus the train split's count of every class it holds, none where that is 0 or less "
        "(a synthetic data set that evens out a class-imbalanced one; per_class is not used)"))
    top_up_to: int = Field(0, ge=0, le=MAX_COUNT // 7, description=(
        "class_mix=top_up: the number of train images (real + synthetic) every class is topped up to"),
        json_schema_extra=added_setting(0))
    min_per_class: int = Field(1, ge=0, le=MAX_COUNT // 7, description=(
        "class_mix=data: samples of every class the train split holds, however rare (each class's agreement "
        "rate needs some)"))
    temperature: Temperature = Field(1.0, description="logits are divided by it before each draw")
    top_k: int = Field(0, ge=0, le=MAX_COUNT, description="draw only among the k most likely codes; 0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description=(
        "draw only among the most likely codes holding this much probability (nucleus); 1 = off"))
    guidance_scale: float = Field(1.0, ge=0.0, description=(
        "classifier-free guidance: logits = uncond + s * (cond - uncond); 1 = plain conditional, "
        "0 = unconditional; transformer prior only"))
    batch_size: int = Field(32, gt=0, le=MAX_COUNT, description="grids drawn at once (the draws depend on it)")
    num_tasks: int = Field(2, gt=0, le=MAX_ARRAY_TASKS,
                           description="sampling tasks (Slurm array size), each with its own seed")
    seed: Seed = 0

    @model_validator(mode="after")
    def _minimum_fits(self) -> SampleConfig:
        if self.class_mix == "data" and self.min_per_class > self.per_class:
            raise ValueError(f"sample.min_per_class={self.min_per_class} exceeds sample.per_class={self.per_class} "
                             "(the average per class), so the total cannot hold it; allowed: 0..per_class")
        if self.class_mix == "top_up" and self.top_up_to == 0:
            raise ValueError("sample.class_mix=top_up needs sample.top_up_to > 0 (the count every class is topped "
                             "up to)")
        return self
