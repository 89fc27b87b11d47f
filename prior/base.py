"""The base class every autoregressive prior subclasses: label handling and raster-order sampling.

Priors map codes B×H×W (LongTensor) and optional class labels B to logits B×K×H×W, where the
logits at (i, j) may depend only on codes strictly before (i, j) in raster order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AutoregressivePrior(nn.Module):
    """Shared label handling and raster-order ancestral sampling; subclasses implement ``forward``."""

    def __init__(self, codebook_size: int, num_classes: int, conditional: bool) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.num_classes = num_classes
        self.conditional = conditional

    def forward(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def _labels(self, labels: Tensor | None, batch: int) -> Tensor | None:
        """Labels to condition on: None for an unconditional model (labels are ignored there)."""
        if not self.conditional:
            return None
        if labels is None or labels.shape != (batch,):
            raise ValueError(f"a class-conditional prior needs labels of shape ({batch},), got "
                             f"{None if labels is None else tuple(labels.shape)}")
        return labels

    @torch.inference_mode()
    def sample(self, n: int, grid: tuple[int, int], labels: Tensor | None, temperature: float,
               generator: torch.Generator) -> Tensor:
        """``n`` code grids drawn position by position in raster order, all ``n`` in one batch.

        Draws use ``generator`` (on the generator's own device, so a CPU generator gives the same
        grids on any accelerator). The model is put in eval mode for the duration (BatchNorm).
        """
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        codes = torch.zeros(n, *grid, dtype=torch.long, device=device)
        if labels is not None:
            labels = labels.to(device)
        for i in range(grid[0]):
            for j in range(grid[1]):
                # Row i depends only on rows <= i, so the rows below are skipped (halves the cost).
                logits = self(codes[:, : i + 1], labels)[:, :, i, j].float() / temperature
                probs = torch.softmax(logits, dim=1).to(generator.device)
                codes[:, i, j] = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
        self.train(was_training)
        return codes

