"""The data stage of a run: pack the configured source into RUN_DIR/data.

    python -m shards.stage --config RUN_DIR/config.json

Synthetic lesions or ISIC images, whichever ``data.source`` says (``python -m shards synth|pack --out DIR``
packs outside a run directory).
"""

from __future__ import annotations

import argparse

from runtime.cli import run_cli, stage_parser
from runtime.config import config_from_args
from runtime.lineage import claim_run_dir
from shards.pack import pack_isic, pack_synthetic


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    layout = claim_run_dir(cfg)
    pack = pack_isic if cfg.data.source == "isic" else pack_synthetic
    pack(cfg.data, layout.stage_dir("data"))
    return 0


if __name__ == "__main__":
    run_cli(main, stage_parser(__doc__.splitlines()[0]))
