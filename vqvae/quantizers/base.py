"""The interface every quantizer kind implements, and the output it returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class QuantizerOutput:
    quantized: Tensor
    """N×D, the quantized vectors, with straight-through gradients to the input."""
    indices: Tensor
    """N, LongTensor of code indices in 0..codebook_size-1."""
    loss: Tensor
    """The quantizer's own loss terms (0-d); zero for a kind without any."""
    stats: dict[str, Tensor]
    """Scalars for logging; every rank returns the same keys (the trainer averages them across ranks)."""


class Quantizer(nn.Module, ABC):
    """Maps N×D vectors to codes 0..codebook_size-1 and back.

    ``forward`` in training mode may update state; if it does, it is a collective under
    torch.distributed (every rank calls it once per step) that leaves every rank with identical state.
    :meth:`nearest` and :meth:`indices_to_vectors` change nothing and never communicate, so one rank can
    encode a dataset or decode a prior's code grids on its own.
    """

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        """Width D of the vectors it takes and gives back."""

    @abstractmethod
    def forward(self, z: Tensor) -> QuantizerOutput: ...

    @abstractmethod
    def nearest(self, z: Tensor) -> Tensor:
        """N code indices (long) for the N×D ``z``: the indices ``forward`` gives in eval mode."""

    @abstractmethod
    def indices_to_vectors(self, indices: Tensor) -> Tensor:
        """Code vectors, shape ``indices.shape + (D,)``: the quantized vectors of those codes."""


def usage_stats(counts: Tensor) -> dict[str, Tensor]:
    """Perplexity and the fraction of codes used, from per-code counts."""
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return {"perplexity": entropy.exp(), "codes_used": (counts > 0).float().mean()}
