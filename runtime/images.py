"""PNG grids of image tensors, written atomically (used by reconstructions, samples and previews)."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from runtime.files import atomic_path


def save_grid(images: torch.Tensor, path: Path, nrow: int, padding: int = 2) -> Path:
    """``images``: N×3×H×W floats in [0, 1], laid out ``nrow`` per row."""
    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=padding, pad_value=1.0)
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")
    return path
