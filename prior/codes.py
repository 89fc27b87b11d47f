"""Reading code shards (written by vqvae/encode.py) and comparing code histograms."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from shards.loader import make_eval_loader


class CodeDecoder:
    """codes.npy + cls → {"codes": long H×W, "label", "key"}. ``allow_pickle=False``: a shard never runs code."""

    allowed = frozenset({"codes.npy", "cls", "json"})

    def __call__(self, key: str, members: dict[str, bytes], epoch: int) -> dict[str, Any]:
        codes = np.load(io.BytesIO(members["codes.npy"]), allow_pickle=False)
        if codes.ndim != 2 or codes.dtype.kind not in "iu":
            raise ValueError(f"codes.npy must be a 2-d integer grid, got {codes.dtype} {codes.shape}")
        return {"codes": torch.from_numpy(codes.astype(np.int64)), "label": int(members["cls"]), "key": key}


def make_code_eval_loader(split_dir: Path, *, batch_size: int, max_batches: int | None = None) -> DataLoader:
    return make_eval_loader(split_dir, batch_size=batch_size, max_batches=max_batches, decode=CodeDecoder())


def code_histogram_kl(data_counts: torch.Tensor, sample_counts: torch.Tensor, eps: float = 1e-6) -> float:
    """KL(data || samples) in bits between two code histograms (smoothed so unseen codes stay finite)."""
    p = data_counts.double() + eps
    q = sample_counts.double() + eps
    p, q = p / p.sum(), q / q.sum()
    return float((p * (p / q).log2()).sum())
