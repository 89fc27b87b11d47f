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

from prior.base import AutoregressivePrior
from prior.gated import GatedPixelCNN
from prior.masked import PixelCNN
from prior.transformer import TransformerPrior
from runtime.config import PriorConfig


def build_prior(cfg: PriorConfig, codebook_size: int, num_classes: int) -> AutoregressivePrior:
    if cfg.arch == "transformer":
        return TransformerPrior(codebook_size, num_classes, conditional=cfg.conditional, d_model=cfg.d_model,
                                heads=cfg.heads, kv_heads=cfg.kv_heads or cfg.heads, layers=cfg.layers,
                                label_dropout=cfg.label_dropout, max_grid_side=cfg.max_grid_side)
    model = GatedPixelCNN if cfg.arch == "gated" else PixelCNN
    return model(codebook_size, num_classes, conditional=cfg.conditional, embed_dim=cfg.embed_dim,
                 filters=cfg.filters, layers=cfg.layers, kernel_size=cfg.kernel_size)
