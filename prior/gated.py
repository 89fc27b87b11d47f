"""Gated PixelCNN (van den Oord et al., 2016, "Conditional Image Generation with PixelCNN Decoders").

Two stacks remove the masked PixelCNN's blind spot:

* the vertical stack sees every row strictly above: its input is shifted down one row, and its
  (k//2+1)×k convs only look at the current (shifted) row and rows above, across ±k//2 columns;
* the horizontal stack sees the current row strictly to the left: its input is shifted right one
  column and its 1×(k//2+1) convs only look left; at each layer it also receives the vertical
  stack's features at the same position (which summarise only rows above).

Each layer uses gated units tanh(a)·σ(b), a residual connection and a skip output in the horizontal
stack, and (when conditional) a learned per-class bias on both stacks' gate pre-activations. With
enough layers (layers·(k//2) ≥ grid side − 1) each position depends on every earlier code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prior.base import AutoregressivePrior


def _gate(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    def __init__(self, filters: int, kernel_size: int, num_classes: int | None, *, last: bool = False) -> None:
        super().__init__()
        self.pad = kernel_size // 2
        self.v_conv = nn.Conv2d(filters, 2 * filters, (self.pad + 1, kernel_size))
        self.h_conv = nn.Conv2d(filters, 2 * filters, (1, self.pad + 1))
        self.v_to_h = nn.Conv2d(2 * filters, 2 * filters, 1)
        # The last layer's horizontal output feeds nothing (only its skip does): no parameters there, or DDP
        # fails on parameters that never receive a gradient.
        self.h_res = None if last else nn.Conv2d(filters, filters, 1)
        self.h_skip = nn.Conv2d(filters, filters, 1)
        self.class_bias = nn.Embedding(num_classes, 4 * filters) if num_classes is not None else None

    def forward(self, v: Tensor, h: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        p = self.pad
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0)))  # rows i-p..i, columns j-p..j+p
        h_pre = self.h_conv(F.pad(h, (p, 0, 0, 0)))  # columns j-p..j of row i
        if self.class_bias is not None and labels is not None:
            v_bias, h_bias = self.class_bias(labels)[:, :, None, None].chunk(2, dim=1)
            v_pre = v_pre + v_bias
            h_pre = h_pre + h_bias
        gated = _gate(h_pre + self.v_to_h(v_pre))
        h_out = h if self.h_res is None else h + self.h_res(gated)
        return _gate(v_pre), h_out, self.h_skip(gated)


class GatedPixelCNN(AutoregressivePrior):
    def __init__(self, codebook_size: int, num_classes: int, *, conditional: bool, embed_dim: int,
                 filters: int, layers: int, kernel_size: int) -> None:
        super().__init__(codebook_size, num_classes, conditional)
        self.embed = nn.Embedding(codebook_size, embed_dim)
        self.project = nn.Conv2d(embed_dim, filters, 1)  # 1×1: position-local, causality is untouched
        self.layers = nn.ModuleList(
            GatedLayer(filters, kernel_size, num_classes if conditional else None, last=i == layers - 1)
            for i in range(layers)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(filters, filters, 1), nn.ReLU(),
                                  nn.Conv2d(filters, codebook_size, 1))

    def forward(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        labels = self._labels(labels, codes.shape[0])
        x = self.project(self.embed(codes).permute(0, 3, 1, 2))
        v = F.pad(x, (0, 0, 1, 0))[:, :, :-1]  # down-shift: row i holds row i-1
        h = F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]  # right-shift: column j holds column j-1
        skip = torch.zeros_like(x)
        for layer in self.layers:
            v, h, s = layer(v, h, labels)
            skip = skip + s
        return self.head(skip)
