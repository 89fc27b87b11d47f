"""A small lesion classifier whose penultimate features stand in for Inception's: nothing pretrained
can be downloaded, so the judge is trained on the run's own train split (the classifier stage)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from judge.config import ClassifierConfig
from shards.config import CLASSES


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8 if cout % 8 == 0 else 1, cout),
                         nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8 if cout % 8 == 0 else 1, cout),
                         nn.SiLU())


class LesionClassifier(nn.Module):
    """Four stride-2 conv blocks, global average pooling (the features), one linear layer (the logits)."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 4 * width]
        self.body = nn.Sequential(*(_block(cin, cout) for cin, cout in zip([3, *widths], widths, strict=False)))
        self.head = nn.Linear(widths[-1], num_classes)

    def features(self, images: Tensor) -> Tensor:
        """B×3×H×W in [0, 1] -> B×F penultimate features."""
        return self.body(images * 2 - 1).mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def build_classifier(cfg: ClassifierConfig, num_classes: int) -> LesionClassifier:
    return LesionClassifier(cfg.width, num_classes)


def _moments(x: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """(mean, covariance) of the rows of ``x`` in float64, weighted when ``weights`` are given."""
    used = len(x) if weights is None else int((weights > 0).sum())
    if used < 2:
        raise ValueError("a Fréchet distance needs at least 2 samples on each side")
    x, w = x.double(), None if weights is None else weights.double()
    mean = x.mean(0) if w is None else (w[:, None] * x).sum(0) / w.sum()
    return mean, torch.cov(x.T, aweights=w)


def frechet_distance(a: Tensor, b: Tensor, weights_a: Tensor | None = None, weights_b: Tensor | None = None) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2) between two feature sets (rows = samples),
    in float64; the matrix square root through the symmetric C_a^1/2 C_b C_a^1/2 (eigh, no scipy).
    ``weights_a``/``weights_b``: one non-negative weight per row (weighted mean and covariance)."""
    mean_a, cov_a = _moments(a, weights_a)
    mean_b, cov_b = _moments(b, weights_b)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def recall_per_class(guesses: Tensor, truth: Tensor) -> dict[str, float]:
    """Per class present in ``truth``: the fraction of its items the judge calls that class."""
    return {CLASSES[c]: float((guesses[truth == c] == c).float().mean()) for c in range(len(CLASSES))
            if (truth == c).any()}


def balanced_accuracy(guesses: Tensor, truth: Tensor) -> float:
    """The mean of :func:`recall_per_class` (0 when ``truth`` is empty): every class counts the same."""
    recalls = recall_per_class(guesses, truth)
    return sum(recalls.values()) / len(recalls) if recalls else 0.0


def mix_weights(labels: Tensor, target_labels: Tensor) -> Tensor:
    """A weight per item of ``labels``, p(c) / q(c), that gives those items the class mix p of
    ``target_labels`` (q: their own mix); a class absent from the target weighs 0. The evaluate stage weights
    the samples to the real images' mix, never the real images to the samples': real sets are mostly NV,
    and giving a handful of DF images the weight of 100 samples would make the estimate mostly noise."""
    classes = int(max(labels.max(), target_labels.max())) + 1
    q = torch.bincount(labels, minlength=classes).double() / len(labels)
    p = torch.bincount(target_labels, minlength=classes).double() / len(target_labels)
    return torch.where(q > 0, p / q.clamp_min(1e-12), torch.zeros_like(q))[labels]
