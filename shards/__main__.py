"""``python -m shards {synth,pack,inspect}``: build and check image shards.

    python -m shards synth --out data/synth data.num_images=700 data.image_size=64
    python -m shards pack --out data/isic --images ISIC/images --csv HAM10000_metadata.csv
    python -m shards inspect data/isic

Bad configuration or input exits with code 2 and a one-paragraph message (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.config import CLASSES, ConfigError, add_config_args, config_from_args
from runtime.errors import UserError
from shards.ingest import summarise
from shards.manifest import read_manifest, verify_shards
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
    inspect.add_argument("dir", type=Path, help="a packed output folder")
    inspect.add_argument("--preview", type=Path, help="PNG to write (default DIR/preview.png)")
    return parser


def _inspect(out_dir: Path, preview: Path | None) -> int:
    top = read_manifest(out_dir)
    print(f"{out_dir}: {top['source']}")
    print(f"{'split':<6} {'samples':>7}  " + " ".join(f"{c:>6}" for c in CLASSES))
    problems = []
    for split, info in top["splits"].items():
        counts = " ".join(f"{info['class_counts'][c]:>6}" for c in CLASSES)
        print(f"{split:<6} {info['num_samples']:>7}  {counts}")
        problems += verify_shards(out_dir / split)
    print(f"skipped ({len(top['skipped'])}): {summarise(top['skipped'])}")
    print("checksums: " + ("OK" if not problems else "\n  ".join(["FAILED", *problems])))
    if top["splits"]["train"]["num_samples"]:
        path = preview_grid(out_dir / "train", preview or out_dir / "preview.png")
        print(f"preview: {path}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
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
        if args.command == "synth":
            pack_synthetic(cfg.data, args.out, replace=args.replace)
        elif cfg.data.isic_images is None:
            raise ConfigError("pack needs images: --images DIR (or data.isic_images=DIR); "
                              "use `python -m shards synth` for synthetic data")
        else:
            pack_isic(cfg.data, args.out, replace=args.replace)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
