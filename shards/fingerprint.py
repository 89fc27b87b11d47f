"""What the data stage reads besides its settings, by content (light: the pipeline's plan and dry run use it)."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import UserError
from runtime.files import sha256_file
from runtime.lineage import content_digest
from runtime.ownership import MARKER
from shards.config import DataConfig
from shards.ingest import check_input_folder, walk_files


def input_fingerprint(cfg: DataConfig) -> str:
    """What the data stage reads besides its settings, by content: never a path or a time, so a moved
    or copied data set keeps its identity. ISIC: the CSV bytes and every file's name (relative to the
    image folder) and sha256 (about 1 s per GB)."""
    if cfg.source == "synthetic":
        return "synthetic"
    images = Path(cfg.isic_images or ".")
    # Refused here, where the pipeline plans (dry run included), rather than as a data stage failure later.
    if not images.is_dir():
        raise UserError(f"data.isic_images={images} is not an existing folder; give the folder of ISIC / "
                        "HAM10000 images (data.isic_images=DIR)")
    check_input_folder(images, "data.isic_images")
    if cfg.isic_csv is not None and not Path(cfg.isic_csv).is_file():
        raise UserError(f"data.isic_csv={cfg.isic_csv} is not an existing file; give the metadata CSV "
                        "(data.isic_csv=CSV), or leave it out for class sub-folders")
    files = [p for p in walk_files(images)[0] if p.name != MARKER]  # the files packing sees
    return content_digest({
        "csv": _sha256(Path(cfg.isic_csv)) if cfg.isic_csv else None,
        "files": [[str(p.relative_to(images)), _sha256(p)] for p in files]})


def _sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or err}); every file below data.isic_images is "
                        "read to tell whether the input changed: make it readable or move it away") from None
