"""``python -m shards {synth,pack,inspect}``: build and check image shards.

    python -m shards synth --out data/synth data.num_images=700 data.image_size=64
    python -m shards pack --out data/isic --images ISIC/images --csv HAM10000_metadata.csv
    python -m shards inspect data/isic

Bad configuration or input, and OS errors about files and disks (disk full, read-only, name too long),
exit with code 2 and a one-paragraph message (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from runtime.cli import EXIT_USAGE, os_error_line
from runtime.config import CLASSES, ConfigError, add_config_args, config_from_args
from runtime.errors import UserError
from runtime.files import naming, remove_stale_temps
from runtime.schema import not_utf8
from runtime.stages import SPLITS
from shards.config import DataConfig
from shards.ingest import summarise
from shards.loader import split_manifest
from shards.manifest import CODE_FORMAT, read_manifest, verify_shards
from shards.pack import pack_isic, pack_synthetic
from shards.preview import preview_grid

REPLACE_HELP = "keep an output of other settings or inputs in --out's .history/ and repack (default: refuse)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shards", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="render synthetic lesions and pack them into shards")
    synth.add_argument("--out", type=Path, required=True, help="output folder")
    synth.add_argument("--replace", action="store_true", help=REPLACE_HELP)
    add_config_args(synth)
    pack = sub.add_parser("pack", help="pack ISIC / HAM10000 images into shards")
    pack.add_argument("--out", type=Path, required=True, help="output folder")
    pack.add_argument("--replace", action="store_true", help=REPLACE_HELP)
    pack.add_argument("--images", type=Path, help="same as data.isic_images=...")
    pack.add_argument("--csv", type=Path, help="same as data.isic_csv=... (omit for class sub-folders)")
    add_config_args(pack)
    inspect = sub.add_parser("inspect", help="counts, skipped items, checksums and a preview grid")
    inspect.add_argument("dir", type=Path, help="a packed output folder, one of its split folders, or code shards")
    inspect.add_argument("--preview", type=Path, help="PNG to write (default DIR/preview.png)")
    return parser


def _inspect(folder: Path, preview: Path | None) -> int:
    """Counts, skipped items and checksums of a packed folder, one of its split folders, or code shards
    (python vqvae/encode.py's RUN_DIR/codes); a preview grid for image shards."""
    top = read_manifest(folder)
    codes = top["format"] == CODE_FORMAT
    # A split folder's manifest lists shards; a top-level one lists splits (each a folder beside it).
    splits = {top.get("split", folder.name): folder} if "shards" in top else {
        name: folder / name for name in top.get("splits", {})}
    kind = f"code shards of a {top.get('codebook_size')}-code codebook, grid {top.get('grid')}" if codes else \
        top.get("source", "image shards")
    print(f"{folder}: {kind}")
    print(f"{'split':<6} {'samples':>7}  " + " ".join(f"{c:>6}" for c in CLASSES))
    problems = []
    for split, split_dir in splits.items():
        info = split_manifest(split_dir)  # shard names and counts checked before any file is opened
        counts = " ".join(f"{info.get('class_counts', {}).get(c, 0):>6}" for c in CLASSES)
        print(f"{split:<6} {info['num_samples']:>7}  {counts}")
        problems += verify_shards(split_dir)
    skipped = top.get("skipped", [])
    print(f"skipped ({len(skipped)}): {summarise(skipped)}")
    print("checksums: " + ("OK" if not problems else "\n  ".join(["FAILED", *problems])))
    shown = folder if "shards" in top else splits.get("train")
    if not codes and shown is not None and split_manifest(shown)["num_samples"]:
        # Beside a split folder, not in it: packing refuses to replace split folders holding foreign files.
        default = folder / "preview.png" if shown != folder else folder.parent / f"preview-{folder.name}.png"
        print(f"preview: {preview_grid(shown, preview or default)}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):  # as run_cli: a name that is not UTF-8 is printed escaped
        sys.stdout.reconfigure(errors="backslashreplace")
    args = _parser().parse_args(argv)
    try:
        if args.command == "inspect":
            return _inspect(args.dir, args.preview)
        if args.command == "pack":
            extra = ["data.source=isic"] if args.images or args.csv else []
            extra += [f"data.isic_images={args.images}"] if args.images else []
            extra += [f"data.isic_csv={args.csv}"] if args.csv else []
            args.overrides = extra + args.overrides
        cfg = config_from_args(args)
        if (problem := not_utf8(args.out)) is not None:
            raise ConfigError(f"--out: {problem}")
        if args.command == "pack" and cfg.data.isic_images is None:
            raise ConfigError("pack needs images: --images DIR (or data.isic_images=DIR); "
                              "use `python -m shards synth` for synthetic data")
        _pack(pack_synthetic if args.command == "synth" else pack_isic, cfg.data, args.out, args.replace)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        line = os_error_line(err)
        if line is None:  # not about the user's files or disks: a bug, keep its traceback
            raise
        print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _pack(pack: Callable[..., object], data: DataConfig, out: Path, replace: bool) -> None:
    """Pack; an OS error that names no file (a write on a full disk) names the output folder, and no
    temporary file of ours is left behind."""
    try:
        with naming(out):
            pack(data, out, replace=replace)
    except OSError:
        for folder in (out, *(out / split for split in SPLITS)):
            if folder.is_dir():
                remove_stale_temps(folder)
        raise


if __name__ == "__main__":
    sys.exit(main())
