"""Draw class-conditional code grids from the prior and decode them with the VQ-VAE decoder.

    python prior/sample.py --config RUN_DIR/config.json [--shard-index I --num-shards N]

``sample.per_class`` × classes samples (``sample.class_mix``: the same number of every class, or the
classes in the train split's proportions) are split over ``N`` tasks (a Slurm array); task ``I`` draws the
samples with index ``j % N == I`` using its own seed, writes ``samples/shard-I.tar`` (png, codes.npy, cls,
json per sample) and a done-marker. The task that completes the set writes ``samples.png`` (one row per
class, its name on the left), the samples as a labelled data set (``dataset/``: PNGs + a HAM10000-layout CSV,
prior/dataset.py) and ``manifest.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from prior.api import Generator, prior_config
from prior.dataset import FOLDER as DATASET_FOLDER
from prior.dataset import write_dataset
from prior.models import build_prior
from runtime.array_task import completed_set, is_done, mark_done, task_slots
from runtime.balance import class_allocation, top_up_allocation, train_class_counts
from runtime.checkpoint import load_weights
from runtime.cli import run_cli, stage_parser
from runtime.config import CLASSES, ConfigError, RunConfig, config_from_args
from runtime.errors import UserError
from runtime.files import atomic_path
from runtime.images import save_grid
from runtime.integrity import stage_weights
from runtime.lineage import StageRun, begin_stage, token
from runtime.log import get_logger
from runtime.seeding import torch_generator
from runtime.stages import MANIFEST, RunLayout, shard_name
from shards.codes import codes_npy
from shards.images import decode_rgb
from vqvae.api import Tokenizer, tokenizer_config
from vqvae.models import build_vqvae

log = get_logger("sample")


def load_generator(cfg: RunConfig, run: StageRun, device: torch.device) -> Generator:
    """The prior and VQ-VAE this stage's lineage checks approved (runtime/lineage.py), as the generator API
    (prior/api.py) holds them: the stage draws exactly what the API draws."""
    layout = RunLayout.of(cfg)
    vqvae = build_vqvae(cfg.vqvae)
    load_weights(vqvae, stage_weights(layout.stage_dir("vqvae"), run.manifests["vqvae"]))
    codebook_size, grid = int(run.manifests["prior"]["codebook_size"]), tuple(run.manifests["prior"]["grid"])
    prior = build_prior(cfg.prior, codebook_size, len(CLASSES))
    load_weights(prior, stage_weights(layout.stage_dir("prior"), run.manifests["prior"]))
    tokenizer = Tokenizer(vqvae, tokenizer_config(cfg.vqvae, cfg.data.image_size), device)
    return Generator(prior, tokenizer, prior_config(cfg.prior, codebook_size, grid), device)


def sample_classes(cfg: RunConfig, run: StageRun) -> list[int]:
    """The class of every sample index, in index order (class 0's samples first)."""
    where = RunLayout.of(cfg).stage_dir("encode") / MANIFEST
    if cfg.sample.class_mix == "uniform":
        allocation = [cfg.sample.per_class] * len(CLASSES)
    elif cfg.sample.class_mix == "top_up":  # the codes hold every train image in encode.train_views views
        images = {c: n // cfg.encode.train_views if isinstance(n, int) else n
                  for c, n in train_class_counts(run.manifests["encode"], where).items()}
        allocation = top_up_allocation(images, cfg.sample.top_up_to, where)
        if not sum(allocation):
            raise UserError(f"sample.class_mix=top_up: every class already has sample.top_up_to="
                            f"{cfg.sample.top_up_to} train images or more; nothing to draw. Raise sample.top_up_to")
    else:
        allocation = class_allocation(train_class_counts(run.manifests["encode"], where),
                                      cfg.sample.per_class * len(CLASSES), cfg.sample.min_per_class, where)
    return [c for c, n in enumerate(allocation) for _ in range(n)]


def _png(image: torch.Tensor) -> bytes:
    array = (image.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def sample_task(cfg: RunConfig, run: StageRun, index: int, count: int, device: torch.device) -> None:
    output = run.out_dir / shard_name(index)
    if is_done(output, run.identity):
        log.info("task %d/%d: %s already complete", index, count, output.name)
        return
    generator = load_generator(cfg, run, device)
    classes = sample_classes(cfg, run)
    wanted = [j for j in range(len(classes)) if j % count == index]
    size = cfg.sample.batch_size
    rng = torch_generator(cfg.sample.seed, "sample-task", index, count)  # the API's seed: derive_seed(same parts)
    batches = generator.batches([classes[j] for j in wanted], rng,
                                temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, top_p=cfg.sample.top_p,
                                guidance_scale=cfg.sample.guidance_scale, batch_size=size)
    started, written = time.perf_counter(), 0
    # mtime=0: the bytes depend only on the samples; compress=False: webdataset would otherwise guess
    # compression from the temporary name, whose random suffix can end in 'gz'/'xz'.
    with atomic_path(output) as tmp, wds.TarWriter(str(tmp), mtime=0, compress=False) as sink:
        for lo, batch in zip(range(0, len(wanted), size), batches, strict=True):
            ids = wanted[lo: lo + size]
            for j, label, image, code in zip(ids, batch.labels.tolist(), batch.images, batch.codes, strict=True):
                meta = {"class": CLASSES[label], "task": index, "temperature": cfg.sample.temperature}
                sink.write({"__key__": f"sample_{j:06d}", "png": _png(image),
                            "codes.npy": codes_npy(code.cpu().numpy(), generator.codebook_size),
                            "cls": str(label).encode(), "json": json.dumps(meta).encode()})
                written += 1
    seconds = time.perf_counter() - started
    log.info("task %d/%d: %d samples in %.1f s (%.2f samples/s)", index, count, written, seconds,
             written / max(seconds, 1e-9))
    mark_done(output, run.identity, count=written, seconds=seconds, device=str(device))


def finalize(cfg: RunConfig, run: StageRun, count: int) -> bool:
    """Once every task is done: the per-class grid and the manifest. Returns whether it was written."""
    outputs = [run.out_dir / shard_name(i) for i in range(count)]
    markers = completed_set(outputs, run.identity)
    if markers is None:
        return False
    by_index: dict[int, torch.Tensor] = {}
    for sample in wds.WebDataset([str(o) for o in outputs], shardshuffle=False, empty_check=False):
        array = np.array(decode_rgb(sample["png"], f"{sample['__url__']}: {sample['__key__']}"))  # writable copy
        by_index[int(sample["__key__"].split("_")[1])] = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    classes = sample_classes(cfg, run)
    counts = [classes.count(c) for c in range(len(CLASSES))]
    drawn = [c for c in range(len(CLASSES)) if counts[c]]
    # One row per drawn class, as wide as the rarest one (data mix) or per_class (uniform mix).
    width = min(counts[c] for c in drawn)
    first = {c: classes.index(c) for c in drawn}
    images = torch.stack([by_index[first[c] + i] for c in drawn for i in range(width)])
    grid_path = save_grid(images, run.out_dir / "samples.png", nrow=width, row_labels=[CLASSES[c] for c in drawn])
    total_seconds = sum(m["seconds"] for m in markers)
    s = cfg.sample
    dataset = write_dataset(run.out_dir / DATASET_FOLDER, outputs, run.identity, {
        "num_tasks": count, "seed": s.seed, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
        "guidance_scale": s.guidance_scale, "prior": token(run.manifests["prior"]),
        "tokenizer": token(run.manifests["vqvae"])})
    run.finish([m["sha256"] for m in markers], {"dataset": dataset,
        "classes": list(CLASSES), "per_class": cfg.sample.per_class, "class_mix": cfg.sample.class_mix,
        "class_counts": {CLASSES[c]: counts[c] for c in range(len(CLASSES))}, "num_samples": len(by_index),
        "temperature": cfg.sample.temperature, "grid_png": grid_path.name, "shards": markers,
        "samples_per_s": len(by_index) / max(total_seconds, 1e-9)})
    return True


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    indices, count = task_slots(args)
    if count != cfg.sample.num_tasks:
        raise ConfigError(f"{count} tasks but sample.num_tasks={cfg.sample.num_tasks}: the task count decides "
                          "which samples each task draws, so it must be the configured one")
    run = begin_stage(cfg, "sample")
    run.claim()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for index in indices:
        sample_task(cfg, run, index, count, device)
    if finalize(cfg, run, count):
        log.info("all %d tasks done: %s (%s)", count, run.out_dir / "samples.png", run.out_dir / MANIFEST)
    return 0


if __name__ == "__main__":
    run_cli(main, stage_parser(__doc__.splitlines()[0], array_task=True))
