"""Settings of the data stage (``data``): where images come from, how they are split and packed into shards."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from runtime.schema import MAX_COUNT, NOT_IN_IDENTITY, Seed, Strict, UserPath

CLASSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
"""The seven ISIC 2018 / HAM10000 diagnosis classes, in ISIC 2018 column order (class index = position)."""


class DataConfig(Strict):
    """``data``: synthetic lesions or real ISIC images, split by lesion and packed into WebDataset shards."""

    source: Literal["synthetic", "isic"] = Field("synthetic", description=(
        "synthetic: procedural lesions made here; isic: real images from data.isic_images"))
    # Where the inputs are, not what they are: their content is in the data stage's input fingerprint.
    isic_images: UserPath | None = Field(None, description="folder of ISIC JPEG/PNG images (source=isic)",
                                         json_schema_extra=NOT_IN_IDENTITY)
    isic_csv: UserPath | None = Field(None, description="metadata CSV; omit for class sub-folders",
                                      json_schema_extra=NOT_IN_IDENTITY)
    num_images: int = Field(700, gt=0, le=MAX_COUNT, description="synthetic images to generate")
    image_size: int = Field(64, ge=16, le=4096, description="square size images are stored at in shards")
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="share of lesions in the validation split")
    test_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="share of lesions in the held-out test split")
    shard_max_count: int = Field(256, gt=0, le=MAX_COUNT, description="images per shard at most")
    shard_max_bytes: int = Field(256 * 2**20, gt=1024, le=2**62, description="bytes per shard at most")
    jpeg_quality: int = Field(95, ge=50, le=100, description="JPEG quality images are stored at in shards")
    hair_probability: float = Field(0.5, ge=0.0, le=1.0, description="synthetic: share of lesions drawn with hair")
    seed: Seed = 0
    workers: int = Field(0, ge=0, le=MAX_COUNT,
                         description="packing processes; 0 = all cores", json_schema_extra=NOT_IN_IDENTITY)
