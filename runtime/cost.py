"""What a model costs to run: multiply-accumulates (MACs) of one forward pass, counted by PyTorch itself.

``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of matrix products and convolutions (attention
included) as 2 per multiply-accumulate; normalisation, activations and other element-wise work are not counted,
so a layer that is cheap in MACs can still be slow where it runs at full resolution (bench/ measures time).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def forward_macs(model: nn.Module, *inputs: Any) -> int:
    """MACs of ``model(*inputs)`` in eval mode without gradients (no state changes: an EMA codebook, BatchNorm
    statistics and k-means initialisation stay as they are); the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
