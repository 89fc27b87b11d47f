"""Judging models without pretrained weights: a lesion classifier trained on the run's own real data
(classifier stage) and the Fréchet distances and class agreement measured with it (evaluate stage).
``from judge import Classifier`` loads a trained one (judge/api.py)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Imported on first use: `import judge.config` (every command line parses a config) must not load torch.
    if name == "Classifier":
        from judge.api import Classifier

        return Classifier
    raise AttributeError(f"module 'judge' has no attribute {name!r}")
