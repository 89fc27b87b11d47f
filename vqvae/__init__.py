"""The VQ-VAE: models (models.py, quantizers/), its settings (config.py), its stages (train.py, encode.py) and the
tokenizer API (api.py): ``from vqvae import Tokenizer``."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Imported on first use: `import vqvae.config` (every command line parses a config) must not load torch.
    if name == "Tokenizer":
        from vqvae.api import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'vqvae' has no attribute {name!r}")
