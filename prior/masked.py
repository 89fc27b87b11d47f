"""The report's PixelCNN: masked 7×7 type-A conv, residual masked blocks, 1×1 type-B output conv.

Kept as in the report, with two deliberate departures (the report's own bugs):

* Input: the report fed one-hot code vectors and *regressed* them with MSE; here code indices are
  embedded (nn.Embedding) and the K output channels are logits for cross-entropy on the indices.
* The report gives no kernel size for the residual blocks; they use ``kernel_size`` like the first layer.

Known limitations, kept on purpose because this is the seed baseline:

* Blind spot: stacked masked convolutions never see the up-right region of a position (e.g. the
  row above, more than ``layers × kernel_size // 2`` columns to the right), however deep the stack.
* BatchNorm in training mode normalises with statistics over all positions, future ones included —
  a tiny information leak during training; in eval mode (and when sampling) the model is exactly causal.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from prior.base import AutoregressivePrior


class MaskedConv2d(nn.Conv2d):
    """Same-padded conv whose kernel is zeroed at and after the centre in raster order.

    Type A also zeroes the centre (first layer: a position must not see its own code); type B keeps
    it (later layers: the centre feature already only summarises earlier codes).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask_type: str) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        centre = kernel_size // 2
        mask = self.weight.new_ones(kernel_size, kernel_size)
        mask[centre, centre + (mask_type == "B"):] = 0
        mask[centre + 1:] = 0
        # Derived from the type, not learned: not saved in checkpoints.
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class ResidualMaskedBlock(nn.Module):
    def __init__(self, filters: int, kernel_size: int) -> None:
        super().__init__()
        self.body = nn.Sequential(MaskedConv2d(filters, filters, kernel_size, "B"), nn.BatchNorm2d(filters),
                                  nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class PixelCNN(AutoregressivePrior):
    def __init__(self, codebook_size: int, num_classes: int, *, conditional: bool, embed_dim: int,
                 filters: int, layers: int, kernel_size: int) -> None:
        super().__init__(codebook_size, num_classes, conditional)
        self.embed = nn.Embedding(codebook_size, embed_dim)
        self.first = MaskedConv2d(embed_dim, filters, kernel_size, "A")
        # Conditioning (not in the report): a per-class bias after the first conv, a per-image
        # constant, so it cannot break causality.
        self.class_bias = nn.Embedding(num_classes, filters) if conditional else None
        self.first_act = nn.Sequential(nn.BatchNorm2d(filters), nn.ReLU())
        self.blocks = nn.Sequential(*(ResidualMaskedBlock(filters, kernel_size) for _ in range(layers)))
        self.out = MaskedConv2d(filters, codebook_size, 1, "B")

    def forward(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        labels = self._labels(labels, codes.shape[0])
        h = self.first(self.embed(codes).permute(0, 3, 1, 2))
        if self.class_bias is not None and labels is not None:
            h = h + self.class_bias(labels)[:, :, None, None]
        return self.out(self.blocks(self.first_act(h)))
