"""VQGAN-style adversarial training parts: a PatchGAN discriminator, hinge losses, the adaptive weight.

The discriminator (pix2pix's N-layer PatchGAN, as VQGAN uses it) maps B×3×H×W images to B×1×h×w logits,
one per overlapping patch, so it judges local texture rather than the global layout the codes carry.
It uses GroupNorm where VQGAN uses BatchNorm: no running statistics, so the generator's pass through the
plain (un-wrapped) module changes no state and DDP ranks never need buffer broadcasts for it.

Losses (Esser et al. 2021, taming-transformers):

- discriminator: hinge, ``0.5 * (mean(relu(1 - D(real))) + mean(relu(1 + D(fake))))``;
- generator: ``-mean(D(fake))``, scaled by the adaptive weight
  ``||grad_w L_rec|| / (||grad_w L_adv|| + 1e-4)`` at the decoder's last layer weight ``w``, clamped to
  [0, 1e4] and detached, so the adversarial gradient there is as large as the reconstruction one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vqvae.blocks import group_norm

MAX_WIDTH_FACTOR = 8
"""Widths double per stride-2 layer up to this multiple of the first (pix2pix's cap)."""


class PatchDiscriminator(nn.Module):
    """``layers`` 4×4 stride-2 convs (LeakyReLU 0.2, GroupNorm after all but the first), one 4×4 stride-1
    conv, then a 4×4 stride-1 conv to one logit per patch. A 64-px image with 3 layers gives 6×6 logits."""

    def __init__(self, layers: int = 3, channels: int = 64) -> None:
        super().__init__()
        width = channels
        stack: list[nn.Module] = [nn.Conv2d(3, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, layers + 1):
            prev, width = width, channels * min(2**i, MAX_WIDTH_FACTOR)
            stride = 2 if i < layers else 1  # the last widening conv keeps the resolution (pix2pix)
            # No bias before a norm: the norm's shift replaces it.
            stack += [nn.Conv2d(prev, width, 4, stride=stride, padding=1, bias=False), group_norm(width),
                      nn.LeakyReLU(0.2)]
        stack.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*stack)
        for module in self.modules():  # DCGAN / VQGAN initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (what the decoder's sigmoid emits), mapped to VQGAN's input range [-1, 1]."""
        return self.net(images * 2.0 - 1.0)


def batch_mean(x: Tensor) -> Tensor:
    """sum / max(n, 1): a batch emptied by damaged shards still takes part in the DDP step, with a zero
    loss instead of a NaN (as the reconstruction loss does)."""
    return x.sum() / max(x.numel(), 1)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (batch_mean(torch.relu(1.0 - logits_real)) + batch_mean(torch.relu(1.0 + logits_fake)))


def generator_loss(logits_fake: Tensor) -> Tensor:
    return -batch_mean(logits_fake)


def adaptive_weight(rec_loss: Tensor, adv_loss: Tensor, last_layer: Tensor) -> Tensor:
    """VQGAN's lambda: gradient norms of both losses at ``last_layer``, clamped to [0, 1e4], detached.

    Both graphs are kept (``retain_graph``): the total loss is back-propagated through them afterwards.
    Under DDP each rank uses its own lambda; the gradients DDP averages are then those of each rank's
    total loss, so the ranks still take identical steps."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return torch.clamp(rec_grad.norm() / (adv_grad.norm() + 1e-4), 0.0, 1e4).detach()
