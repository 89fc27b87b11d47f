"""The base class every autoregressive prior subclasses: label handling and raster-order sampling.

Priors map codes B×H×W (LongTensor) and optional class labels B to logits B×K×H×W, where the
logits at (i, j) may depend only on codes strictly before (i, j) in raster order.

:func:`draw` is the one place that turns next-code logits into codes (temperature, top-k, top-p,
then a multinomial draw from the caller's generator); every prior's sampler goes through it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``logits`` (rows × K) with the codes outside the top ``top_k`` and outside the top-``top_p``
    nucleus set to -inf. ``top_k=0`` and ``top_p=1`` switch the respective filter off.

    The nucleus is the smallest set of most likely codes whose probability reaches ``top_p``: a code
    is kept when the codes strictly more likely than it hold less than ``top_p`` of the mass, so the
    most likely code always survives.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        drop_ordered = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_ordered).scatter(-1, order, drop_ordered)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(logits: Tensor, temperature: float, generator: torch.Generator, top_k: int = 0,
         top_p: float = 1.0) -> Tensor:
    """One code per row of ``logits`` (rows × K), drawn with ``generator``.

    The softmax and the draw run on the generator's device, so a CPU generator gives the same codes
    whichever device computed the logits.
    """
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=1)
    return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(logits.device)


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
               generator: torch.Generator, *, top_k: int = 0, top_p: float = 1.0,
               guidance_scale: float = 1.0) -> Tensor:
        """``n`` code grids drawn position by position in raster order, all ``n`` in one batch.

        Each position is drawn by :func:`draw` (temperature, top-k, top-p) with ``generator``. The
        model is put in eval mode for the duration (BatchNorm). ``guidance_scale`` must stay 1 here:
        classifier-free guidance needs a model trained with a null class (the transformer prior).
        """
        if guidance_scale != 1.0:
            raise ValueError(f"guidance scale {guidance_scale}: classifier-free guidance needs a prior trained "
                             f"with a null class (the transformer); the {type(self).__name__} prior has none; "
                             "allowed: 1.0")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        codes = torch.zeros(n, *grid, dtype=torch.long, device=device)
        if labels is not None:
            labels = labels.to(device)
        for i in range(grid[0]):
            for j in range(grid[1]):
                # Row i depends only on rows <= i, so the rows below are skipped (halves the cost).
                logits = self(codes[:, : i + 1], labels)[:, :, i, j]
                codes[:, i, j] = draw(logits, temperature, generator, top_k, top_p)
        self.train(was_training)
        return codes
