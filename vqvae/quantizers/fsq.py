"""Quantizer kind ``fsq``: Finite Scalar Quantization (Mentzer et al. 2023) via vector-quantize-pytorch.

Each vector is projected to len(levels) dimensions (a learned linear map, absent when D == len(levels)),
each dimension bounded by tanh and rounded to one of levels[i] values (straight-through gradients), and
projected back to D. The codebook is implicit, prod(levels) fixed grid points: nothing is learned but the
projections, so there is no codebook to collapse, no auxiliary loss and no restart.

Distributed: forward changes no state and communicates nothing. Its only state is the projections'
weights (parameters, whose gradients DDP all-reduces) and constant buffers (the levels and the implicit
codebook, computed from ``levels`` alone), so ranks cannot diverge. Deterministic: no randomness at all
(the library's noise dropout stays off).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vqvae.quantizers.base import Quantizer, QuantizerOutput, usage_stats


class FSQuantizer(Quantizer):
    def __init__(self, levels: list[int], dim: int) -> None:
        super().__init__(math.prod(levels), dim)
        # Imported here: the library pulls in einx, about a second per process, which stages using other
        # quantizer kinds need not pay.
        from vector_quantize_pytorch import FSQ

        self.fsq = FSQ(levels=list(levels), dim=dim)

    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        # float32 also under autocast: rounding bf16 values would put vectors in the wrong bin.
        with torch.autocast(z.device.type, enabled=False):
            quantized, indices = self.fsq(z.float()[None])  # the library takes batch × sequence × D
        return quantized[0], indices[0].long()

    def forward(self, z: Tensor) -> QuantizerOutput:
        quantized, indices = self._quantize(z)
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        return QuantizerOutput(quantized, indices, z.new_zeros((), dtype=torch.float32), usage_stats(counts))

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        return self._quantize(z)[1]

    def indices_to_vectors(self, indices: Tensor) -> Tensor:
        with torch.autocast(indices.device.type, enabled=False):
            # Flat: the library treats 3+-d indices as an image and moves the channels first.
            vectors = self.fsq.indices_to_codes(indices.reshape(-1))
        return vectors.view(*indices.shape, self.dim)
