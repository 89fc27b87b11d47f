"""VQ-VAE: encoder → quantizer (any kind of vqvae/quantizers) → decoder, for the report's ``seed`` and the
``improved`` arch.

Both architectures share one model class; they differ in the encoder/decoder stacks and in how
many code vectors one latent position holds:

* ``improved``: the encoder ends in a 1x1 projection to ``code_dim``: one code per position, code
  grid = image_size / (patch_size * 2**len(channels)) on each side.
* ``seed`` (the report): the 256-channel latent (8×8 for 256 px) is viewed as B×H×W×C and split
  into C / code_dim = 4 vectors of 64 per position (4096 vectors for a batch of 16). For the prior,
  the r² = 4 codes of position (i, j) are laid out on a single-code grid by depth-to-space:
  chunk k → (r·i + k // r, r·j + k % r), i.e. (2i + k//2, 2j + k%2), so the seed code grid is 16×16
  for 256 px. :meth:`VQVAE.encode` and :meth:`VQVAE.decode_codes` use exactly this mapping and its
  inverse.

Parameter count of the seed model: 3,512,387 (encoder 1,739,936 + decoder 1,739,683 + one 512×64
codebook 32,768). The report prints 3,545,155 = 3,512,387 + 32,768, i.e. exactly one extra 512×64
table: the report's model evidently registered a second codebook (e.g. an unused nn.Embedding)
that none of the layers it describes account for. :func:`count_parameters` counts one codebook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from vqvae.blocks import improved_decoder, improved_encoder, seed_decoder, seed_encoder
from vqvae.config import ImprovedVQVAEConfig, SeedVQVAEConfig, VQVAEConfig
from vqvae.quantizers import Quantizer, VectorQuantizer, build_quantizer


@dataclass
class VQOutput:
    recon: Tensor
    """B×3×H×W reconstruction in [0, 1] (sigmoid output)."""
    loss: Tensor
    """The quantiser's loss terms only; the trainer adds the reconstruction loss."""
    codes: Tensor
    """B×Hc×Wc LongTensor on the single-code grid."""
    stats: dict[str, Tensor]
    """Scalars for logging: perplexity, codes_used, and the kind's own (ema/loss: commitment_loss, dead_codes, ...)."""


class VQVAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, quantizer: Quantizer,
                 downsample: int, codes_per_side: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.quantizer = quantizer
        self.downsample = downsample
        self.codes_per_side = codes_per_side  # r: each latent position holds r×r codes (seed 2, improved 1)
        self.codebook_size = quantizer.codebook_size

    def code_grid(self, image_size: int) -> tuple[int, int]:
        if image_size % self.downsample:
            raise ValueError(f"image size {image_size} is not a multiple of the down-sampling "
                             f"factor {self.downsample}")
        side = image_size // self.downsample * self.codes_per_side
        return side, side

    @property
    def last_layer(self) -> Tensor:
        """Weight of the decoder's output convolution (VQGAN's adaptive weight compares gradients there)."""
        convs = [m for m in self.decoder.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
        return convs[-1].weight

    def forward(self, x: Tensor) -> VQOutput:
        z = self.encoder(x)
        b, c, h, w = z.shape
        out = self.quantizer(self._to_vectors(z))
        latent = out.quantized.view(b, h, w, c).permute(0, 3, 1, 2)
        codes = self._to_grid(out.indices.view(b, h, w, self.codes_per_side ** 2))
        return VQOutput(self.decoder(latent), out.loss, codes, out.stats)

    def encode(self, x: Tensor) -> Tensor:
        """B×Hc×Wc code indices. Never touches the codebook and never communicates, so one rank may
        encode alone; call it in eval mode (the seed encoder's BatchNorm)."""
        z = self.encoder(x)
        b, _, h, w = z.shape
        return self._to_grid(self.quantizer.nearest(self._to_vectors(z)).view(b, h, w, self.codes_per_side ** 2))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Images in [0, 1] from a B×Hc×Wc grid of code indices (the inverse layout of :meth:`encode`)."""
        per_position = self._from_grid(codes)  # B×H×W×r²
        b, h, w, _ = per_position.shape
        vectors = self.quantizer.indices_to_vectors(per_position)  # B×H×W×r²×D
        return self.decoder(vectors.reshape(b, h, w, -1).permute(0, 3, 1, 2))

    # ----- layout helpers -------------------------------------------------------------------------
    def _to_vectors(self, z: Tensor) -> Tensor:
        """B×C×H×W latent → (B·H·W·C/D)×D vectors; each position's channels split into consecutive chunks."""
        return z.permute(0, 2, 3, 1).reshape(-1, self.quantizer.dim)

    def _to_grid(self, codes: Tensor) -> Tensor:
        """B×H×W×r² → B×rH×rW by depth-to-space: chunk k of (i, j) → (r·i + k//r, r·j + k%r)."""
        b, h, w, _ = codes.shape
        r = self.codes_per_side
        return codes.view(b, h, w, r, r).permute(0, 1, 3, 2, 4).reshape(b, h * r, w * r)

    def _from_grid(self, grid: Tensor) -> Tensor:
        """Inverse of :meth:`_to_grid`."""
        b, hr, wr = grid.shape
        r = self.codes_per_side
        return grid.view(b, hr // r, r, wr // r, r).permute(0, 1, 3, 2, 4).reshape(b, hr // r, wr // r, r * r)


def _improved(cfg: ImprovedVQVAEConfig, quantizer: Quantizer) -> VQVAE:
    return VQVAE(improved_encoder(cfg.channels, cfg.res_blocks, cfg.code_dim, cfg.patch_size),
                 improved_decoder(cfg.channels, cfg.res_blocks, cfg.code_dim, cfg.patch_size), quantizer,
                 cfg.downsample_factor, codes_per_side=1)


def _seed(cfg: SeedVQVAEConfig, quantizer: Quantizer) -> VQVAE:
    return VQVAE(seed_encoder(cfg.channels), seed_decoder(cfg.channels), quantizer, cfg.downsample_factor,
                 codes_per_side=cfg.codes_per_side)


ARCHS: dict[str, Callable[[Any, Quantizer], VQVAE]] = {"improved": _improved, "seed": _seed}
"""VQ-VAE arch (vqvae.config.VQVAE_CONFIGS) -> builder from its settings and a built quantizer."""


def build_vqvae(cfg: VQVAEConfig) -> VQVAE:
    return ARCHS[cfg.arch](cfg, build_quantizer(cfg.quantizer, cfg.code_dim))


def count_parameters(model: nn.Module) -> int:
    """Learned numbers: all parameters plus any EMA codebook (a buffer, learned by averaging
    instead of gradients), so kinds ema and loss both count the codebook exactly once (fsq's implicit
    codebook is fixed, not learned)."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, VectorQuantizer) and module.mode == "ema":
            total += module.embedding.numel()
    return total
