"""Class weights for training losses, and class allocations of samples, from a split manifest's class counts.
Lesion sets are about two-thirds NV, while the judge is scored per class; weighting each class's samples by
count^-p makes training follow that use instead of the data's imbalance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from runtime.errors import UserError
from runtime.schema import ClassBalance
from shards.config import CLASSES

POWERS: dict[ClassBalance, float] = {"none": 0.0, "sqrt": 0.5, "inverse": 1.0}


def train_class_counts(manifest: dict[str, Any], where: Path) -> dict[str, Any]:
    """``splits.train.class_counts`` of a data or codes manifest (refused in one line when absent)."""
    splits = manifest.get("splits")
    train = splits.get("train") if isinstance(splits, dict) else None
    counts = train.get("class_counts") if isinstance(train, dict) else None
    if not isinstance(counts, dict):
        raise UserError(f"{where}: no splits.train.class_counts; re-make that stage's output")
    return counts


def _counts(counts: dict[str, Any], where: Path) -> list[int]:
    """The count of every class (CLASSES order), each checked; refused in one line when unusable."""
    n = []
    for name in CLASSES:
        value = counts.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{where}: splits.train.class_counts.{name} is {value!r}, not a count; re-make that "
                            "stage's output")
        n.append(value)
    if sum(n) == 0:
        raise UserError(f"{where}: the train split has no labelled samples; re-make that stage's output")
    return n


def class_weights(counts: dict[str, Any], balance: ClassBalance, where: Path) -> torch.Tensor:
    """Loss weight of each class (CLASSES order): count^-1 (inverse: every class weighs the same in total),
    count^-1/2 (sqrt) or 1 (none), scaled so the mean weight over the train samples is 1 (the loss keeps its
    scale); a class without train samples weighs 0."""
    counts_t = torch.tensor(_counts(counts, where), dtype=torch.float64)
    weights = torch.where(counts_t > 0, counts_t.clamp_min(1) ** -POWERS[balance], torch.zeros_like(counts_t))
    return (weights * counts_t.sum() / (weights * counts_t).sum()).float()


def split_class_weights(manifest: dict[str, Any], balance: ClassBalance, where: Path) -> torch.Tensor:
    """:func:`class_weights` from a manifest's train split (not read for ``none``: all ones)."""
    if balance == "none":
        return torch.ones(len(CLASSES))
    return class_weights(train_class_counts(manifest, where), balance, where)


def class_allocation(counts: dict[str, Any], total: int, minimum: int, where: Path) -> list[int]:
    """How many of ``total`` samples each class (CLASSES order) gets: ``minimum`` of every class with train
    samples, the rest in proportion to the counts by largest remainder (ties to the lower class index), so
    the allocation sums to ``total`` exactly; a class without train samples gets none."""
    n = _counts(counts, where)
    present = [i for i, c in enumerate(n) if c > 0]
    spare = total - minimum * len(present)
    if spare < 0:
        raise UserError(f"{where}: {len(present)} classes x sample.min_per_class={minimum} exceed the {total} "
                        "samples to draw; lower sample.min_per_class or raise sample.per_class")
    quotas = [spare * c / sum(n) for c in n]
    out = [minimum + int(q) if c > 0 else 0 for q, c in zip(quotas, n, strict=True)]
    by_remainder = sorted(present, key=lambda i: (-(quotas[i] - int(quotas[i])), i))
    for i in by_remainder[:total - sum(out)]:
        out[i] += 1
    return out


def top_up_allocation(counts: dict[str, Any], target: int, where: Path) -> list[int]:
    """How many samples each class (CLASSES order) gets so that its train count plus them reaches ``target``:
    ``target - count`` for every class with train samples below it, 0 for the rest (and for absent classes,
    which a class-conditional prior never learned)."""
    return [max(0, target - c) if c > 0 else 0 for c in _counts(counts, where)]
