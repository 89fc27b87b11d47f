"""The tokenizer: a trained VQ-VAE as images <-> code grids, loadable by itself.

    tokenizer = Tokenizer.from_pretrained("runs/smoke")      # run dir, its vqvae/ folder, or export/tokenizer/
    codes = tokenizer.encode(images)                         # B×3×H×W uint8/float tensors or PIL images
    images = tokenizer.decode(codes)                         # B×3×S×S floats in [0, 1]

Images are sized to the model's ``image_size`` as packing sizes them (shards.images.resized: bilinear, aspect
not kept). The encode stage encodes through :meth:`Tokenizer.encode`, so the API gives exactly its codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from runtime.pretrained import Pretrained, PretrainedError, load_verified
from shards.images import ImageRejected, resized, to_rgb
from vqvae.config import VQVAEConfig, parse_vqvae_config
from vqvae.models import build_vqvae

MODEL_TYPE = "lesion-vq-tokenizer"
_INTEGER = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

ImageBatch = Tensor | Image.Image | Sequence[Image.Image]
"""What :meth:`Tokenizer.encode` takes: a B×3×H×W (or 3×H×W) uint8 tensor (0..255) or floating tensor (0..1),
or PIL images."""


class ImageInputError(PretrainedError):
    """Images of a shape, dtype or range the tokenizer cannot use."""


def tokenizer_config(vqvae: VQVAEConfig, image_size: int) -> dict[str, Any]:
    """What a tokenizer folder's config.json holds besides the weights' hash and lineage."""
    grid = build_vqvae(vqvae).code_grid(image_size)
    return {"model_type": MODEL_TYPE, "vqvae": vqvae.model_dump(mode="json"), "image_size": image_size,
            "grid": list(grid), "codebook_size": vqvae.codebook_size}


def image_batch(images: ImageBatch, size: int) -> Tensor:
    """``images`` (see :data:`ImageBatch`) as a B×3×size×size float batch in [0, 1]; other sizes resized as packing
    resizes them (8-bit, bilinear, aspect not kept: a float image is rounded to 8 bits first)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, Sequence) and not isinstance(images, Tensor):
        if not images:
            raise ImageInputError("no images given")
        return torch.stack([_from_pil(img, i, size) for i, img in enumerate(images)])
    if not isinstance(images, Tensor):
        raise ImageInputError(f"images must be a tensor or PIL images, not {type(images).__name__}")
    batch = images[None] if images.dim() == 3 else images
    if batch.dim() != 4 or batch.shape[1] != 3 or batch.shape[0] == 0 or min(batch.shape[2:]) == 0:
        raise ImageInputError(f"images must be B×3×H×W (or 3×H×W) RGB, got shape {tuple(images.shape)}")
    if batch.dtype == torch.uint8:
        floats = batch.float() / 255
    elif batch.is_floating_point():
        floats = batch.float()
        if not torch.isfinite(floats).all() or floats.min() < 0 or floats.max() > 1:
            raise ImageInputError("float images must hold values in [0, 1] (uint8 images: 0..255), got "
                                  f"{floats.min().item():.3g}..{floats.max().item():.3g}")
    else:
        raise ImageInputError(f"images must be uint8 (0..255) or floating point (0..1), not {batch.dtype}")
    if tuple(batch.shape[2:]) == (size, size):
        return floats
    return torch.stack([_from_pil(Image.fromarray(image.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()), i,
                                  size) for i, image in enumerate(floats)])


def _from_pil(image: Any, index: int, size: int) -> Tensor:
    if not isinstance(image, Image.Image):
        raise ImageInputError(f"image {index} is a {type(image).__name__}, not a PIL image")
    try:
        rgb = resized(to_rgb(image, f"image {index}"), size)
    except ImageRejected as err:
        raise ImageInputError(str(err)) from None
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255


class CodeGrids:
    """What a model of code grids reads from its config: the codebook size and one image's grid."""

    config: dict[str, Any]

    @property
    def codebook_size(self) -> int:
        return int(self.config["codebook_size"])

    @property
    def grid(self) -> tuple[int, int]:
        """Height and width of one image's code grid."""
        return int(self.config["grid"][0]), int(self.config["grid"][1])


class Tokenizer(CodeGrids, Pretrained):
    """A VQ-VAE turned into a tokenizer: :meth:`encode` images to code grids, :meth:`decode` them back."""

    model_type: ClassVar[str] = MODEL_TYPE
    places: ClassVar[tuple[str, ...]] = ("vqvae/final", "export/tokenizer", "tokenizer")

    @classmethod
    def load(cls, folder: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Tokenizer:
        try:
            model = build_vqvae(parse_vqvae_config(config.get("vqvae")))
        except ValueError as err:
            raise PretrainedError(f"{folder / 'config.json'}: its vqvae section is not a VQ-VAE config: "
                                  f"{str(err).splitlines()[0]}") from None
        return cls(load_verified(model, folder, config), config, device, dtype)

    @property
    def image_size(self) -> int:
        """Side of the square images the model encodes (others are resized to it)."""
        return int(self.config["image_size"])

    def pixels(self, images: ImageBatch) -> Tensor:
        """``images`` as a B×3×S×S float batch in [0, 1] on the model's device (S = image_size)."""
        return image_batch(images, self.image_size).to(self.device, self.dtype)

    @torch.inference_mode()
    def encode(self, images: ImageBatch) -> Tensor:
        """B×Hc×Wc LongTensor code grids (on the model's device) of ``images`` (see :data:`ImageBatch`)."""
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            return self.model.encode(self.pixels(images))

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """B×3×S×S float images in [0, 1] from B×Hc×Wc (or Hc×Wc) code grids."""
        if not isinstance(codes, Tensor) or codes.dtype not in _INTEGER:
            raise ImageInputError(f"codes must be an integer tensor, not {getattr(codes, 'dtype', type(codes))}")
        batch = codes[None] if codes.dim() == 2 else codes
        if batch.dim() != 3 or tuple(batch.shape[1:]) != self.grid or len(batch) == 0:
            raise ImageInputError(f"codes must be B×{self.grid[0]}×{self.grid[1]} grids, got {tuple(codes.shape)}")
        if int(batch.min()) < 0 or int(batch.max()) >= self.codebook_size:
            raise ImageInputError(f"codes must lie in 0..{self.codebook_size - 1}, got {int(batch.min())}.."
                                  f"{int(batch.max())}")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            return self.model.decode_codes(batch.long().to(self.device)).float()
