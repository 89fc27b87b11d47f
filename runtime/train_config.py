"""Settings every training shares (``vqvae_train``, ``prior_train``, ``classifier_train``; runtime/trainer.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from runtime.schema import MAX_COUNT, NOT_IN_IDENTITY, Seed, Strict, added_setting


class OptimConfig(Strict):
    """Optimisation, data loading and bookkeeping of one training stage."""

    batch_size: int = Field(16, gt=0, le=MAX_COUNT, description="per process")
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate (Adam)")
    weight_decay: float = Field(0.0, ge=0.0, description="decoupled weight decay (AdamW); 0 = plain Adam")
    schedule: Literal["constant", "cosine"] = Field("constant", description=(
        "learning rate after warm-up: constant, or cosine decay to 0 at max_steps"))
    warmup_steps: int = Field(0, ge=0, le=MAX_COUNT, description="steps of linear warm-up from 0 to lr")
    max_steps: int = Field(300, gt=0, le=MAX_COUNT, description="optimizer steps of the whole training")
    grad_clip: float = Field(0.0, ge=0.0, description="gradient norm clipped to this; 0 = off")
    checkpoint_every: int = Field(100, gt=0, le=MAX_COUNT, description="steps between checkpoints (resume points)",
                                  json_schema_extra=NOT_IN_IDENTITY)
    eval_every: int = Field(100, gt=0, le=MAX_COUNT,
                            description="steps between validations", json_schema_extra=NOT_IN_IDENTITY)
    log_every: int = Field(10, gt=0, le=MAX_COUNT, description="steps between logged training metrics",
                           json_schema_extra=NOT_IN_IDENTITY)
    eval_batches: int = Field(8, gt=0, le=MAX_COUNT, description="validation batches per validation",
                              json_schema_extra=NOT_IN_IDENTITY)
    num_workers: int = Field(1, ge=0, le=MAX_COUNT, description="DataLoader worker processes per training process",
                             json_schema_extra=NOT_IN_IDENTITY)
    prefetch_factor: int = Field(2, ge=1, le=MAX_COUNT, description="batches each loader worker prepares ahead",
                                 json_schema_extra=NOT_IN_IDENTITY)
    decode_on: Literal["auto", "workers", "device"] = Field("auto", description=(
        "where training images are decoded and augmented: workers (CPU loader processes), device (the "
        "training process, batched: nvJPEG on a GPU), auto = workers everywhere until `python -m bench gpu` "
        "has passed on a real GPU and its numbers are in docs/results.md (docs/gpu.md: the device path has "
        "never run on a GPU)"))
    gpu_path: Literal["auto", "always"] = Field("auto", description=(
        "the GPU path's speed-ups: fused Adam, channels-last model and batches, pinned loader memory; auto = on "
        "CUDA only, always = on any device, so a CPU runs the same branches (tests, `python -m bench gpu` "
        "without a GPU); slower on a CPU, and not bitwise equal to auto there"),
        json_schema_extra=added_setting("auto"))
    shuffle_buffer: int = Field(256, ge=1, le=MAX_COUNT, description="window of the epoch order shuffled together")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast dtype of the forward pass")
    seed: Seed = 0
    augment: bool = Field(True, description="random flips/rotations of training images")

    def gpu_path_on(self, device_type: str) -> bool:
        """Whether a run on ``device_type`` ("cuda", "cpu") takes the GPU path's branches (see ``gpu_path``)."""
        return self.gpu_path == "always" or device_type == "cuda"
