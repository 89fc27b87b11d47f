"""Decoder-only causal transformer over the raster-ordered code grid (GPT-style, pre-norm).

The H×W grid is read as a sequence of H·W codes in raster order. Sequence slot t predicts code t;
its input is the class token at slot 0 and code t−1 after that, plus the learned row and column
embeddings of the position being predicted (t // W, t % W). Causal self-attention
(``scaled_dot_product_attention(is_causal=True)``) lets slot t see slots ≤ t only, i.e. the class and
codes strictly before t, so ``forward`` keeps the :class:`AutoregressivePrior` contract.

Class conditioning and classifier-free guidance: the class is one of ``num_classes + 1`` indices, the last
(:attr:`TransformerPrior.null_class`) meaning "no class". It enters twice: as the token at slot 0, and as
a per-class gain and shift of both LayerNorms in every block (conditional LayerNorm, the adaLN of DiT
without its MLP), so every position in every layer sees the class directly. With the class token alone,
class fidelity depended on attention carrying one slot's content to all 256 positions: in ``bench quality``
its samples were classified as their class at 1.3x chance, the gated PixelCNN's (class bias in every
layer) at 2.2x; with the conditional LayerNorms, both at 2.4x.

In training, ``label_dropout`` of the labels are replaced by the null class (drawn from torch's global
RNG, which the trainer seeds and checkpoints, so a run and its resumption drop the same labels), so one
model learns both p(codes | class) and p(codes). Sampling with guidance scale s runs the B conditional and
B null-class rows as one batch of 2B and draws from uncond + s·(cond − uncond).

:meth:`TransformerPrior.sample` keeps every block's keys and values (a KV cache), so each new code
costs one token's forward instead of a pass over the whole prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prior.base import AutoregressivePrior, draw


class KVCache:
    """Keys and values of one attention layer for every slot so far, preallocated for the whole
    sequence (appending by ``torch.cat`` would copy the cache at every step)."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.filled = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``, ``v`` (B×heads×T×head_dim) after the slots so far; returns all slots' keys/values."""
        if self.keys is None or self.values is None:  # allocated on first use: the dtype follows autocast
            shape = (k.shape[0], k.shape[1], self.length, k.shape[3])
            self.keys, self.values = k.new_empty(shape), v.new_empty(shape)
        end = self.filled + k.shape[2]
        self.keys[:, :, self.filled:end] = k
        self.values[:, :, self.filled:end] = v
        self.filled = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; with ``kv_heads < heads``, grouped-query attention: each group
    of ``heads / kv_heads`` query heads shares one key/value head, so the KV cache that sampling reads
    at every step is that many times smaller."""

    def __init__(self, d_model: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d_model // heads
        self.qkv = nn.Linear(d_model, d_model + 2 * kv_heads * self.head_dim)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split([width, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        q = q.view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        else:
            if length != 1:
                raise ValueError(f"the KV cache takes one new token per step, got {length}")
            k, v = cache.append(k, v)
            # The one query is the newest slot, so every cached slot is visible (no mask), and a group's
            # query heads can attend to their shared key/value head as one batch of queries (head h
            # uses key/value head h // group, as enable_gqa does above).
            group = self.heads // self.kv_heads
            y = F.scaled_dot_product_attention(q.reshape(batch, self.kv_heads, group, self.head_dim), k, v)
            y = y.reshape(batch, self.heads, 1, self.head_dim)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(cLN(x)), then x + MLP(cLN(x)), where cLN is a LayerNorm whose
    gain and shift are offset by learned per-class values (one embedding row per class index)."""

    def __init__(self, d_model: int, heads: int, kv_heads: int, class_indices: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, kv_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        # (gain1, shift1, gain2, shift2) offsets per class; zero at init, so training starts from plain LayerNorm.
        self.modulation = nn.Embedding(class_indices, 4 * d_model)

    def forward(self, x: Tensor, classes: Tensor, cache: KVCache | None = None) -> Tensor:
        """``classes``: B class indices, the same for every slot of a row."""
        gain1, shift1, gain2, shift2 = self.modulation(classes)[:, None].chunk(4, dim=-1)
        x = x + self.attn(self.norm1(x) * (1 + gain1) + shift1, cache)
        return x + self.mlp(self.norm2(x) * (1 + gain2) + shift2)


class TransformerPrior(AutoregressivePrior):
    def __init__(self, codebook_size: int, num_classes: int, *, conditional: bool, d_model: int, heads: int,
                 kv_heads: int, layers: int, label_dropout: float, max_grid_side: int) -> None:
        super().__init__(codebook_size, num_classes, conditional)
        self.label_dropout = label_dropout
        self.max_grid_side = max_grid_side
        # An unconditional model has only the null class (its start token).
        self.null_class = num_classes if conditional else 0
        self.class_embed = nn.Embedding(self.null_class + 1, d_model)
        self.embed = nn.Embedding(codebook_size, d_model)
        self.row_embed = nn.Embedding(max_grid_side, d_model)
        self.col_embed = nn.Embedding(max_grid_side, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, kv_heads, self.null_class + 1) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, codebook_size)
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        # GPT-2: N(0, 0.02) everywhere, residual-branch outputs scaled by 1/sqrt(2·layers) so the
        # residual stream's variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            for out in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(out.weight, std=0.02 / math.sqrt(2 * layers))

    def class_tokens(self, labels: Tensor | None, batch: int) -> Tensor:
        """Class-token indices (B): the labels (``null_class`` allowed, meaning unconditional), with
        ``label_dropout`` of them replaced by the null class in training mode; always the null class
        for an unconditional model."""
        labels = self._labels(labels, batch)
        device = self.class_embed.weight.device
        if labels is None:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        if self.training and self.label_dropout > 0:
            dropped = torch.rand(batch, device=labels.device) < self.label_dropout
            labels = labels.masked_fill(dropped, self.null_class)
        return labels

    def _positions(self, grid: tuple[int, int]) -> Tensor:
        """(H·W)×d_model: row + column embedding of every position in raster order."""
        height, width = grid
        if max(height, width) > self.max_grid_side:
            raise ValueError(f"code grid {height}x{width} exceeds max_grid_side={self.max_grid_side}, the "
                             "largest side this prior has position embeddings for")
        return (self.row_embed.weight[:height, None] + self.col_embed.weight[None, :width]).flatten(0, 1)

    def _logits(self, x: Tensor, classes: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x, classes, None if caches is None else caches[index])
        return self.head(self.norm(x))

    def forward(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        batch, height, width = codes.shape
        classes = self.class_tokens(labels, batch)
        # Slot t holds code t-1. The whole grid is embedded (the last code is never read) so that the
        # embedding's output, B×H×W×d, lines up with the grid for gradient-based causality checks.
        x = torch.cat([self.class_embed(classes)[:, None], self.embed(codes).flatten(1, 2)[:, :-1]], dim=1)
        x = x + self._positions((height, width))
        return self._logits(x, classes).view(batch, height, width, -1).permute(0, 3, 1, 2)

    @torch.inference_mode()
    def sample(self, n: int, grid: tuple[int, int], labels: Tensor | None, temperature: float,
               generator: torch.Generator, *, top_k: int = 0, top_p: float = 1.0,
               guidance_scale: float = 1.0) -> Tensor:
        """``n`` code grids, one token per step through the KV cache; draws as in
        :meth:`AutoregressivePrior.sample`. ``guidance_scale`` s ≠ 1 adds n null-class rows and draws from
        uncond + s·(cond − uncond) (s = 0: unconditional, s > 1: more class-typical)."""
        guided = guidance_scale != 1.0
        if guided and not self.conditional:
            raise ValueError(f"guidance scale {guidance_scale} needs a class-conditional prior; this one is "
                             "unconditional, allowed: 1.0")
        if guided and self.label_dropout == 0:
            raise ValueError(f"guidance scale {guidance_scale}: this prior was trained without label dropout, "
                             "so its null class (the unconditional model) was never learned; allowed: 1.0")
        device = self.head.weight.device
        was_training = self.training
        self.eval()
        tokens = self.class_tokens(None if labels is None else labels.to(device), n)
        if guided:  # rows n..2n-1: the same samples without their class
            tokens = torch.cat([tokens, torch.full_like(tokens, self.null_class)])
        positions = self._positions(grid)
        length = grid[0] * grid[1]
        caches = [KVCache(length) for _ in self.blocks]
        codes = torch.zeros(n, length, dtype=torch.long, device=device)
        x = self.class_embed(tokens)
        for t in range(length):
            logits = self._logits((x + positions[t])[:, None], tokens, caches)[:, 0]
            if guided:
                cond, uncond = logits.float().chunk(2)
                logits = uncond + guidance_scale * (cond - uncond)
            codes[:, t] = draw(logits, temperature, generator, top_k, top_p)
            x = self.embed(codes[:, t].repeat(2) if guided else codes[:, t])
        self.train(was_training)
        return codes.view(n, *grid)
