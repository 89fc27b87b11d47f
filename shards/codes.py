"""Code shards (written by vqvae/encode.py and prior/sample.py): storing code grids and their checked reading."""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from shards.loader import class_label, declared, make_eval_loader
from shards.manifest import ManifestError
from shards.stream import SampleRefused

# int16 before uint16: both take 2 bytes, and earlier versions wrote int16 up to 32,768 codes.
_CODE_DTYPES = (np.uint8, np.int16, np.uint16, np.int32)


def code_dtype(codebook_size: int) -> np.dtype:
    """The smallest integer type holding codes 0..codebook_size-1: uint8 up to 256 codes, int16 up to 32,768,
    uint16 up to 65,536 (the largest codebook the config allows), then int32."""
    for dtype in _CODE_DTYPES:
        if codebook_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"codebook_size {codebook_size} does not fit int32")


def codes_npy(codes: np.ndarray, codebook_size: int) -> bytes:
    """One code grid as ``.npy`` bytes in :func:`code_dtype` (read back with ``allow_pickle=False``)."""
    buf = io.BytesIO()
    np.save(buf, codes.astype(code_dtype(codebook_size)), allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class CodeDecoder:
    """codes.npy + cls → {"codes": long H×W, "label", "key"}. ``allow_pickle=False``: a shard never runs code.

    The codebook size and grid come from the split's manifest (:meth:`for_split`, done by the loaders):
    every grid must have that shape, codes in 0..codebook_size-1 (any integer dtype) and a class in
    0..len(CLASSES)-1; others are refused and counted, never handed to an embedding lookup.
    """

    codebook_size: int = 0
    grid: tuple[int, int] = (0, 0)
    allowed: frozenset[str] = frozenset({"codes.npy", "cls", "json"})

    def for_split(self, split_dir: Path, manifest: dict[str, Any]) -> CodeDecoder:
        size = declared(split_dir, manifest, "codebook_size", 2)
        if "grid" not in manifest:
            raise ManifestError(f"{Path(split_dir) / 'manifest.json'} declares no code grid; is {split_dir} a "
                                "code shard folder (written by vqvae/encode.py)?")
        if self.codebook_size not in (0, size):
            raise ManifestError(f"{split_dir} holds codes of a {size}-code codebook (its manifest), but "
                                f"{self.codebook_size} were expected")
        return replace(self, codebook_size=size, grid=(int(manifest["grid"][0]), int(manifest["grid"][1])))

    def empty(self) -> dict[str, torch.Tensor]:
        return {"codes": torch.empty(0, *self.grid, dtype=torch.long), "label": torch.empty(0, dtype=torch.long)}

    def __call__(self, key: str, members: dict[str, bytes], epoch: int) -> dict[str, Any]:
        if not self.codebook_size:
            raise TypeError("CodeDecoder used before for_split(): it cannot check codes without the manifest")
        if "codes.npy" not in members or "cls" not in members:
            raise ValueError(f"needs a codes.npy and a cls member; has {sorted(members)}")
        codes = np.load(io.BytesIO(members["codes.npy"]), allow_pickle=False)
        if codes.ndim != 2 or codes.dtype.kind not in "iu":
            raise SampleRefused(f"codes.npy must be a 2-d integer grid, got {codes.dtype} {codes.shape}")
        if codes.shape != self.grid:
            raise SampleRefused(f"code grid is {codes.shape[0]}x{codes.shape[1]}, but the split holds "
                                f"{self.grid[0]}x{self.grid[1]} grids (its manifest)")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.codebook_size:
            raise SampleRefused(f"codes span {low}..{high}, outside 0..{self.codebook_size - 1} "
                                f"(codebook_size {self.codebook_size} in the manifest)")
        return {"codes": torch.from_numpy(codes.astype(np.int64)), "label": class_label(members["cls"]), "key": key}


def make_code_eval_loader(split_dir: Path, *, batch_size: int, max_batches: int | None = None) -> DataLoader:
    return make_eval_loader(split_dir, batch_size=batch_size, max_batches=max_batches, decode=CodeDecoder())
