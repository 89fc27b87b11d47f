"""Quantizer kinds ``loss`` (the report's loss-trained codebook) and ``ema`` (a DDP-consistent EMA codebook).

Distributed contract (mode ``ema``, and the usage statistics of mode ``loss``): a training-mode
forward is a *collective* — every rank must call it, once per step, in the same order. After it
returns, every rank holds bitwise the same codebook buffers:

* per-step code counts and vector sums are all-reduced (SUM) before the EMA update, so the update
  is the one a single process would make on the concatenation of all ranks' batches;
* dead-code restarts and the data/k-means initialisation are computed on rank 0 from a pool of
  encoder outputs all-gathered from every rank, then broadcast from rank 0.

That is also why DDP's default ``broadcast_buffers=True`` is harmless here: at each forward DDP
copies rank 0's buffers to every rank, which changes nothing because they are already equal. Had
the statistics *not* been all-reduced, each rank would update its EMA from its own batch and DDP
would then silently overwrite every rank's buffers with rank 0's — the codebook would learn from
rank 0's shard of the data only, with no error anywhere.

Evaluation-mode forwards (and :meth:`nearest`) communicate nothing and change no state, so a
single rank can encode a dataset on its own.

Options of both modes: ``lookup_dim`` (factorised codes: the codebook, its EMA statistics, k-means and restarts
all live in the projected, l2-normalised space; the projections are parameters, so DDP all-reduces their
gradients like any other) and ``rotation_trick`` (another gradient, the same forward values and state).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.seeding import derive_seed
from vqvae.quantizers.base import Quantizer, QuantizerOutput, usage_stats


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_rows(x: Tensor) -> Tensor:
    """Concatenate every rank's rows in rank order; ranks may hold different row counts."""
    if not _distributed():
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    # all_gather needs equal shapes: pad to the largest rank, trim afterwards.
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])


def _is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _broadcast_from_rank0(*tensors: Tensor) -> None:
    if _distributed():
        for t in tensors:
            dist.broadcast(t, src=0)


def squared_distances(z: Tensor, codebook: Tensor) -> Tensor:
    """N×K squared Euclidean distances, via the expansion ‖z‖² − 2 z·e + ‖e‖² (one matmul)."""
    return (z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.t() + codebook.pow(2).sum(1)).clamp_min_(0)


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means from a random subset of ``x``; returns (centroids k×D, cluster sizes k).

    An empty cluster keeps its previous centroid; the EMA dead-code restart deals with it later.
    """
    n = x.shape[0]
    pick = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)
    centroids = x[pick.to(x.device)].clone()
    for _ in range(iters):
        assign = squared_distances(x, centroids).argmin(1)
        sizes = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1)[:, None], centroids)
    sizes = torch.bincount(squared_distances(x, centroids).argmin(1), minlength=k).to(x.dtype)
    return centroids, sizes


class VectorQuantizer(Quantizer):
    """Nearest-neighbour quantiser of N×D vectors onto a K×D codebook; its loss is codebook (mode ``loss``
    only) + ``commitment`` × commitment loss.

    mode ``loss`` (the report): the codebook is a parameter trained by the codebook loss
    ‖sg[z] − e‖² plus ``commitment`` × ‖z − sg[e]‖², straight-through gradients to the encoder.
    mode ``ema``: the codebook is a buffer, the exponential moving average of the vectors assigned
    to each code (Laplace-smoothed counts); only the commitment loss reaches the encoder. Codes whose
    EMA cluster size falls below ``dead_code_threshold`` are restarted on random encoder outputs.
    ``kmeans_init`` replaces the random codebook by k-means on the first training batch.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        commitment: float = 0.25,
        mode: Literal["loss", "ema"] = "ema",
        decay: float = 0.99,
        dead_code_threshold: float = 1.0,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        eps: float = 1e-5,
        lookup_dim: int = 0,
        rotation_trick: bool = False,
    ) -> None:
        super().__init__(codebook_size, dim)
        if mode not in ("loss", "ema"):
            raise ValueError(f"quantizer mode {mode!r} unknown; allowed: loss, ema")
        self.commitment = commitment
        self.mode = mode
        self.decay = decay
        self.dead_code_threshold = dead_code_threshold
        self.kmeans_iters = kmeans_iters
        self.eps = eps
        self.rotation_trick = rotation_trick
        self.normalized = lookup_dim > 0
        width = lookup_dim or dim  # of the codebook: the space codes are looked up in
        self.embedding: Tensor
        if mode == "loss":
            # The reference VQ-VAE's nn.Embedding initialisation, uniform(±1/K).
            weight = torch.empty(codebook_size, width).uniform_(-1 / codebook_size, 1 / codebook_size)
            self.embedding = nn.Parameter(weight)
        else:
            self.register_buffer("embedding", torch.randn(codebook_size, width))
            self.register_buffer("embed_sum", self.embedding.clone())
        # EMA of per-step usage: drives the EMA update and restarts (ema) and the dead-code statistic
        # (both modes). Starts at 1 so that embed_sum / cluster_size == embedding.
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        # Integer buffers (not bool) so every backend can broadcast them. Saved in checkpoints, so a
        # resumed run neither re-initialises the codebook nor repeats a restart's random draws.
        self.register_buffer("initialized", torch.tensor(0 if kmeans_init else 1))
        self.register_buffer("step", torch.tensor(0))
        if self.normalized:  # only then: without lookup_dim the module and its state dict are as before
            self.project_in = nn.Linear(dim, lookup_dim)
            self.project_out = nn.Linear(lookup_dim, dim)

    # ----- the lookup space (factorised codes: projected and l2-normalised) ------------------------------
    def _to_lookup(self, z: Tensor) -> Tensor:
        return F.normalize(self.project_in(z), dim=-1) if self.normalized else z

    def _from_lookup(self, v: Tensor) -> Tensor:
        return self.project_out(v) if self.normalized else v

    def codebook(self) -> Tensor:
        """K code vectors in the lookup space (l2-normalised with ``lookup_dim``; on unit vectors the squared
        distance is 2 - 2 cos, so the nearest code is the most cosine-similar one)."""
        return F.normalize(self.embedding, dim=-1) if self.normalized else self.embedding

    def _assign(self, v: Tensor) -> Tensor:
        return squared_distances(v, self.codebook().float()).argmin(1)

    # ----- pure lookups (no state change, no communication) ----------------------------------------
    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        """Index of the nearest code for each row of the N×D ``z``."""
        # float32 also under autocast (encoding on GPU): bf16 distances can pick another code than training did.
        with torch.autocast(z.device.type, enabled=False):
            return self._assign(self._to_lookup(z.float()))

    def indices_to_vectors(self, indices: Tensor) -> Tensor:
        return self._from_lookup(self.codebook()[indices])

    # ----- forward ---------------------------------------------------------------------------------
    def forward(self, z: Tensor) -> QuantizerOutput:
        # Distances and EMA statistics in float32 even under autocast: bf16 sums of thousands of
        # vectors would visibly drift the codebook.
        with torch.autocast(z.device.type, enabled=False):
            z = self._to_lookup(z.float())
            if self.training and not bool(self.initialized):
                self._data_init(z.detach())
            with torch.no_grad():
                indices = self._assign(z)
            codes = self.codebook()[indices]
            # Sum / max(n, 1): a batch emptied by damaged shards gives zero loss, not NaN.
            n = max(z.numel(), 1)
            commitment_loss = F.mse_loss(z, codes.detach(), reduction="sum") / n
            # Mode ema moves the codebook by averaging, not by gradients: no codebook loss.
            codebook_loss = F.mse_loss(codes, z.detach(), reduction="sum") / n if self.mode == "loss" \
                else z.new_zeros(())
            loss = codebook_loss + self.commitment * commitment_loss
            counts = torch.bincount(indices, minlength=self.codebook_size).float()
            restarted = torch.zeros((), device=z.device)
            if self.training:
                counts, restarted = self._update(z.detach(), indices, counts)
            quantized = self._from_lookup(self._gradient_path(z, codes.detach()))
        stats = {
            "commitment_loss": commitment_loss.detach(),
            "codebook_loss": codebook_loss.detach(),
            **usage_stats(counts),
            "dead_codes": (self.cluster_size < self.dead_code_threshold).sum().float(),
            "restarted_codes": restarted,
        }
        return QuantizerOutput(quantized, indices, loss, stats)

    def _gradient_path(self, z: Tensor, codes: Tensor) -> Tensor:
        """The codes' values with a gradient to ``z``: copied (straight-through), or by the rotation trick
        (vector-quantize-pytorch's ``rotate_to``: a pure function of its inputs, so it keeps this module's
        determinism and distributed contract). Added as ``r - sg(r)`` so the forward value is the code itself,
        bit for bit, as :meth:`indices_to_vectors` gives it."""
        if not self.rotation_trick:
            return z + (codes - z).detach()
        from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to  # pulls in einx: only when used

        rotated = rotate_to(z, codes)
        return codes + (rotated - rotated.detach())

    # ----- training-mode state updates (collective under torch.distributed) ------------------------
    @torch.no_grad()
    def _data_init(self, z: Tensor) -> None:
        pool = _all_gather_rows(z)
        if pool.shape[0] == 0:  # no data on any rank yet: initialise on the next batch
            return
        if _is_rank0():
            generator = torch.Generator().manual_seed(derive_seed("vq-kmeans-init", self.codebook_size))
            centroids, sizes = kmeans(pool, self.codebook_size, self.kmeans_iters, generator)
            self.embedding.copy_(centroids)
            self.cluster_size.copy_(sizes)
            if self.mode == "ema":
                self.embed_sum.copy_(centroids * sizes[:, None])
        self._broadcast_state()
        self.initialized.fill_(1)

    @torch.no_grad()
    def _update(self, z: Tensor, indices: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """EMA step on the all-reduced statistics; returns (global counts, number of restarted codes)."""
        if self.mode == "ema":
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, z)
            stats = torch.cat([counts[:, None], sums], 1)  # one all-reduce for both
        else:
            stats = counts[:, None]
        if _distributed():
            dist.all_reduce(stats)
        counts = stats[:, 0]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        restarted = torch.zeros((), device=z.device)
        if self.mode == "ema":
            self.embed_sum.mul_(self.decay).add_(stats[:, 1:], alpha=1 - self.decay)
            # Laplace smoothing keeps a code with a near-zero count from dividing by ~0.
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
            self.embedding.copy_(self.embed_sum / smoothed[:, None])
            restarted = self._restart_dead_codes(z)
        self.step.add_(1)
        return counts, restarted

    def _restart_dead_codes(self, z: Tensor) -> Tensor:
        # cluster_size is identical on every rank, so every rank takes the same branch here.
        dead = self.cluster_size < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return torch.zeros((), device=z.device)
        pool = _all_gather_rows(z)
        if pool.shape[0] == 0:  # every rank's batch was empty; the gathered pool is the same everywhere
            return torch.zeros((), device=z.device)
        if _is_rank0():
            # Seeded by the step counter (a checkpointed buffer): a resumed run draws the same vectors.
            generator = torch.Generator().manual_seed(derive_seed("vq-restart", int(self.step)))
            if pool.shape[0] >= n_dead:
                pick = torch.randperm(pool.shape[0], generator=generator)[:n_dead]
            else:
                pick = torch.randint(pool.shape[0], (n_dead,), generator=generator)
            self.embedding[dead] = pool[pick.to(pool.device)]
            # A restarted code counts as one vector's worth of usage: it must attract data at once
            # or it is restarted again.
            self.cluster_size[dead] = 1.0
            self.embed_sum[dead] = self.embedding[dead]
        self._broadcast_state()
        return torch.tensor(float(n_dead), device=z.device)

    def _broadcast_state(self) -> None:
        state = [self.embedding.data, self.cluster_size]
        if self.mode == "ema":
            state.append(self.embed_sum)
        _broadcast_from_rank0(*state)

