"""Settings of the judge: its classifier (``classifier``) and the evaluate stage (``evaluate``)."""

from __future__ import annotations

from pydantic import Field

from runtime.schema import MAX_COUNT, ClassBalance, Strict


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
