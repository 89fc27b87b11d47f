"""Exactly-once, equal-steps distribution of shard samples over DDP ranks and DataLoader workers.

Why not webdataset's ``split_by_node``/``split_by_worker``: splitting *shards* over ranks gives
ranks different sample counts when shards are uneven, so DDP ranks would run different numbers
of steps (and hang in the all-reduce). Instead every reader (rank r of W, worker w of K) reads
ALL shards in one seeded order and applies one seeded shuffle buffer, so all readers see the same
global sequence; sample i goes to global step ``i // (W*B)`` and rank ``(i % (W*B)) % W``, and
worker w of a rank builds the batches whose local step index is ``w (mod K)``. The loader must
therefore never be passed to ``accelerate.prepare()`` (it would split a second time).

Filtering (rank, worker, ``start_step``) happens on raw tar bytes, before any decoding. Nothing
in a shard is ever unpickled: a sample is decoded only by the caller's ``decode`` function and
only if all its members have extensions the decoder declares; others are refused and counted.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from runtime.log import get_logger
from runtime.seeding import derive_seed
from shards.images import key_problem

log = get_logger(__name__)


class SampleRefused(ValueError):
    """A sample that decodes but holds a value outside what its split declares (class, codes, size, format)."""


class SampleDecoder(Protocol):
    """Turns one raw sample (member extension -> bytes) into a dict of tensors / ints / strings."""

    allowed: frozenset[str]  # member extensions it may read; samples with any other are refused

    def for_split(self, split_dir: Path, manifest: dict[str, Any]) -> SampleDecoder:
        """This decoder checking every sample against what the split's manifest declares (image size,
        codebook size, code grid); raises a UserError when the manifest contradicts the decoder."""

    def empty(self) -> dict[str, torch.Tensor]:
        """The tensor fields of a batch with no sample (every sample of a step refused or lost)."""

    def __call__(self, key: str, members: dict[str, bytes], epoch: int) -> dict[str, Any]:
        """The decoded sample; raises SampleRefused (or any error) for a sample to drop and count."""


def steps_per_epoch(num_samples: int, batch_size: int, world: int) -> int:
    """Steps every rank runs in one epoch over ``num_samples`` with per-rank ``batch_size``.

    Global batches hold ``world * batch_size`` samples; a final partial global batch is its own
    step if every rank gets at least one sample from it, otherwise it is folded into the
    previous step (so no rank ever has an empty batch).
    """
    if batch_size < 1 or world < 1:
        raise ValueError(f"batch_size ({batch_size}) and world size ({world}) must be >= 1")
    if num_samples < world:
        raise ValueError(f"{num_samples} samples cannot feed {world} ranks (each needs at least one)")
    full, rest = divmod(num_samples, world * batch_size)
    return full + (rest >= world)


def assign(index: int, steps: int, batch_size: int, world: int) -> tuple[int, int]:
    """(global step, rank) of sample ``index`` of the epoch's global order."""
    per_step = world * batch_size
    return min(index // per_step, steps - 1), (index % per_step) % world


def _shuffled(samples: Iterator[dict[str, Any]], buffer: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Seeded shuffle buffer (identical output on every reader given the same rng seed)."""
    pool: list[dict[str, Any]] = []
    for sample in samples:
        if len(pool) < buffer:
            pool.append(sample)
            continue
        j = rng.randrange(len(pool))
        yield pool[j]
        pool[j] = sample
    rng.shuffle(pool)
    yield from pool


@dataclass
class ShardStream(IterableDataset):
    """Yields this reader's whole batches (already collated) in step order. See module docstring."""

    shards: list[Path]
    shard_counts: list[int]  # samples per shard from the manifest: detects silently truncated tars
    num_samples: int
    batch_size: int
    decode: SampleDecoder
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    seed: int = 0
    start_step: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 256
    max_batches: int | None = None
    stats: Counter[str] = field(default_factory=Counter)  # per process: bad samples by reason

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        self.steps = steps_per_epoch(self.num_samples, self.batch_size, self.world_size)
        if not 0 <= self.start_step <= self.steps:
            raise ValueError(f"start_step {self.start_step} is outside 0..{self.steps} (steps in this epoch)")
        end = self.steps if self.max_batches is None else min(self.steps, self.start_step + self.max_batches)
        self.end_step = end

    def __len__(self) -> int:
        return self.end_step - self.start_step

    def _handler(self, err: Exception) -> bool:
        """webdataset error hook: count and log damaged tar data, then carry on with the next shard."""
        self.stats["tar_error"] += 1
        log.warning("damaged shard data skipped (%s: %s)", type(err).__name__, str(err)[:200])
        return True

    def _counted(self, samples: Iterator[dict[str, Any]], expected: dict[str, int]) -> Iterator[dict[str, Any]]:
        """Pass samples through; report shards that yield fewer samples than the manifest says
        (Python's tarfile treats a tar cut at a member boundary as a normal end of file)."""
        seen: dict[str, int] = dict.fromkeys(expected, 0)
        for sample in samples:
            seen[sample["__url__"]] = seen.get(sample["__url__"], 0) + 1
            yield sample
        for url, count in seen.items():
            if count < expected.get(url, 0):
                self._handler(EOFError(f"{url} ended after {count} of {expected[url]} samples (truncated?)"))

    def _raw(self) -> Iterator[dict[str, Any]]:
        """The epoch's global sample order, as raw bytes (identical on every reader)."""
        shards = [str(p) for p in self.shards]
        if self.shuffle:
            random.Random(derive_seed(self.seed, "shards", self.epoch)).shuffle(shards)
        expected = {str(p): n for p, n in zip(self.shards, self.shard_counts, strict=True)}
        samples = self._counted(tarfile_samples(({"url": url} for url in shards), handler=self._handler), expected)
        if self.shuffle:
            samples = _shuffled(samples, self.shuffle_buffer, random.Random(derive_seed(self.seed, "buffer",
                                                                                       self.epoch)))
        return samples

    def _mine(self) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(step, raw sample) for this reader, plus (step, None) so that empty steps still appear."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        last = self.start_step - 1
        for index, sample in enumerate(self._raw()):
            step, rank = assign(index, self.steps, self.batch_size, self.world_size)
            if step >= self.end_step:
                break
            if rank != self.rank or step < self.start_step or (step - self.start_step) % workers != worker:
                continue
            for missing in range(last + 1, step):  # damaged data left a step of ours with no sample
                if (missing - self.start_step) % workers == worker:
                    yield missing, None
            last = step
            yield step, sample
        for missing in range(last + 1, self.end_step):
            if (missing - self.start_step) % workers == worker:
                yield missing, None

    def _decoded(self, sample: dict[str, Any]) -> dict[str, Any] | str:
        """The decoded sample, or the reason it was refused."""
        key = sample["__key__"]
        if key_problem(key):  # '../x', '/abs', 'a/b': never produced by packing; refuse, never pass on
            return f"unsafe sample key refused ({key_problem(key)})"
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        refused = sorted(set(members) - self.decode.allowed)
        if refused:
            return f"refused member extension(s) {refused} (never unpickled; allowed: {sorted(self.decode.allowed)})"
        try:
            return self.decode(key, members, self.epoch)
        except SampleRefused as err:
            return f"refused: {err}"
        except Exception as err:  # any undecodable sample is dropped and reported, never fatal
            return f"cannot decode ({type(err).__name__}: {err})"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step, batch, dropped = None, [], []
        for sample_step, sample in self._mine():
            if sample_step != step and step is not None:
                yield self._emit(batch, dropped)
                batch, dropped = [], []
            step = sample_step
            if sample is None:
                continue
            decoded = self._decoded(sample)
            if isinstance(decoded, str):
                self.stats["bad_sample"] += 1
                log.warning("sample %s in %s dropped: %s", sample["__key__"], sample.get("__url__"), decoded)
                dropped.append(f"{sample['__key__']}: {decoded}")
            else:
                batch.append(decoded)
        if step is not None:
            yield self._emit(batch, dropped)

    def _emit(self, batch: list[dict[str, Any]], dropped: list[str]) -> dict[str, Any]:
        out = self.collate(batch)
        out["dropped"] = dropped  # bad samples of this batch, so training can sum them across workers
        return out


def collate(samples: list[dict[str, Any]], empty: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Stack tensors, make ints a long tensor, keep other values as lists. An empty batch (only
    possible with damaged shards) uses ``empty`` for the tensor fields' shapes."""
    if not samples:
        return {**(empty or {}), "key": []}
    out: dict[str, Any] = {}
    for name, first in samples[0].items():
        values = [s[name] for s in samples]
        if isinstance(first, torch.Tensor):
            out[name] = torch.stack(values)
        elif isinstance(first, int):
            out[name] = torch.tensor(values, dtype=torch.long)
        else:
            out[name] = values
    return out
