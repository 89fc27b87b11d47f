import csv
from collections import Counter

import pytest

from runtime.config import CLASSES
from shards.split import Item, split_by_lesion


@pytest.fixture(scope="module")
def ham_items(shared_data):
    with open(shared_data / "metadata" / "HAM10000_metadata.csv", encoding="utf-8-sig", newline="") as fh:
        return [Item(r["image_id"], CLASSES.index(r["dx"].upper()), r["lesion_id"]) for r in csv.DictReader(fh)]


def test_no_lesion_crosses_splits_and_classes_are_stratified(ham_items):
    splits = split_by_lesion(ham_items, 0.1, 0.1, seed=0)
    assert sum(len(v) for v in splits.values()) == len(ham_items) == 10015
    lesion_of = {i.image_id: i.lesion_id for i in ham_items}
    lesions = {name: {lesion_of[i] for i in ids} for name, ids in splits.items()}
    assert not lesions["train"] & lesions["val"]
    assert not lesions["train"] & lesions["test"]
    assert not lesions["val"] & lesions["test"]
    label_of = {i.image_id: i.label for i in ham_items}
    totals = Counter(i.label for i in ham_items)
    for name in ("val", "test"):
        counts = Counter(label_of[i] for i in splits[name])
        for label, total in totals.items():
            assert abs(counts[label] / total - 0.1) < 0.03, (name, CLASSES[label])


def test_split_is_deterministic_and_order_independent(ham_items):
    a = split_by_lesion(ham_items, 0.1, 0.1, seed=5)
    assert a == split_by_lesion(list(reversed(ham_items)), 0.1, 0.1, seed=5)
    assert a != split_by_lesion(ham_items, 0.1, 0.1, seed=6)


def test_images_without_lesion_are_their_own_group():
    items = [Item(f"img{i}", i % 2, None) for i in range(100)]
    splits = split_by_lesion(items, 0.2, 0.2, seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [60, 20, 20]
