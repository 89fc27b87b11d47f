"""Pack images into WebDataset tar shards: ``OUT/{train,val,test}/shard-%06d.tar`` + manifests.

Crash safety: each shard is written under a temporary name and renamed when closed, each split
manifest is written atomically after its shards, and ``OUT/manifest.json`` is written last. The
output folder carries the lesion-vq marker and the data identity (runtime/lineage.py): a rerun with
the same identity and intact shards returns at once, a half-written one of the same identity is
rebuilt (only files we wrote are removed), and anything else is refused: an output folder that
holds the inputs, foreign files or another identity's shards is never touched.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO

import webdataset as wds
from tqdm import tqdm

from runtime.errors import ConfigError
from runtime.files import TMP_MARK, atomic_write_json, naming, open_in_place, remove_stale_temps
from runtime.lineage import StageRun, begin_stage
from runtime.log import get_logger
from runtime.ownership import OwnershipError, refuse_dangerous_output
from runtime.seeding import derive_seed, numpy_rng
from runtime.stages import MANIFEST, SHARD_PATTERN, SPLITS
from shards.config import CLASSES, DataConfig
from shards.encode import Encoded, Job, encode_job
from shards.fingerprint import input_fingerprint
from shards.ingest import ingest, summarise
from shards.manifest import FORMAT, ManifestError, describe_shard, now_iso, read_manifest, tool_version, verify_shards
from shards.split import Item, split_by_lesion
from shards.synth import class_sequence, synth_id

log = get_logger(__name__)
_OURS = re.compile(r"shard-\d{6}\.tar|manifest\.json|.*" + re.escape(TMP_MARK) + ".*")
"""The only names packing ever writes inside a split folder (so the only ones it removes)."""


class EmptyPackError(ConfigError):
    """Packing found nothing it could use: exit 2, and no manifest that would look complete."""


def _writing(fname: str) -> Path:
    """The name a shard is written under until it is complete."""
    return Path(f"{fname}{TMP_MARK}writing")


class _Sink:
    """A ShardWriter whose shards appear under their final name only once complete."""

    def __init__(self, split_dir: Path, cfg: DataConfig) -> None:
        self.split_dir = split_dir
        self.handles: dict[str, BinaryIO] = {}
        self.shards: list[dict[str, Any]] = []
        # mtime=0 makes the tar bytes (and sha256) depend only on the samples.
        self.writer = wds.ShardWriter(str(split_dir / SHARD_PATTERN), maxcount=cfg.shard_max_count,
                                      maxsize=cfg.shard_max_bytes, verbose=0, encoder=False, mtime=0,
                                      opener=self._open, post=self._close)

    def _open(self, fname: str) -> BinaryIO:
        handle = open_in_place(_writing(fname), "xb")  # a new file, never through a link; renamed in _close
        self.handles[fname] = handle
        return handle

    def _close(self, fname: str) -> None:
        handle = self.handles.pop(fname)
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        count = self.writer.count
        if count == 0:  # ShardWriter opens its first shard eagerly, even for an empty split
            os.unlink(_writing(fname))
            return
        os.replace(_writing(fname), fname)
        self.shards.append(describe_shard(Path(fname), count))

    def write(self, sample: dict[str, bytes | str]) -> None:
        with naming(Path(self.writer.fname)):  # a failed write (disk full) names no file by itself
            self.writer.write(sample)

    def close(self) -> list[dict[str, Any]]:
        self.writer.close()
        return self.shards

    def abort(self) -> None:
        """After a failed write: close the tar stream and delete the half-written shard (ours, by name)."""
        with contextlib.suppress(OSError, ValueError):
            self.writer.tarstream.close()  # marks it closed even when its last write fails
        for fname, handle in self.handles.items():
            with contextlib.suppress(OSError):
                handle.close()
            os.unlink(_writing(fname))
        self.handles.clear()
        self.writer.tarstream = None


def _encoded(jobs: list[Job], cfg: DataConfig, root: Path | None) -> Iterator[Encoded]:
    """Encode jobs in order, on all cores.

    Fork, where available: the workers only run numpy / PIL code, and spawned workers would spend
    seconds re-importing torch (pulled in by runtime.seeding) before the first image.
    """
    work = partial(encode_job, size=cfg.image_size, quality=cfg.jpeg_quality,
                   hair_probability=cfg.hair_probability, root=root)
    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1:
        yield from map(work, jobs)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        yield from pool.imap(work, jobs, chunksize=8)


def _counted(items: Iterable[Encoded], bar: tqdm) -> Iterator[Encoded]:
    for item in items:
        bar.update()
        yield item


def _write_split(out_dir: Path, split: str, encoded: Iterable[Encoded], cfg: DataConfig,
                 common: dict[str, Any]) -> dict[str, Any]:
    split_dir = out_dir / split
    split_dir.mkdir(parents=True)
    sink = _Sink(split_dir, cfg)
    counts: Counter[str] = Counter()
    skipped = []
    try:
        for result in encoded:
            if result.sample is None:
                skipped.append({"id": result.job.image_id, "path": str(result.job.source), "kind": "unreadable",
                                "reason": str(result.reason)})
                log.warning("skipped %s: %s", result.job.image_id, result.reason)
                continue
            sink.write(result.sample)
            counts[CLASSES[result.job.label]] += 1
        shards = sink.close()
    except BaseException:
        sink.abort()
        raise
    manifest = {**common, "split": split, "shards": shards, "num_samples": sum(counts.values()),
                "class_counts": {c: counts[c] for c in CLASSES}, "skipped": skipped, "created": now_iso()}
    atomic_write_json(split_dir / MANIFEST, manifest)
    return manifest


def _clear(out_dir: Path) -> None:
    """Remove our own earlier (killed or damaged) output of the same identity, and nothing else: the
    top-level manifest first, then shard, manifest and temporary files in the split folders. A split
    folder holding anything else is refused before a single file is removed."""
    for split in SPLITS:
        split_dir = out_dir / split
        if split_dir.is_dir():
            foreign = [p.name for p in split_dir.iterdir() if not _OURS.fullmatch(p.name) or not p.is_file()]
            if foreign:
                raise OwnershipError(f"{split_dir} holds files packing did not write ({', '.join(foreign[:3])}"
                                     f"{' ...' if len(foreign) > 3 else ''}); nothing was changed. Move them "
                                     "elsewhere or choose another output folder")
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        split_dir = out_dir / split
        if split_dir.is_dir():
            (split_dir / MANIFEST).unlink(missing_ok=True)
            for path in split_dir.iterdir():
                path.unlink()
            split_dir.rmdir()
    remove_stale_temps(out_dir)


def _up_to_date(run: StageRun) -> dict[str, Any] | None:
    try:
        manifest = read_manifest(run.out_dir)
    except ManifestError:
        return None
    if manifest.get("identity") != run.identity:
        return None
    problems = [p for split in manifest["splits"] for p in verify_shards(run.out_dir / split)]
    if problems:
        log.warning("%s is damaged (%s); rebuilding", run.out_dir, "; ".join(problems[:3]))
        return None
    return manifest


def _pack(cfg: DataConfig, out_dir: Path, jobs: list[Job], ingest_skipped: list[dict[str, str]],
          source: str, fingerprint: str, root: Path | None, replace: bool, notes: list[str] | None = None
          ) -> dict[str, Any]:
    out_dir = Path(out_dir)
    refuse_dangerous_output(out_dir, "output folder", {"images": cfg.isic_images, "CSV": cfg.isic_csv})
    run = begin_stage(SimpleNamespace(data=cfg), "data", out_dir=out_dir, inputs_fingerprint=fingerprint,
                      replace=replace)
    done = _up_to_date(run)
    if done is not None:
        log.info("%s is up to date (identity %s); nothing to do", out_dir, run.identity)
        return done
    _clear(out_dir)
    if not jobs:
        raise EmptyPackError(f"nothing to pack: no usable image was found ({summarise(ingest_skipped)}); "
                             "no output was written")
    run.claim()
    if ingest_skipped:
        log.warning("skipped before packing: %s", summarise(ingest_skipped))
    for note in notes or []:
        log.warning("%s", note)

    assignment = split_by_lesion([Item(j.image_id, j.label, j.lesion_id) for j in jobs],
                                 cfg.val_fraction, cfg.test_fraction, cfg.seed)
    by_id = {j.image_id: j for j in jobs}
    common = {"format": FORMAT, "classes": list(CLASSES), "image_size": cfg.image_size, "source": source,
              "tool_version": tool_version()}
    ordered = {}
    for split in SPLITS:
        ordered[split] = [by_id[i] for i in assignment[split]]
        # Shuffled (seeded) so every shard mixes classes and lesions.
        numpy_rng(cfg.seed, "pack-order", split).shuffle(ordered[split])
    all_jobs = [job for split_jobs in ordered.values() for job in split_jobs]
    splits = {}
    with tqdm(total=len(all_jobs), desc=f"pack {out_dir.name}", unit="img", mininterval=1.0) as bar:
        results = _encoded(all_jobs, cfg, root)  # one pool for all splits, results in job order
        for split, split_jobs in ordered.items():
            encoded = _counted(islice(results, len(split_jobs)), bar)
            splits[split] = _write_split(out_dir, split, encoded, cfg, common)

    unreadable = [s for m in splits.values() for s in m["skipped"]]
    skipped = ingest_skipped + unreadable
    if not any(m["num_samples"] for m in splits.values()):
        raise EmptyPackError(f"no image could be packed from {len(jobs)} found ({summarise(skipped)}); "
                             f"no manifest was written to {out_dir}")
    manifest = run.finish(
        {split: [s["sha256"] for s in m["shards"]] for split, m in splits.items()},
        {**common, "created": now_iso(),
         "splits": {name: {"num_samples": m["num_samples"], "class_counts": m["class_counts"],
                           "shards": len(m["shards"])} for name, m in splits.items()},
         "found": len(jobs) + len(ingest_skipped),
         "skipped_counts": dict(Counter(s["kind"] for s in skipped)), "skipped": skipped, "notes": notes or []})
    log.info("packed %s: %s; skipped: %s", out_dir,
             ", ".join(f"{k}={v['num_samples']}" for k, v in manifest["splits"].items()),
             summarise(manifest["skipped"]))
    return manifest


def pack_synthetic(cfg: DataConfig, out_dir: Path, *, replace: bool = False) -> dict[str, Any]:
    """Render ``cfg.num_images`` balanced synthetic lesions and pack them; returns the top manifest.
    ``replace``: an output of other settings in ``out_dir`` is kept in ``.history/`` beside it (else refused)."""
    labels = class_sequence(cfg.num_images, cfg.seed)
    jobs = [Job(synth_id(i), int(label), synth_id(i), None, {}, derive_seed(cfg.seed, i))
            for i, label in enumerate(labels)]
    source = f"synthetic: {cfg.num_images} procedural lesions (shards.synth), seed {cfg.seed}"
    return _pack(cfg, out_dir, jobs, [], source, input_fingerprint(cfg), None, replace)


def pack_isic(cfg: DataConfig, out_dir: Path, *, replace: bool = False) -> dict[str, Any]:
    """Ingest ``cfg.isic_images`` (+ ``cfg.isic_csv``), split by lesion and pack; returns the top manifest.

    Raises IngestError for unusable input (layout not recognised, no images)."""
    if cfg.isic_images is None:
        raise ConfigError("pack_isic needs data.isic_images=/path/to/images (and usually data.isic_csv=...)")
    images = Path(cfg.isic_images)
    found = ingest(images, cfg.isic_csv)
    jobs = [Job(r.image_id, r.label, r.lesion_id, r.path, r.row) for r in found.records]
    return _pack(cfg, out_dir, jobs, found.skipped, found.description, input_fingerprint(cfg), images, replace,
                 found.notes)
