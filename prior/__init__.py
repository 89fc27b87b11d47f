"""The prior over code grids: models (models.py and one module per arch), its settings (config.py), its stages
(train.py, sample.py) and the generator API (api.py): ``from prior import Generator``."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Imported on first use: `import prior.config` (every command line parses a config) must not load torch.
    if name == "Generator":
        from prior.api import Generator

        return Generator
    raise AttributeError(f"module 'prior' has no attribute {name!r}")
