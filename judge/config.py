"""Settings of the judge: its classifier (``classifier``) and the evaluate stage (``evaluate``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from runtime.schema import MAX_COUNT, NOT_IN_IDENTITY, ClassBalance, Seed, Strict
from shards.config import CLASSES


class ClassifierConfig(Strict):
    """The judge: a small lesion classifier trained on the real train split (judge/), whose penultimate
    features give Fréchet distances without pretrained weights."""

    width: int = Field(32, ge=4, le=512, description="channels of the first of four stride-2 conv blocks")
    balance: ClassBalance = Field("inverse", description=(
        "class weights of the judge's loss, from the train split's class counts: inverse = 1/count (every "
        "class weighs the same in total), sqrt = 1/sqrt(count), none = plain cross-entropy; real lesion "
        "sets are mostly NV, and an unweighted judge calls nearly every sample NV"))


class EvaluateConfig(Strict):
    """``evaluate``: reconstructions and samples judged against real images (judge/evaluate.py)."""

    batch_size: int = Field(64, gt=0, le=MAX_COUNT, description="images judged at once")
    max_images: int = Field(2000, gt=1, le=MAX_COUNT,
                            description="validation images (and train images for the floor) used")


ARMS = ("real", "synthetic", "augmented")
"""The augment stage's arms: the real train split alone, plus the sample stage's synthetic images, or with the
standard augmentation (the report's rotations and flips, plus colour jitter)."""


class AugmentConfig(Strict):
    """``augment``: whether the synthetic lesions help a classifier (judge/augment.py). Fresh classifiers of the
    judge's recipe (``classifier``, ``classifier_train``: architecture, loss, batch size, learning rate) are trained
    in three arms on the real train split: real only, real + synthetic, real with standard augmentation; each
    over several seeds, and judged on the real test split only."""

    seeds: int = Field(3, ge=1, le=100, description=(
        "trainings of each arm, with seeds seed, seed + 1, ...; differences are paired by seed"))
    seed: Seed = 0
    max_steps: int = Field(0, ge=0, le=MAX_COUNT, description=(
        "optimizer steps of each training; 0 = classifier_train.max_steps (the judge's); the cost grows as "
        "3 arms x seeds x max_steps"))
    classes: list[Literal["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]] = Field(
        default_factory=lambda: list(CLASSES), min_length=1, description=(
            "classes whose synthetic images the real + synthetic arm adds (the others' are left out)"))
    per_class: int = Field(0, ge=0, le=MAX_COUNT, description=(
        "synthetic images of each class added at most (the first ones by sample index); 0 = all the sample "
        "stage's data set holds (set its size with sample.class_mix / sample.per_class / sample.top_up_to)"))
    jitter: float = Field(0.2, ge=0.0, lt=1.0, description=(
        "augmented arm: brightness, contrast and saturation each scaled by a factor drawn from [1 - jitter, "
        "1 + jitter], after the rotation and flips"))
    bootstrap: int = Field(1000, ge=100, le=100_000, description=(
        "bootstrap resamples of the test images for the confidence intervals of the paired differences"))
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="level of the bootstrap confidence intervals")
    batch_size: int = Field(64, gt=0, le=MAX_COUNT, description="test images classified at once",
                            json_schema_extra=NOT_IN_IDENTITY)

    @field_validator("classes")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists a class twice: {value}")
        return value
