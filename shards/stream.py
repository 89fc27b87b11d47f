"""Exactly-once, equal-steps distribution of indexed shard samples over DDP ranks and DataLoader workers.

Every split manifest lists, per shard, the byte offset where each sample starts (``offsets``, written
when the shard is made: shards.manifest.describe_shard). An epoch's global order is a pure function of
(seed, epoch, the split's sample counts): shards shuffled, blocks of consecutive samples shuffled within
each shard, then positions shuffled within windows of ``shuffle_buffer``. Nothing in it depends on the
number of processes, so a run resumed with another world size continues the same epoch from its
*position* (samples of the epoch already consumed) without repeating or skipping a sample.

From position p, each step takes the next ``world * batch_size`` positions (the last step of the epoch
takes the rest, so no rank ever gets an empty batch); rank r takes the r-th contiguous slice of them,
and worker w of a rank builds that rank's batches k = w (mod K). Each reader seeks to exactly its own
samples (``os.pread`` of their byte ranges), so it reads its share of the bytes, never the whole data
set; its slice of a step comes from one or two nearby stretches of a shard (the blocks and windows
keep locality for parallel file systems). A stream may run several epochs back to back, so a training
run keeps one DataLoader and its workers for its whole life.

The loader must never be passed to ``accelerate.prepare()`` (it would split a second time). Nothing in
a shard is ever unpickled: a sample is decoded only by the caller's ``decode`` function and only if all
its members have extensions the decoder declares; others are refused and counted.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from runtime.log import get_logger
from runtime.seeding import derive_seed
from shards.images import key_problem

log = get_logger(__name__)

BLOCK = 16
"""Consecutive samples of a shard that stay together in the shuffled order: a reader's samples of one
step then come from a few stretches of a shard instead of scattered 10 KB reads."""


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


def epoch_steps(position: int, num_samples: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` positions of the epoch order each remaining step covers, from ``position`` on."""
    steps = steps_per_epoch(num_samples - position, batch_size, world)
    per_step = world * batch_size
    bounds = [(position + s * per_step, position + (s + 1) * per_step) for s in range(steps)]
    bounds[-1] = (bounds[-1][0], num_samples)  # the last step takes the rest (see steps_per_epoch)
    return bounds


def rank_slice(start: int, end: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of one step's positions (sizes differ by at most one)."""
    n = end - start
    return range(start + rank * n // world, start + (rank + 1) * n // world)


def epoch_order(counts: list[int], seed: int, epoch: int, window: int, block: int = BLOCK) -> np.ndarray:
    """Global sample ids (shard-major numbering) in this epoch's order; the same for every world size."""
    rng = np.random.default_rng(derive_seed(seed, "order", epoch))
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    pieces = []
    for shard in rng.permutation(len(counts)):
        block_starts = np.arange(0, counts[shard], block)
        for b in rng.permutation(len(block_starts)):
            lo = firsts[shard] + block_starts[b]
            pieces.append(np.arange(lo, min(lo + block, firsts[shard] + counts[shard])))
    order = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    windows = np.arange(len(order)) // window
    return order[np.lexsort((rng.random(len(order)), windows))]  # a random permutation within each window


def parse_sample(data: bytes) -> tuple[str, dict[str, bytes]]:
    """(key, members) of one sample's tar bytes; raises ValueError for anything but regular files of one key."""
    key, members = None, {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            base, ext = base_plus_ext(info.name)
            if not info.isreg() or base is None:  # a link or device member: never followed or read
                raise SampleRefused(f"member {info.name[:80]!r} is not a regular file named KEY.EXT")
            if key not in (None, base):
                raise ValueError(f"members of two samples ({key!r}, {base!r}) in one index entry")
            key = base
            members[ext.lower()] = tar.extractfile(info).read()  # type: ignore[union-attr]
    if key is None:
        raise ValueError("no member")
    return key, members


@dataclass
class ShardStream(IterableDataset):
    """Yields this reader's whole batches (already collated) in step order. See module docstring.

    Each batch also carries ``epoch`` and ``position`` (samples of that epoch consumed once this step is
    done, by all ranks together), which is what a checkpoint records to resume exactly there."""

    shards: list[Path]
    offsets: list[list[int]]  # per shard: each sample's first byte, then the end of the last sample
    batch_size: int
    decode: SampleDecoder
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    position: int = 0
    epochs: int | None = 1  # None: epoch after epoch, until the consumer stops
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 256
    max_batches: int | None = None
    stats: Counter[str] = field(default_factory=Counter)  # per process: bad samples by reason
    bytes_read: int = 0  # per process: shard bytes this reader read (bench scaling)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        counts = [len(o) - 1 for o in self.offsets]
        self.num_samples = sum(counts)
        if not 0 <= self.position < self.num_samples:
            raise ValueError(f"position {self.position} is outside 0..{self.num_samples - 1} (samples in an epoch)")
        steps_per_epoch(self.num_samples, self.batch_size, self.world_size)  # refuses fewer samples than ranks
        self._counts = counts
        self._shard_of = np.repeat(np.arange(len(counts)), counts)
        self._begin = np.concatenate([np.asarray(o[:-1], np.int64) for o in self.offsets])
        self._end = np.concatenate([np.asarray(o[1:], np.int64) for o in self.offsets])

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an open-ended stream (epochs=None) has no length")
        return sum(1 for _ in self._steps())

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return epoch_order(self._counts, self.seed, epoch, self.shuffle_buffer)

    def _steps(self) -> Iterator[tuple[int, range, int]]:
        """(epoch, this rank's positions, epoch position after the step) for every step of the stream."""
        epoch, position, emitted = self.epoch, self.position, 0
        while self.epochs is None or epoch < self.epoch + self.epochs:
            if self.num_samples - position < self.world_size:
                # Only after resuming with more processes than the epoch has samples left: they cannot all
                # get one, so this epoch ends here (the next starts in full). Said, never silent.
                log.warning("epoch %d: the last %d sample(s) are skipped: fewer than the %d processes resumed "
                            "with", epoch, self.num_samples - position, self.world_size)
            else:
                for start, end in epoch_steps(position, self.num_samples, self.batch_size, self.world_size):
                    if self.max_batches is not None and emitted >= self.max_batches:
                        return
                    emitted += 1
                    yield epoch, rank_slice(start, end, self.rank, self.world_size), end
            epoch, position = epoch + 1, 0

    def _read(self, files: dict[int, int], sample: int) -> dict[str, Any] | str:
        """One sample's raw members (plus ``__key__``/``__url__``), or why it could not be read."""
        shard = int(self._shard_of[sample])
        begin, end = int(self._begin[sample]), int(self._end[sample])
        url = str(self.shards[shard])
        try:
            if shard not in files:
                files[shard] = os.open(url, os.O_RDONLY)
            data = os.pread(files[shard], end - begin, begin)
            self.bytes_read += len(data)
            if len(data) != end - begin:
                raise EOFError(f"{url} ends at byte {begin + len(data)}, inside a sample its manifest indexes "
                               f"at {begin}..{end} (truncated?)")
            key, members = parse_sample(data)
        except SampleRefused as err:
            self.stats["bad_sample"] += 1
            log.warning("sample %d of %s dropped: %s", sample, url, err)
            return f"refused: {err}"
        except (OSError, EOFError, ValueError, tarfile.TarError) as err:
            self.stats["tar_error"] += 1
            log.warning("damaged shard data skipped (%s: %s)", type(err).__name__, str(err)[:200])
            return f"unreadable ({type(err).__name__})"
        return {"__key__": key, "__url__": url, **members}

    def _decoded(self, sample: dict[str, Any], epoch: int) -> dict[str, Any] | str:
        """The decoded sample, or the reason it was refused."""
        key = sample["__key__"]
        if key_problem(key):  # '../x', '/abs', 'a/b': never produced by packing; refuse, never pass on
            return f"unsafe sample key refused ({key_problem(key)})"
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        refused = sorted(set(members) - self.decode.allowed)
        if refused:
            return f"refused member extension(s) {refused} (never unpickled; allowed: {sorted(self.decode.allowed)})"
        try:
            return self.decode(key, members, epoch)
        except SampleRefused as err:
            return f"refused: {err}"
        except Exception as err:  # any undecodable sample is dropped and reported, never fatal
            return f"cannot decode ({type(err).__name__}: {err})"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        files: dict[int, int] = {}
        order_of: tuple[int, np.ndarray] | None = None
        try:
            for index, (epoch, positions, after) in enumerate(self._steps()):
                if index % workers != worker:
                    continue
                if order_of is None or order_of[0] != epoch:
                    order_of = (epoch, self._order(epoch))
                order = order_of[1]
                batch, dropped = [], []
                for sample in order[positions.start:positions.stop]:
                    raw = self._read(files, int(sample))
                    decoded = self._decoded(raw, epoch) if isinstance(raw, dict) else raw
                    if isinstance(decoded, str):
                        name = raw["__key__"] if isinstance(raw, dict) else f"sample {int(sample)}"
                        if isinstance(raw, dict):  # unreadable or refused raw data was counted by _read
                            self.stats["bad_sample"] += 1
                            log.warning("sample %s in %s dropped: %s", name, raw.get("__url__"), decoded)
                        dropped.append(f"{name}: {decoded}")
                    else:
                        batch.append(decoded)
                out = self.collate(batch)
                out |= {"dropped": dropped, "epoch": epoch, "position": after}
                yield out
        finally:
            for fd in files.values():
                os.close(fd)


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
