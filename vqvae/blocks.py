"""Encoder/decoder stacks for the two VQ-VAE architectures.

``seed_*`` rebuild the course report's network layer for layer; ``improved_*`` are the residual
GroupNorm stacks. Every builder returns a plain ``nn.Sequential`` so the model class stays generic.
"""

from __future__ import annotations

from itertools import pairwise

from torch import Tensor, nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups but at least 4 channels per group (small widths stay stable).

    GroupNorm rather than BatchNorm: no running statistics, so DDP ranks never need buffer sync
    for normalisation and a batch of 1 normalises the same as a batch of 64.
    """
    groups = 32
    while groups > 1 and (channels % groups or channels // groups < 4):
        groups //= 2
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(SiLU(GN(conv(SiLU(GN(x))))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )
        # Zero-initialised last conv: every block starts as the identity, so a deep stack trains
        # from step one like a shallow one.
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def seed_encoder(channels: list[int]) -> nn.Sequential:
    """The report's encoder: 4x4 stride-2 pad-1 convs 3→c0→…→cN; BN+ReLU after all but the last,
    plain ReLU after the last (so the latent is non-negative, as in the report)."""
    layers: list[nn.Module] = []
    widths = [3, *channels]
    for i, (cin, cout) in enumerate(pairwise(widths)):
        layers.append(nn.Conv2d(cin, cout, 4, stride=2, padding=1))
        if i < len(channels) - 1:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def seed_decoder(channels: list[int]) -> nn.Sequential:
    """The report's decoder: 4x4 stride-2 pad-1 transposed convs mirroring the encoder down to 3
    channels (256→256→128→64→32→3 for the seed widths), BN+ReLU after all but the last, sigmoid out."""
    layers: list[nn.Module] = []
    widths = [*channels[::-1], 3]
    for i, (cin, cout) in enumerate(pairwise(widths)):
        layers.append(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
        if i < len(channels) - 1:
            layers += [nn.BatchNorm2d(cout), nn.ReLU()]
    layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def improved_encoder(channels: list[int], res_blocks: int, code_dim: int, patch_size: int = 1) -> nn.Sequential:
    """Stem (3x3 conv, or with ``patch_size`` > 1 a patch_size x patch_size stride-patch_size conv: a linear map of
    each patch, so no layer runs at full resolution), then per width one 4x4 stride-2 conv followed by
    ``res_blocks`` residual blocks, then GN+SiLU and a 1x1 projection to ``code_dim`` (one code vector per
    position)."""
    stem = nn.Conv2d(3, channels[0], 3, padding=1) if patch_size == 1 else \
        nn.Conv2d(3, channels[0], patch_size, stride=patch_size)
    layers: list[nn.Module] = [stem]
    prev = channels[0]
    for width in channels:
        layers.append(nn.Conv2d(prev, width, 4, stride=2, padding=1))
        layers += [ResBlock(width) for _ in range(res_blocks)]
        prev = width
    layers += [group_norm(prev), nn.SiLU(), nn.Conv2d(prev, code_dim, 1)]
    return nn.Sequential(*layers)


def improved_decoder(channels: list[int], res_blocks: int, code_dim: int, patch_size: int = 1) -> nn.Sequential:
    """Mirror of :func:`improved_encoder`; up-sampling is nearest ×2 + 3x3 conv (no checkerboard
    artefacts from transposed convs); with ``patch_size`` > 1 the last conv gives each position's patch_size x
    patch_size patch (depth-to-space); output squashed to [0, 1] by a sigmoid."""
    widths = channels[::-1]
    layers: list[nn.Module] = [nn.Conv2d(code_dim, widths[0], 3, padding=1)]
    for i, width in enumerate(widths):
        layers += [ResBlock(width) for _ in range(res_blocks)]
        nxt = widths[i + 1] if i + 1 < len(widths) else channels[0]
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, nxt, 3, padding=1)]
    layers += [group_norm(channels[0]), nn.SiLU(), nn.Conv2d(channels[0], 3 * patch_size**2, 3, padding=1)]
    if patch_size > 1:  # only then: patch_size 1 keeps the layer indices (state-dict keys) of older weights
        layers.append(nn.PixelShuffle(patch_size))
    layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)
