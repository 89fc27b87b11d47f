"""Turn image shards into code shards with a trained VQ-VAE.

    python vqvae/encode.py --config RUN_DIR/config.json [--shard-index I --num-shards N]
    accelerate launch --num_processes N vqvae/encode.py --config RUN_DIR/config.json

Every input shard ``data/SPLIT/shard-K.tar`` becomes ``codes/SPLIT/shard-K.tar`` with, per image,
the same ``__key__``, ``codes.npy`` (the smallest integer dtype holding the codebook: uint8 up to 256
codes; read back with ``allow_pickle=False``), ``cls`` and ``json``. With ``encode.train_views`` V > 1, a
train shard holds V grids per image: the first V of :data:`VIEWS`, view by view (all images of the shard as
packed, then all mirrored, ...), keys ``ID@VIEW`` after the first. Task I of N takes every N-th input
shard; outputs that are already complete for the same stage identity (this config + these VQ-VAE weights
+ these image shards) are skipped. The task that completes the set writes ``codes/manifest.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch import Tensor

from runtime.array_task import completed_set, is_done, mark_done, task_slots
from runtime.checkpoint import load_weights
from runtime.cli import run_cli, stage_parser
from runtime.config import CLASSES, config_from_args
from runtime.files import atomic_path
from runtime.integrity import stage_weights
from runtime.lineage import StageRun, begin_stage
from runtime.log import get_logger
from runtime.stages import MANIFEST, SPLITS, RunLayout, write_manifest
from shards.codes import codes_npy
from shards.loader import ImageDecoder, declared, split_manifest
from shards.manifest import CODE_FORMAT, ManifestError, read_manifest, sample_offsets
from shards.stream import SampleRefused, ShardStream, collate
from vqvae.api import Tokenizer, tokenizer_config
from vqvae.models import build_vqvae

log = get_logger("encode")


VIEWS: tuple[tuple[str, Callable[[Tensor], Tensor]], ...] = (
    ("", lambda x: x),
    ("mirror", lambda x: x.flip(-1)),
    ("flip", lambda x: x.flip(-2)),
    ("rot180", lambda x: x.flip(-2, -1)),
    ("rot90", lambda x: x.rot90(1, (-2, -1))),
    ("rot270", lambda x: x.rot90(-1, (-2, -1))),
    ("transpose", lambda x: x.transpose(-2, -1)),
    ("antitranspose", lambda x: x.flip(-2, -1).transpose(-2, -1)),
)
"""The eight symmetries of a square image (name, function of ...×H×W), exact: no pixel is interpolated. The
first 2 form a group (identity, mirror), so do the first 4 (the flips) and all 8 (the dihedral group)."""


def work_items(data_dir: Path) -> list[tuple[str, str, int]]:
    """(split, shard name, samples) for every input shard, in a fixed order every task agrees on."""
    return [(split, shard["name"], shard["count"]) for split in SPLITS
            if (data_dir / split / MANIFEST).is_file()
            for shard in read_manifest(data_dir / split)["shards"]]


class _WithMetadata(ImageDecoder):
    """The validation-time image decoding (no augmentation), keeping the sample's metadata JSON (copied into
    the code shard, so it must be a JSON object like packing writes)."""

    def __call__(self, key: str, members: dict[str, bytes], epoch: int) -> dict[str, Any]:
        meta = members.get("json", b"{}")
        try:
            parsed = json.loads(meta)
        except ValueError as err:
            raise SampleRefused(f"json member is not valid JSON ({err})") from None
        if not isinstance(parsed, dict):
            raise SampleRefused(f"json member is a {type(parsed).__name__}, not an object")
        return super().__call__(key, members, epoch) | {"json": meta}


def encode_shard(tokenizer: Tokenizer, source: Path, manifest: dict[str, Any], output: Path, batch_size: int,
                 views: int = 1) -> tuple[int, dict[str, int]]:
    """Encode one shard (batched, no augmentation) of the split whose checked manifest is ``manifest``, each
    image in the first ``views`` of :data:`VIEWS`, through the tokenizer API (so it gives exactly these codes);
    returns (samples written, per-class counts)."""
    image_size, codebook_size = tokenizer.image_size, tokenizer.codebook_size
    class_counts = dict.fromkeys(CLASSES, 0)
    written, dropped = 0, []
    # Bound to the split's manifest: a split packed at another size than the data stage says is refused.
    decode = _WithMetadata(image_size).for_split(source.parent, manifest)
    offsets = next(s["offsets"] for s in manifest["shards"] if s["name"] == source.name)
    # mtime=0: the bytes depend only on the samples; compress=False: webdataset would otherwise guess
    # compression from the temporary name, whose random suffix can end in 'gz'/'xz'.
    with atomic_path(output) as tmp, wds.TarWriter(str(tmp), mtime=0, compress=False) as sink:
        # View by view, so that consecutive samples (what the training stream keeps together) are other images.
        for name, view in VIEWS[:views]:
            stream = ShardStream(shards=[source], offsets=[offsets], batch_size=batch_size, decode=decode,
                                 collate=collate, shuffle=False)
            for batch in stream:
                dropped += batch["dropped"]
                if not batch["key"]:
                    continue
                codes = tokenizer.encode(view(batch["image"])).cpu().numpy()
                for key, label, meta, grid in zip(batch["key"], batch["label"].tolist(), batch["json"], codes,
                                                  strict=True):
                    if name:
                        key, meta = f"{key}@{name}", json.dumps({**json.loads(meta), "view": name}).encode()
                    sink.write({"__key__": key, "codes.npy": codes_npy(grid, codebook_size),
                                "cls": str(label).encode(), "json": meta})
                    class_counts[CLASSES[label]] += 1
                    written += 1
            if stream.stats:  # raised inside atomic_path: no output is left behind
                raise ManifestError(f"{source}: {dict(stream.stats)} bad or damaged sample(s) "
                                    f"({'; '.join(dropped[:3])}{' ...' if len(dropped) > 3 else ''}); check it with "
                                    "`python -m shards inspect` and repack rather than encode an incomplete split")
    return written, class_counts


def finalize(run: StageRun, items: list[tuple[str, str, int]], grid: tuple[int, int], codebook_size: int) -> bool:
    """When every output is complete for this identity: per-split and top-level manifests."""
    markers = completed_set([run.out_dir / split / name for split, name, _ in items], run.identity)
    if markers is None:
        return False
    splits: dict[str, Any] = {}
    for (split, _, _), marker in zip(items, markers, strict=True):
        entry = splits.setdefault(split, {"num_samples": 0, "shards": [], "class_counts": dict.fromkeys(CLASSES, 0)})
        entry["num_samples"] += marker["count"]
        entry["shards"].append({k: marker[k] for k in ("name", "count", "bytes", "sha256", "offsets")})
        for cls, n in marker["class_counts"].items():
            entry["class_counts"][cls] += n
    common = {"codebook_size": codebook_size, "grid": list(grid), "classes": list(CLASSES)}
    for split, entry in splits.items():
        write_manifest(run.out_dir / split, {"format": CODE_FORMAT, "split": split, **common, **entry})
    run.finish([m["sha256"] for m in markers], {
        **common,
        "splits": {s: {"num_samples": e["num_samples"], "class_counts": e["class_counts"]} for s, e in splits.items()},
    })
    return True


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    indices, count = task_slots(args)
    run = begin_stage(cfg, "encode")
    layout = RunLayout.of(cfg)
    data_dir = layout.stage_dir("data")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_vqvae(cfg.vqvae)
    load_weights(model, stage_weights(layout.stage_dir("vqvae"), run.manifests["vqvae"]))
    image_size = declared(data_dir, run.manifests["data"], "image_size", 1)
    if image_size != cfg.data.image_size:  # the lineage check compares settings, not this manifest value
        raise ManifestError(f"{data_dir / MANIFEST} says its images are {image_size} px, but this config has "
                            f"data.image_size={cfg.data.image_size}; re-make the data stage "
                            "(python launch/pipeline.py --from data)")
    tokenizer = Tokenizer(model, tokenizer_config(cfg.vqvae, image_size), device)

    items = work_items(data_dir)
    # Each split's manifest checked once (its sample index is as long as the split), not once per shard.
    manifests = {split: split_manifest(data_dir / split) for split in {split for split, _, _ in items}}
    run.claim()
    started, total = time.perf_counter(), 0
    for split, name, _ in [item for index in indices for item in items[index::count]]:
        output = run.out_dir / split / name
        if is_done(output, run.identity):
            log.info("%s/%s: already encoded for this identity, skipped", split, name)
            continue
        n, class_counts = encode_shard(tokenizer, data_dir / split / name, manifests[split], output,
                                       cfg.encode.batch_size, views=cfg.encode.train_views if split == "train" else 1)
        mark_done(output, run.identity, count=n, class_counts=class_counts, offsets=sample_offsets(output))
        total += n
    seconds = time.perf_counter() - started
    log.info("task %s of %d: %d images in %.1f s (%.1f images/s)", ",".join(map(str, indices)), count, total,
             seconds, total / max(seconds, 1e-9))
    if finalize(run, items, tokenizer.grid, tokenizer.codebook_size):
        log.info("all shards encoded: %s", run.out_dir / MANIFEST)
    return 0


if __name__ == "__main__":
    run_cli(main, stage_parser(__doc__.splitlines()[0], array_task=True))
