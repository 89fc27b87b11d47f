"""Quantizers behind one interface (:class:`Quantizer`), one module per kind, built by kind name.

``QUANTIZERS`` maps each kind of ``vqvae.config.QUANTIZER_CONFIGS`` to a builder taking that kind's
settings and the vector width ``code_dim``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vqvae.config import EMAQuantizerConfig, FSQQuantizerConfig, LossQuantizerConfig, QuantizerConfig
from vqvae.quantizers.base import Quantizer, QuantizerOutput
from vqvae.quantizers.codebook import VectorQuantizer
from vqvae.quantizers.fsq import FSQuantizer

__all__ = ["QUANTIZERS", "FSQuantizer", "Quantizer", "QuantizerOutput", "VectorQuantizer", "build_quantizer"]


def _ema(cfg: EMAQuantizerConfig, dim: int) -> Quantizer:
    return VectorQuantizer(cfg.codebook_size, dim, cfg.commitment, mode="ema", decay=cfg.decay,
                           dead_code_threshold=cfg.dead_code_threshold, kmeans_init=cfg.kmeans_init,
                           lookup_dim=cfg.lookup_dim, rotation_trick=cfg.rotation_trick)


def _loss(cfg: LossQuantizerConfig, dim: int) -> Quantizer:
    # The usage EMA behind the dead_codes statistic keeps VectorQuantizer's defaults (decay 0.99, threshold 1).
    return VectorQuantizer(cfg.codebook_size, dim, cfg.commitment, mode="loss", kmeans_init=cfg.kmeans_init,
                           lookup_dim=cfg.lookup_dim, rotation_trick=cfg.rotation_trick)


def _fsq(cfg: FSQQuantizerConfig, dim: int) -> Quantizer:
    return FSQuantizer(cfg.levels, dim)


QUANTIZERS: dict[str, Callable[[Any, int], Quantizer]] = {"ema": _ema, "loss": _loss, "fsq": _fsq}


def build_quantizer(cfg: QuantizerConfig, dim: int) -> Quantizer:
    return QUANTIZERS[cfg.kind](cfg, dim)
