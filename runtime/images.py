"""PNG grids of image tensors, written atomically (used by reconstructions, samples and previews)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from runtime.files import atomic_path

_LABEL_PAD = 6


def save_grid(images: torch.Tensor, path: Path, nrow: int, padding: int = 2,
              row_labels: Sequence[str] | None = None) -> Path:
    """``images``: N×3×H×W floats in [0, 1], laid out ``nrow`` per row; ``row_labels`` (one per row, e.g. the
    class names of a per-class sample grid) are written on a white margin left of their rows."""
    from torchvision.utils import make_grid  # imported here: torchvision's import costs ~1 s at start-up

    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=padding, pad_value=1.0)
    # Rounded as torchvision's save_image does.
    picture = Image.fromarray(grid.mul(255).add_(0.5).clamp_(0, 255).byte().permute(1, 2, 0).numpy())
    if row_labels:
        picture = _with_row_labels(picture, list(row_labels), images.shape[-2], padding)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path


def _with_row_labels(grid: Image.Image, labels: list[str], cell: int, padding: int) -> Image.Image:
    """``grid`` with a margin on its left holding ``labels[r]`` beside row r (PIL's default font)."""
    draw = ImageDraw.Draw(grid)
    width = int(max(draw.textlength(label) for label in labels)) + 2 * _LABEL_PAD
    out = Image.new("RGB", (grid.width + width, grid.height), "white")
    out.paste(grid, (width, 0))
    draw = ImageDraw.Draw(out)
    for row, label in enumerate(labels):
        _, text_top, _, text_bottom = draw.textbbox((0, 0), label)
        top = padding + row * (cell + padding) + (cell - text_bottom - text_top) // 2  # centred on the row
        draw.text((_LABEL_PAD, top), label, fill="black")
    return out
