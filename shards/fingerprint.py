"""What the data stage reads besides its settings, by content (light: the pipeline's plan and dry run use it)."""

from __future__ import annotations

from pathlib import Path

from runtime.config import DataConfig
from runtime.files import sha256_file
from runtime.lineage import content_digest
from runtime.ownership import MARKER


def input_fingerprint(cfg: DataConfig) -> str:
    """What the data stage reads besides its settings, by content: never a path or a time, so a moved
    or copied data set keeps its identity. ISIC: the CSV bytes and every file's name (relative to the
    image folder) and sha256 (about 1 s per GB)."""
    if cfg.source == "synthetic":
        return "synthetic"
    images = Path(cfg.isic_images or ".")
    files = sorted(p for p in images.rglob("*") if p.is_file() and p.name != MARKER) if images.is_dir() else []
    return content_digest({
        "csv": sha256_file(Path(cfg.isic_csv)) if cfg.isic_csv and Path(cfg.isic_csv).is_file() else None,
        "files": [[str(p.relative_to(images)), sha256_file(p)] for p in files]})
