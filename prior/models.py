"""Autoregressive priors over VQ-VAE code grids, and :func:`build_prior`.

All priors map codes B×H×W (LongTensor) and optional class labels B to logits B×K×H×W, where the
logits at (i, j) may depend only on codes strictly before (i, j) in raster order. Train them with
``F.cross_entropy(logits, codes)``; :meth:`AutoregressivePrior.sample` draws new grids.

* ``pixelcnn`` (:mod:`prior.masked`): the report's masked PixelCNN, blind spot included.
* ``gated`` (:mod:`prior.gated`): Gated PixelCNN with vertical + horizontal stacks, no blind spot.
* ``transformer`` (:mod:`prior.transformer`): causal transformer over the raster-ordered codes, with
  label dropout (classifier-free guidance) and KV-cache sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prior.base import AutoregressivePrior
from prior.config import PriorConfig
from prior.gated import GatedPixelCNN
from prior.masked import PixelCNN
from prior.transformer import TransformerPrior


def _pixelcnn(model: type[AutoregressivePrior]) -> Callable[[Any, int, int], AutoregressivePrior]:
    def build(cfg: Any, codebook_size: int, num_classes: int) -> AutoregressivePrior:
        return model(codebook_size, num_classes, conditional=cfg.conditional, embed_dim=cfg.embed_dim,
                     filters=cfg.filters, layers=cfg.layers, kernel_size=cfg.kernel_size)
    return build


def _transformer(cfg: Any, codebook_size: int, num_classes: int) -> AutoregressivePrior:
    return TransformerPrior(codebook_size, num_classes, conditional=cfg.conditional, d_model=cfg.d_model,
                            heads=cfg.heads, kv_heads=cfg.kv_heads or cfg.heads, layers=cfg.layers,
                            label_dropout=cfg.label_dropout, max_grid_side=cfg.max_grid_side)


PRIORS: dict[str, Callable[[Any, int, int], AutoregressivePrior]] = {
    "pixelcnn": _pixelcnn(PixelCNN), "gated": _pixelcnn(GatedPixelCNN), "transformer": _transformer}
"""Prior arch (prior.config.PRIOR_CONFIGS) -> builder from its settings, the codebook size and the classes."""


def build_prior(cfg: PriorConfig, codebook_size: int, num_classes: int) -> AutoregressivePrior:
    return PRIORS[cfg.arch](cfg, codebook_size, num_classes)
