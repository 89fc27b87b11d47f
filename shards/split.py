"""Train / val / test split by lesion, stratified by class, deterministic from a seed.

HAM10000 has several images of the same lesion; putting them on both sides of a split leaks the
test set into training, so whole lesions are assigned. Images without a lesion id are their own
lesion.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.seeding import numpy_rng
from runtime.stages import SPLITS


@dataclass(frozen=True)
class Item:
    image_id: str
    label: int
    lesion_id: str | None


def split_by_lesion(items: Sequence[Item], val_fraction: float, test_fraction: float,
                    seed: int) -> dict[str, list[str]]:
    """Image ids per split. Per class, lesions are shuffled (seeded) and dealt to test, then val,
    until each holds its fraction of that class's images; the rest go to train."""
    groups: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        groups[item.lesion_id or f"image:{item.image_id}"].append(item)
    by_class: dict[int, list[str]] = defaultdict(list)
    for lesion, members in groups.items():
        # A lesion with mixed labels is stratified by its most common one (HAM10000 has none).
        label = Counter(m.label for m in members).most_common(1)[0][0]
        by_class[label].append(lesion)

    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    for label in sorted(by_class):
        lesions = sorted(by_class[label])  # input order must not matter
        numpy_rng(seed, "split", label).shuffle(lesions)
        total = sum(len(groups[g]) for g in lesions)
        targets = {"test": round(test_fraction * total), "val": round(val_fraction * total)}
        filled = {"test": 0, "val": 0}
        for lesion in lesions:
            size = len(groups[lesion])
            dest = next((s for s in ("test", "val") if filled[s] + size / 2 <= targets[s]), "train")
            if dest != "train":
                filled[dest] += size
            out[dest].extend(m.image_id for m in groups[lesion])
    return {name: sorted(ids) for name, ids in out.items()}
