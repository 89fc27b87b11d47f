"""Comparing classifiers on one test set: per-class recall and F1 (torchmetrics), balanced accuracy and macro F1,
mean ± std over seeds, and paired differences between arms with bootstrap confidence intervals.

Every model of a comparison is judged on the same test images; a bootstrap resample draws test images (with
replacement, from a seeded generator) once for all models, so a difference between arms is computed on the very
same images for both: the interval reflects how much the test set's composition moves the difference. Averages
over classes count the classes the test images hold (a class absent from them has no recall).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torchmetrics.functional.classification import multiclass_f1_score, multiclass_recall

from judge.config import ARMS
from runtime.seeding import torch_generator
from shards.config import CLASSES

HEADLINE = ("balanced_accuracy", "macro_f1")
"""The two summary metrics of a comparison."""


def class_scores(guesses: torch.Tensor, truth: torch.Tensor) -> dict[str, Any]:
    """Recall and F1 of every class the test images hold, their means (balanced accuracy, macro F1)."""
    k = len(CLASSES)
    recall = multiclass_recall(guesses, truth, num_classes=k, average=None)
    f1 = multiclass_f1_score(guesses, truth, num_classes=k, average=None)
    present = torch.bincount(truth, minlength=k) > 0
    return {"balanced_accuracy": float(recall[present].mean()), "macro_f1": float(f1[present].mean()),
            "recall": {CLASSES[c]: float(recall[c]) for c in range(k) if present[c]},
            "f1": {CLASSES[c]: float(f1[c]) for c in range(k) if present[c]}}


def resampled_scores(guesses: torch.Tensor, truth: torch.Tensor, picks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Balanced accuracy and macro F1 (as :func:`class_scores`) of every model (rows of ``guesses``, M x N) on
    every resample (rows of ``picks``, B x n indices into the N test images): two M x B tensors. Computed from
    one batched confusion count instead of M x B torchmetrics calls."""
    k, (models, _), resamples = len(CLASSES), guesses.shape, len(picks)
    true = truth[picks]  # B x n
    cells = (torch.arange(resamples)[None, :, None] * k * k + true[None] * k + guesses[:, picks]).reshape(models, -1)
    confusion = torch.stack([torch.bincount(row, minlength=resamples * k * k) for row in cells]).reshape(
        models, resamples, k, k).double()
    hits, actual, called = confusion.diagonal(dim1=2, dim2=3), confusion.sum(3), confusion.sum(2)
    present = actual > 0
    recall = torch.where(present, hits / actual.clamp_min(1), 0.0)
    f1 = torch.where(actual + called > 0, 2 * hits / (actual + called).clamp_min(1), 0.0)
    count = present.sum(2)
    return {"balanced_accuracy": (recall * present).sum(2) / count, "macro_f1": (f1 * present).sum(2) / count}


def summarise_arm(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds (0 with one seed) of one arm's :func:`class_scores`."""
    def spread(values: list[float]) -> dict[str, Any]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "per_seed": values}

    out: dict[str, Any] = {name: spread([s[name] for s in per_seed]) for name in HEADLINE}
    for kind in ("recall", "f1"):
        out[kind] = {c: spread([s[kind][c] for s in per_seed]) for c in per_seed[0][kind]}
    return out


def paired_differences(guesses: dict[str, torch.Tensor], truth: torch.Tensor, pairs: list[tuple[str, str]],
                       resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    """For each pair (x, y) of arms: mean over seeds of x's metric minus y's (seed s against seed s), on the test
    set and as a percentile bootstrap interval over ``resamples`` resamples of the test images (seeded)."""
    arms = list(guesses)
    seeds = len(guesses[arms[0]])
    stacked = torch.cat([guesses[a] for a in arms])  # (arms x seeds) x N
    full = resampled_scores(stacked, truth, torch.arange(len(truth))[None])
    picks = torch.randint(len(truth), (resamples, len(truth)), generator=torch_generator(seed, "bootstrap"))
    boot = resampled_scores(stacked, truth, picks)
    tail = (1 - confidence) / 2
    out: dict[str, Any] = {}
    for x, y in pairs:
        rows_x = slice(arms.index(x) * seeds, (arms.index(x) + 1) * seeds)
        rows_y = slice(arms.index(y) * seeds, (arms.index(y) + 1) * seeds)
        out[f"{x} - {y}"] = {}
        for name in HEADLINE:
            diff = boot[name][rows_x].mean(0) - boot[name][rows_y].mean(0)
            low, high = torch.quantile(diff, torch.tensor([tail, 1 - tail], dtype=diff.dtype)).tolist()
            estimate = float(full[name][rows_x].mean() - full[name][rows_y].mean())
            out[f"{x} - {y}"][name] = {"estimate": estimate, "ci": [low, high], "confidence": confidence,
                                       "resamples": resamples}
    return out


def comparison_tables(result: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    """(headers, rows) of the arms' scores, the per-class F1 and recall, and the paired differences, as text:
    what the report, the stage's printout and docs/results.md show."""
    arms = {arm: result["arms"][arm] for arm in ARMS if arm in result["arms"]}  # saved manifests sort their keys

    def pm(value: dict[str, Any]) -> str:
        return f"{value['mean']:.3f} ± {value['std']:.3f}"

    scores = (["arm", "training images", "balanced accuracy", "macro F1"],
              [[arm, str(result["train_images"][arm]), pm(a["balanced_accuracy"]), pm(a["macro_f1"])]
               for arm, a in arms.items()])
    classes = [c for c in CLASSES if c in next(iter(arms.values()))["f1"]]
    per_class = (["arm", "per class", *classes],
                 [[arm, kind, *(f"{a[kind][c]['mean']:.2f}" for c in classes)]
                  for arm, a in arms.items() for kind in ("f1", "recall")])
    diffs = (["difference", "balanced accuracy", "macro F1"],
             [[pair, *(f"{d[m]['estimate']:+.3f} [{d[m]['ci'][0]:+.3f}, {d[m]['ci'][1]:+.3f}]" for m in HEADLINE)]
              for pair, d in sorted(result["differences"].items(), key=lambda kv: ARMS.index(kv[0].split(" - ")[1]))])
    return [scores, per_class, diffs]


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                      *("| " + " | ".join(r) + " |" for r in rows)])
