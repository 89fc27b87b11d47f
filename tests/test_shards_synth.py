import numpy as np

from runtime.config import CLASSES
from shards.synth import class_sequence, generate, render_lesion


def test_render_is_deterministic_and_seed_dependent():
    a = render_lesion(7, 0, 64, 0.5)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert np.array_equal(a, render_lesion(7, 0, 64, 0.5))
    assert not np.array_equal(a, render_lesion(8, 0, 64, 0.5))


def _features(img: np.ndarray) -> np.ndarray:
    centre = img[16:48, 16:48].reshape(-1, 3).astype(float)
    return np.concatenate([centre.mean(0), centre.std(0)])


def test_classes_are_visibly_different():
    """A nearest-centroid classifier on mean/std colour of the centre beats chance (1/7) by far."""
    train = {c: np.mean([_features(render_lesion(s, c, 64, 0.0)) for s in range(12)], 0) for c in range(7)}
    correct = 0
    for c in range(len(CLASSES)):
        for s in range(100, 110):
            f = _features(render_lesion(s, c, 64, 0.0))
            correct += min(train, key=lambda k: np.linalg.norm(train[k] - f)) == c
    assert correct / 70 > 0.7


def test_balanced_and_weighted_class_sequences():
    labels = class_sequence(71, seed=3)
    assert np.bincount(labels).tolist() == [11] + [10] * 6
    weighted = class_sequence(200, seed=3, weights=(1, 0, 0, 0, 0, 0, 1))
    assert set(weighted.tolist()) == {0, 6}
    ids = [i for i, _, _ in generate(3, seed=1, size=16)]
    assert ids == ["synth_000000", "synth_000001", "synth_000002"]
