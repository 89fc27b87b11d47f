"""Real-data quality: the report's model (``seed``) against the best preset (``ham128``: improved VQ-VAE and
transformer prior) and its gated-PixelCNN prior baseline, on HAM10000 at 128 px, judged on the validation split.

    python -m bench quality [--minutes 10] [--root /tmp/lesion-vq-quality] [--images DIR --csv CSV]

Every run is an ordinary pipeline run directory under ``--root`` (never inside the repository):

* ``seed``: ``--preset seed`` at 128 px (the report's VQ-VAE and unconditional masked PixelCNN);
* ``ham128``: ``--preset ham128`` (transformer prior);
* ``ham128-gated``: the same VQ-VAE, codes and judge (folders linked from ``ham128``), gated PixelCNN prior;
* ``ham128-unguided``: ``ham128``'s prior sampled without classifier-free guidance (what guidance costs and buys);
* with ``--variants fsq conv fsq+conv ...``: ``ham128-NAME``, ``ham128`` with another tokenizer (:data:`VARIANTS`:
  FSQ instead of factorised cosine codes; plain codes; straight-through gradients instead of the rotation trick;
  three conv stages instead of the patch stem; VQGAN's discriminator from half-way through training; ``A+B``
  applies both), each
  with its own VQ-VAE trained for the same wall time, its own codes and transformer prior (about 30 more minutes
  per pair of variants on 2 CPU cores).

**Equal VQ-VAE training time**: the VQ-VAEs' training steps are timed first, in turns (1 thread, each its own batch
size; load that comes and goes then slows them alike), and each run trains for ``--minutes`` worth of its steps; the
two trainings then run at the same time, each pinned to a core of its own where there are two. Data, judge
(classifier), sample counts and evaluation settings are ``ham128``'s in every run, so all runs share one packed data
set and one judge (both made first, with all cores, and linked into every run), and every run draws its samples in
the train split's class mix (``sample.class_mix=data``, at least ``sample.min_per_class`` of each class). The priors
are shrunk to about 1 M parameters each and trained for ``--prior-steps`` (the same for every prior) so that the
whole comparison takes about 80 minutes on 2 CPU cores. Prints one row per metric (bench, name, value, unit,
baseline, ratio), the targets met or missed, and writes ``ROOT/*.{md,json}`` and image grids in ``ROOT/grids/``
(real validation images above their seed and ham128 reconstructions; samples per class). Each tokenizer's code
usage (fraction of the codebook) and perplexity are measured on the encoded validation and test splits, and
each run's VQ-VAE steps per second of its training stage's wall time.

**A rerun on the same ``--root`` continues the comparison**: the timing is recorded in ``ROOT/timing.json`` and
reused (only runs it lacks are timed), and every stage that is up to date is kept. The pipelines stop after their
evaluate stage (the augment stage's classifier trainings compare nothing here).

**Held out**: every run is also judged (``python -m judge.evaluate --images``) on the original files of the
packed *test* split, lesions that no run trained on and no setting was chosen by (``ROOT/held-out/`` links to
them), with the same rows and verdicts (``held out: ...``); ``ROOT/held-out-NAME.json`` keeps each result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import torch

from bench.common import Row, write_results
from runtime.config import CLASSES, ConfigError, RunConfig, build_config
from runtime.files import atomic_write_json, open_in_place, read_json
from runtime.launcher import REPO_ROOT
from runtime.process import preexec_die_with_parent

SHARED_HAM = Path(os.environ.get("LESION_VQ_SHARED_DATA", Path(REPO_ROOT).parent / "shared" / "data")) / \
    "ham10000-200x150"
JUDGE_SECTIONS = ("data", "classifier", "classifier_train", "evaluate", "sample")
"""Taken from ham128 for every run: one data set, one judge, the same number of samples."""

# About 1.1 M parameters each at K = 512 (the smoke preset's matched pair): a CPU-sized prior comparison.
SMALL_TRANSFORMER = ("prior.layers=6", "prior.d_model=128", "prior.heads=4")
SMALL_GATED = ("prior.arch=gated", "prior.filters=64", "prior.layers=6", "prior.kernel_size=5", "prior.embed_dim=32")


def _overrides(section: str, values: dict[str, Any]) -> list[str]:
    return [f"{section}.{key}={json.dumps(value) if not isinstance(value, str) else value}"
            for key, value in values.items() if not isinstance(value, dict)]


def _judge_overrides(images: Path, csv: Path | None, args: argparse.Namespace) -> list[str]:
    ham = build_config("ham128", [f"data.isic_images={images}", *([f"data.isic_csv={csv}"] if csv else [])])
    dumped = ham.model_dump(mode="json")
    out = [item for section in JUDGE_SECTIONS for item in _overrides(section, dumped[section])]
    return [*out, "wandb=disabled", f"classifier_train.max_steps={args.classifier_steps}",
            f"classifier_train.checkpoint_every={args.classifier_steps}",
            f"classifier_train.eval_every={args.classifier_steps}", "classifier_train.num_workers=1",
            f"sample.per_class={args.per_class}",
            f"sample.min_per_class={min(ham.sample.min_per_class, args.per_class)}"]


VARIANTS = {
    # What ham128's tokenizer is measured against (issue 30): FSQ 8-5-5-5 (1,000 codes) for its factorised cosine
    # codes; its 512 EMA codes looked up as they are, with straight-through gradients; straight-through alone;
    # three conv stages at 128, 64 and 32 px (0.94 GMAC per image) for its 4x4 patch stem (0.61). `fsq+conv` is
    # the tokenizer ham128 had before.
    "fsq": ("vqvae.quantizer.kind=fsq",),
    "plain": ("vqvae.quantizer.lookup_dim=0", "vqvae.quantizer.rotation_trick=false"),
    "straight": ("vqvae.quantizer.rotation_trick=false",),
    "conv": ("vqvae.patch_size=1", "vqvae.channels=[32,64,128]", "vqvae.res_blocks=1"),
    "adversarial": ("vqvae_train.adversarial.enabled=true",),
}
"""``--variants``: other tokenizers for ham128, each compared at the same VQ-VAE wall time; ``A+B`` is a variant
with the overrides of both (a later kind setting of the same kind keeps the earlier settings)."""


def variant_overrides(name: str) -> tuple[str, ...]:
    """The overrides of variant ``name`` (one of :data:`VARIANTS`, or several joined by ``+``)."""
    return tuple(item for part in name.split("+") for item in VARIANTS[part])


def _variant(name: str) -> str:
    """``name`` checked as a ``--variants`` value (argparse turns the ValueError into one usage line, exit 2)."""
    unknown = [part for part in name.split("+") if part not in VARIANTS]
    if unknown or len(set(name.split("+"))) != len(name.split("+")):
        raise argparse.ArgumentTypeError(f"unknown or repeated variant in {name!r}; allowed: "
                                         f"{', '.join(VARIANTS)}, or several joined by + (e.g. fsq+conv)")
    paths = ["data.isic_images=/images"]
    try:
        varied = build_config("ham128", [*paths, *variant_overrides(name)])
    except ConfigError as err:
        raise argparse.ArgumentTypeError(f"variant {name!r} is not a valid ham128 config: {err}") from None
    if varied == build_config("ham128", paths):
        raise argparse.ArgumentTypeError(f"variant {name!r} is what ham128 already is: it would train the same "
                                         "tokenizer again")
    return name


def _is_variant(run: str) -> bool:
    return run.startswith("ham128-") and all(part in VARIANTS for part in run.removeprefix("ham128-").split("+"))


def _adversarial(run: str) -> bool:
    return _is_variant(run) and "adversarial" in run.removeprefix("ham128-").split("+")


def _training_step(cfg: RunConfig, critic: bool) -> Callable[[], None]:
    """One VQ-VAE training step on random images: the training stage's own losses, backward and Adam;
    ``critic``: with the discriminator's hooks and update too (an adversarial step)."""
    from vqvae.train import VQVAETask

    torch.manual_seed(0)
    task = VQVAETask(cfg, Path())
    model = task.build_model().train()
    disc = task.build_critic() if critic else None
    optims = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in (model, *([disc.module] if disc else []))]
    batch = {"image": torch.rand(cfg.vqvae_train.batch_size, 3, cfg.data.image_size, cfg.data.image_size)}

    def step() -> None:
        loss, extras = task.loss(model, batch)
        losses = [loss if disc is None else task.adversarial_loss(model, disc.module, loss, extras, 0)[0]]
        if disc is not None:
            losses.append(task.critic_loss(disc.module)[0])
        for optim, value in zip(optims, losses, strict=True):  # the model first, then the critic (as training)
            optim.zero_grad()
            value.backward()
            optim.step()

    return step


def _step_seconds(steps: dict[str, Callable[[], None]], rounds: int = 4) -> dict[str, float]:
    """Median seconds per call of each step, 1 thread, timed in turns (one step of each per round): load that
    comes and goes while timing then slows every run alike, and the step counts keep their ratio."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}  # without the allocation step


TIMING = "timing.json"
"""Under ``--root``: the seconds per VQ-VAE step each run was timed at, kept so that a rerun on the same root
continues the comparison (re-timed, every step count would move by a few per cent and every VQ-VAE train again)."""


def timed_steps(root: Path, steps: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Seconds per step of each of ``steps``: as recorded in ROOT/timing.json, the others timed now (and recorded)."""
    path = root / TIMING
    recorded: dict[str, float] = {}
    if path.is_file():
        try:
            recorded = read_json(path)
            if not isinstance(recorded, dict) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                    for v in recorded.values()):
                raise ValueError("not a mapping of run names to positive seconds")
        except ValueError as err:
            print(f"error: {path}: {err}; it records the timing of the runs under --root (delete it to time them "
                  "again, which retrains every VQ-VAE)", file=sys.stderr)
            sys.exit(2)
    missing = {name: step for name, step in steps.items() if name not in recorded}
    if recorded:
        print(f"VQ-VAE timing of {', '.join(sorted(set(steps) & set(recorded)))} from {path}", flush=True)
    known = recorded | (_step_seconds(missing) if missing else {})
    atomic_write_json(path, known)
    return {name: known[name] for name in steps}


def _run_configs(args: argparse.Namespace) -> dict[str, tuple[str, list[str]]]:
    """name -> (preset, overrides) of every run, VQ-VAE steps left out (decided by timing)."""
    judge = _judge_overrides(args.images, args.csv, args)
    prior = [f"prior_train.max_steps={args.prior_steps}", f"prior_train.checkpoint_every={args.prior_steps}",
             f"prior_train.eval_every={args.prior_steps}", "prior_train.num_workers=1"]
    small = [*prior, "prior_train.lr=1e-3", f"prior_train.warmup_steps={args.prior_steps // 20}"]
    plain = "sample.guidance_scale=1.0"  # no classifier-free guidance: seed's prior is unconditional, gated's has none
    return {"seed": ("seed", [*judge, *prior, plain]),
            "ham128": ("ham128", [*judge, *small, *SMALL_TRANSFORMER]),
            "ham128-gated": ("ham128", [*judge, *small, *SMALL_GATED, plain]),
            "ham128-unguided": ("ham128", [*judge, *small, *SMALL_TRANSFORMER, plain]),
            **{f"ham128-{name}": ("ham128", [*judge, *small, *SMALL_TRANSFORMER, *variant_overrides(name)])
               for name in args.variants}}


def with_overrides(runs: dict[str, tuple[str, list[str]]], extra: list[str]) -> dict[str, tuple[str, list[str]]]:
    """Every run with ``extra`` overrides (``--set``) after its own."""
    return {name: (preset, [*overrides, *extra]) for name, (preset, overrides) in runs.items()}


def _vqvae_overrides(cfg: RunConfig, seconds: float, step: float, adversarial_step: float | None = None) -> list[str]:
    """Steps for ``seconds`` of training; adversarial (``adversarial_step`` s per step with the critic): the
    critic from half-way on, as VQGAN starts it once reconstructions have settled, its weight ramping in over
    a quarter of the run."""
    mean_step = step if adversarial_step is None else (step + adversarial_step) / 2
    steps = max(int(seconds / mean_step), 10)
    warmup = min(cfg.vqvae_train.warmup_steps, steps // 20)
    critic = [] if adversarial_step is None else [f"vqvae_train.adversarial.start_step={steps // 2}",
                                                  f"vqvae_train.adversarial.ramp_steps={steps // 4}"]
    return [f"vqvae_train.max_steps={steps}", f"vqvae_train.warmup_steps={warmup}",
            f"vqvae_train.checkpoint_every={max(steps // 4, 1)}", f"vqvae_train.eval_every={steps}",
            "vqvae_train.num_workers=1", *critic]


def _pipeline(run_dir: Path, preset: str, overrides: list[str], log: Path, cpu: int | None,
              *extra: str) -> subprocess.Popen[bytes]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}

    def start() -> None:  # in the child: it dies with this process, and runs on one core (then 1 thread)
        preexec_die_with_parent()
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    # --until evaluate: the augment stage's classifier trainings, the export and the report compare nothing here.
    argv = [sys.executable, "launch/pipeline.py", "--preset", preset, *overrides, f"run_dir={run_dir}",
            "--until", "evaluate", *extra]
    with open_in_place(log, "ab") as out:
        return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=start)


def _run_child(*args: str) -> int:
    """``python ARGS...`` in the repository, wandb off, dying with this process; its exit status."""
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=os.environ | {"WANDB_MODE": "disabled"},
                          check=False, preexec_fn=preexec_die_with_parent).returncode


def _wait(procs: dict[str, subprocess.Popen[bytes]], root: Path) -> None:
    for name, proc in procs.items():
        if proc.wait() != 0:
            sys.exit(f"error: run {name} failed (exit {proc.returncode}); see {root / (name + '.log')}")


def _link(source: Path, target: Path) -> None:
    if not target.is_symlink():
        target.symlink_to(source, target_is_directory=True)


def _prior_bits(run_dir: Path) -> float:
    from runtime.tracking import read_metrics

    values = [row["val/bits_per_code"] for row in read_metrics(run_dir / "prior" / "metrics.jsonl")
              if row.get("val/bits_per_code") is not None]
    return float(values[-1])


def code_usage(run_dir: Path, codebook_size: int, split: str) -> dict[str, float]:
    """Fraction of the codebook used by the encoded ``split`` (``codes_used``) and the perplexity of its code
    histogram (``perplexity``: K when all K codes are used evenly)."""
    from shards.codes import make_code_eval_loader
    from vqvae.metrics import codebook_usage

    counts = torch.zeros(codebook_size, dtype=torch.float64)
    for batch in make_code_eval_loader(run_dir / "codes" / split, batch_size=256):
        counts += torch.bincount(batch["codes"].flatten(), minlength=codebook_size).double()
    usage = codebook_usage(counts)
    return {"codes_used": usage["code_usage"], "perplexity": usage["perplexity"]}


def _measure(root: Path, name: str) -> dict[str, float]:
    from launch.plan import stage_timings
    from runtime.config import load_config
    from runtime.stages import RunLayout

    run_dir = root / name
    cfg = load_config(run_dir / "config.json")
    evaluation = json.loads((run_dir / "evaluate" / "manifest.json").read_text())["metrics"]
    # A linked VQ-VAE (ham128-gated) was timed in the run that trained it.
    train_s = stage_timings(RunLayout((run_dir / "vqvae").resolve().parent)).get("vqvae", float("nan"))
    return {"vqvae_steps": cfg.vqvae_train.max_steps, "vqvae_train_s": train_s,
            "vqvae_steps_per_s": cfg.vqvae_train.max_steps / train_s,
            "codes_per_image": cfg.data.image_size ** 2 // cfg.downsample_factor ** 2 * (
                (cfg.vqvae.channels[-1] // cfg.vqvae.code_dim) if cfg.vqvae.arch == "seed" else 1),
            **code_usage(run_dir, cfg.vqvae.codebook_size, "val"),
            "bits_per_code": _prior_bits(run_dir),
            **{k: float(v) for k, v in evaluation.items() if isinstance(v, (int, float))}}


_METRICS = (  # key, unit, the run it is compared with (None: the seed run)
    ("recon_psnr", "dB", None), ("recon_ssim", "", None), ("fd_reconstructions", "FD", None),
    ("codes_used", "fraction of K", None), ("perplexity", "codes", None), ("codes_per_image", "codes", None),
    ("bits_per_code", "bits", None),
    ("fd_samples", "FD", "ham128-gated"), ("sample_class_agreement", "rate (chance 0.143)", None),
    ("classifier_val_accuracy", "rate", None), ("classifier_val_balanced_accuracy", "rate", None),
    ("fd_real_train_floor", "FD", None), ("fd_samples_floor", "FD", None),
    ("classifier_recon_balanced_accuracy", "rate", None),
    ("vqvae_steps", "steps", None), ("vqvae_train_s", "s", None), ("vqvae_steps_per_s", "steps/s", None),
)


_UNITS = {key: unit for key, unit, _ in _METRICS}
_BASELINES = {key: base for key, _, base in _METRICS if base}


def _baseline(key: str, name: str, names: Collection[str]) -> str:
    """The run that ``name``'s ``key`` is compared with: the one ``_METRICS`` names where it was run, else seed."""
    base = _BASELINES.get(key)
    return base if base in names and name != "seed" else "seed"


def _rows(results: dict[str, dict[str, float]], prefix: str = "", keys: Iterable[str] = _UNITS) -> list[Row]:
    """One row per metric ``key`` and run, with its baseline; ``prefix`` names another judgement (held out)."""
    return [Row("quality", f"{prefix}{name}: {key}", values[key], _UNITS.get(key, ""),
                f"{prefix}{_baseline(key, name, results)}: {key}")
            for key in keys for name, values in results.items()]


def _verdicts(results: dict[str, dict[str, float]]) -> list[str]:
    seed, best, gated = results["seed"], results["ham128"], results["ham128-gated"]
    psnr_gain = best["recon_psnr"] - seed["recon_psnr"]
    fd_ratio = best["fd_reconstructions"] / seed["fd_reconstructions"]
    recon_ok = psnr_gain >= 2 or (fd_ratio <= 0.5 and psnr_gain >= 0)
    sample_ratio = best["fd_samples"] / gated["fd_samples"]
    agreement = best["sample_class_agreement"] * len(CLASSES)
    return [f"reconstruction: {psnr_gain:+.2f} dB PSNR, recon FD x{fd_ratio:.2f} vs seed "
            f"(target >= +2 dB, or <= 0.5x with PSNR no worse): {'MET' if recon_ok else 'MISSED'}",
            f"samples: FD x{sample_ratio:.2f} vs the gated PixelCNN (target <= 0.5x): "
            f"{'MET' if sample_ratio <= 0.5 else 'MISSED'}; a perfect prior would score "
            f"{best['fd_samples_floor']:.3f} through this VQ-VAE (transformer {best['fd_samples']:.3f}, "
            f"gated {gated['fd_samples']:.3f})",
            f"class agreement: {best['sample_class_agreement']:.3f} = {agreement:.2f}x chance (target >= 3x): "
            f"{'MET' if agreement >= 3 else 'MISSED'}; without guidance "
            f"{results['ham128-unguided']['sample_class_agreement']:.3f} (sample FD "
            f"{results['ham128-unguided']['fd_samples']:.3f}); gated {gated['sample_class_agreement']:.3f}; the "
            f"judge's balanced accuracy on real images {best['classifier_val_balanced_accuracy']:.3f}, on their "
            f"reconstructions {best['classifier_recon_balanced_accuracy']:.3f} (a perfect prior's)",
            *(f"{name}: {r['recon_psnr']:.2f} dB PSNR, recon FD {r['fd_reconstructions']:.3f}, sample FD "
              f"{r['fd_samples']:.3f} (a perfect prior's {r['fd_samples_floor']:.3f}), class agreement "
              f"{r['sample_class_agreement']:.3f}, in {r['vqvae_steps']:.0f} VQ-VAE steps"
              for name, r in results.items() if _is_variant(name))]


def _grids(root: Path, variants: list[str], count: int = 8) -> None:
    """ROOT/grids/reconstructions.png (real validation images, then the seed, ham128 and ``variants`` runs'
    reconstructions) and samples-NAME.png (one row per class) for the conditional runs."""

    import numpy as np
    import webdataset as wds

    from runtime.checkpoint import load_weights
    from runtime.config import load_config
    from runtime.images import save_grid
    from runtime.integrity import stage_weights, verified_file
    from shards.images import decode_rgb
    from shards.loader import make_eval_loader
    from vqvae.models import build_vqvae

    out = root / "grids"
    out.mkdir(exist_ok=True)
    batch = next(iter(make_eval_loader(root / "ham128" / "data" / "val", batch_size=count, max_batches=1)))
    rows = [batch["image"]]
    tokenizers = ["seed", "ham128", *variants]
    for name in tokenizers:
        cfg = load_config(root / name / "config.json")
        model = build_vqvae(cfg.vqvae).eval()
        manifest = json.loads((root / name / "vqvae" / "manifest.json").read_text())
        load_weights(model, stage_weights(root / name / "vqvae", manifest))
        with torch.no_grad():
            rows.append(model(batch["image"]).recon.clamp(0, 1))
    save_grid(torch.cat(rows), out / "reconstructions.png", nrow=count, row_labels=["real", *tokenizers])
    for name in ("ham128", "ham128-gated", *variants):
        manifest = json.loads((root / name / "samples" / "manifest.json").read_text())
        by_class: dict[int, list[torch.Tensor]] = {c: [] for c in range(len(CLASSES))}
        folder = root / name / "samples"
        shards = [str(verified_file(folder, s.get("name"), s.get("sha256"), manifest=folder / "manifest.json"))
                  for s in manifest["shards"]]
        for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
            pixels = np.array(decode_rgb(sample["png"], f"{sample['__url__']}: {sample['__key__']}"))
            by_class[int(sample["cls"])].append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
        images = [img for c in range(len(CLASSES)) for img in by_class[c][:count]]
        save_grid(torch.stack(images), out / f"samples-{name}.png", nrow=count, row_labels=CLASSES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench quality", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="VQ-VAE training time of each run")
    parser.add_argument("--root", type=Path, default=Path("/tmp/lesion-vq-quality"),
                        help="where the run directories go (not inside the repository)")
    parser.add_argument("--images", type=Path, default=SHARED_HAM / "images")
    parser.add_argument("--csv", type=Path, default=SHARED_HAM / "HAM10000_metadata.csv")
    parser.add_argument("--prior-steps", type=int, default=1000)
    parser.add_argument("--classifier-steps", type=int, default=4000)
    parser.add_argument("--per-class", type=int, default=100,
                        help="samples per class on average (ham128's sample.per_class; drawn in the data's class mix)")
    parser.add_argument("--variants", nargs="*", type=_variant, default=[],
                        help=f"also ham128 with these tokenizers, at the same VQ-VAE wall time: {', '.join(VARIANTS)}, "
                             "or several joined by + (e.g. fsq+conv)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every run, after the comparison's own (e.g. encode.train_views=1: a "
                             "shorter run on a busy machine, each prior then trains on one view per image)")
    parser.add_argument("--measure-only", action="store_true",
                        help="train nothing: re-run the evaluate stage of the runs already under --root and report")
    args = parser.parse_args(argv)
    for path in (args.images, args.csv):  # also for --measure-only: the held-out judgement reads the originals
        if not path.exists():
            print(f"error: {path} does not exist; give --images DIR --csv CSV (HAM10000 or ISIC 2018 layout)",
                  file=sys.stderr)
            sys.exit(2)
    if args.measure_only:
        names = list(_run_configs(args))
        missing = [name for name in names if not (args.root / name / "config.json").is_file()]
        if missing:
            print(f"error: --measure-only: no run {', '.join(missing)} under {args.root} (each needs its "
                  "config.json); run `python -m bench quality` there first", file=sys.stderr)
            sys.exit(2)
        _report(args.root.resolve(), names, reevaluate=True, images=args.images, csv=args.csv)
        return
    root = args.root.resolve()
    runs = with_overrides(_run_configs(args), args.set)
    for preset, overrides in runs.values():  # a bad --set is one line (exit 2) before anything is made
        try:
            build_config(preset, overrides)
        except ConfigError as err:
            print(f"error: --set: {err}", file=sys.stderr)
            sys.exit(2)
    root.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(1)
    configs = {name: build_config(preset, [*over, f"run_dir={root / name}"]) for name, (preset, over) in runs.items()}
    timed = ("seed", "ham128", *(f"ham128-{v}" for v in args.variants))
    steps = {name: _training_step(configs[name], critic=False) for name in timed}
    steps |= {f"{name} critic": _training_step(configs[name], critic=True) for name in timed if _adversarial(name)}
    step = timed_steps(root, steps)
    print("VQ-VAE seconds per step (1 thread): " + ", ".join(f"{k} {v:.3f} ({1 / v:.2f} steps/s)"
                                                             for k, v in step.items()), flush=True)
    vq = {name: _vqvae_overrides(configs[name], args.minutes * 60, step[name if name in step else "ham128"],
                                 step.get(f"{name} critic"))
          for name in runs}

    # One packed data set and one judge for every run, made first with all cores (their data and classifier
    # sections are the same, so are their identities) and linked into the other runs.
    # --until, not --only: on a rerun, what is up to date is kept (--only would make it again).
    made = _run_child("launch/pipeline.py", "--preset", "ham128", *runs["ham128"][1], *vq["ham128"],
                      f"run_dir={root / 'ham128'}", "--until", "classifier")
    if made != 0:
        sys.exit(f"error: the data and classifier stages failed (exit {made})")
    cpus = sorted(os.sched_getaffinity(0))
    (root / "seed").mkdir(exist_ok=True)
    for folder in ("data", "classifier"):
        _link(root / "ham128" / folder, root / "seed" / folder)
    started = time.time()
    procs = {name: _pipeline(root / name, runs[name][0], [*runs[name][1], *vq[name]], root / f"{name}.log",
                             cpus[i] if len(cpus) >= 2 else None)
             for i, name in enumerate(("seed", "ham128"))}
    _wait({"ham128": procs.pop("ham128")}, root)
    for name, shared in (("ham128-gated", ("data", "vqvae", "codes", "classifier")),
                         ("ham128-unguided", ("data", "vqvae", "codes", "prior", "classifier"))):
        (root / name).mkdir(exist_ok=True)
        for folder in shared:
            _link(root / "ham128" / folder, root / name / folder)
    procs["ham128-gated"] = _pipeline(root / "ham128-gated", runs["ham128-gated"][0],
                                      [*runs["ham128-gated"][1], *vq["ham128-gated"]], root / "ham128-gated.log", None)
    _wait({"ham128-unguided": _pipeline(root / "ham128-unguided", runs["ham128-unguided"][0],
                                        [*runs["ham128-unguided"][1], *vq["ham128-unguided"]],
                                        root / "ham128-unguided.log", None)}, root)
    _wait(procs, root)
    variants = [f"ham128-{v}" for v in args.variants]  # two at a time, side by side, one core each
    for pair in (variants[i:i + 2] for i in range(0, len(variants), 2)):
        for name in pair:
            (root / name).mkdir(exist_ok=True)
            for folder in ("data", "classifier"):
                _link(root / "ham128" / folder, root / name / folder)
        _wait({name: _pipeline(root / name, runs[name][0], [*runs[name][1], *vq[name]], root / f"{name}.log",
                               cpus[i] if len(cpus) >= 2 else None) for i, name in enumerate(pair)}, root)
    print(f"all runs done in {(time.time() - started) / 60:.1f} min", flush=True)
    _report(root, list(runs), reevaluate=False, images=args.images, csv=args.csv)


def _held_out_images(root: Path, images: Path) -> Path:
    """ROOT/held-out: a link to the original file of every image of the packed test split."""
    import webdataset as wds

    from shards.ingest import find_images
    from shards.manifest import shard_paths

    originals, _ = find_images(images)
    folder = root / "held-out"
    folder.mkdir(exist_ok=True)
    # Only the keys: no decoder, so nothing of a sample but its name is read into Python.
    split = [str(path) for path in shard_paths(root / "ham128" / "data" / "test")]
    for sample in wds.WebDataset(split, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        if key not in originals:
            sys.exit(f"error: test-split image {key} is not in {images} (give the --images the runs were "
                     "packed from)")
        link = folder / originals[key].name
        if not link.is_symlink():
            link.symlink_to(originals[key].resolve())
    return folder


def _judge_held_out(root: Path, names: list[str], images: Path, csv: Path) -> dict[str, dict[str, float]]:
    """Each run judged on the test split's originals by ``judge.evaluate --images``: its metrics by name, with the
    code usage of its encoded test split."""
    from runtime.config import load_config

    folder = _held_out_images(root, images)
    results = {}
    for name in names:
        out = root / f"held-out-{name}.json"
        done = _run_child("-m", "judge.evaluate", "--run-dir", str(root / name), "--images", str(folder), "--csv",
                          str(csv), "--out", str(out))
        if done != 0:
            sys.exit(f"error: judging {root / name} on the held-out images failed (exit {done})")
        judged = json.loads(out.read_text())
        codebook_size = load_config(root / name / "config.json").vqvae.codebook_size
        results[name] = {"images_judged": float(judged["images_judged"]),
                         **{k: float(v) for k, v in judged["metrics"].items() if isinstance(v, (int, float))},
                         **code_usage(root / name, codebook_size, "test")}  # the test split's codes
    return results


_HELD_OUT = ("recon_psnr", "fd_reconstructions", "codes_used", "perplexity", "fd_samples", "fd_samples_floor",
             "classifier_balanced_accuracy")
"""Rows of the held-out judgement: what does not depend on the validation split only."""


def tokenizer_verdicts(held: dict[str, dict[str, float]]) -> list[str]:
    """Issue 30's targets for each tokenizer (``ham128`` and the variants) against ``seed`` on the held-out
    images: >= +1.5 dB PSNR, <= 0.7x the reconstruction Fréchet distance, >= 95 % of the codes used, and a
    perfect prior's sample Fréchet distance (``fd_samples_floor``) no higher than seed's."""
    seed = held["seed"]
    lines = []
    for name, r in held.items():
        if name != "ham128" and not _is_variant(name):
            continue
        gain, ratio = r["recon_psnr"] - seed["recon_psnr"], r["fd_reconstructions"] / seed["fd_reconstructions"]
        met = (gain >= 1.5 and ratio <= 0.7 and r["codes_used"] >= 0.95
               and r["fd_samples_floor"] <= seed["fd_samples_floor"])
        lines.append(f"tokenizer {name} (held out): {gain:+.2f} dB PSNR, recon FD x{ratio:.2f}, {r['codes_used']:.0%} "
                     f"of codes used (perplexity {r['perplexity']:.0f}), floor {r['fd_samples_floor']:.3f} vs seed's "
                     f"{seed['fd_samples_floor']:.3f} (targets >= +1.5 dB, <= 0.7x, >= 95 %, floor <= seed's): "
                     f"{'MET' if met else 'MISSED'}")
    return lines


def _held_out_verdict(held: dict[str, dict[str, float]]) -> str:
    seed, best, gated = held["seed"], held["ham128"], held["ham128-gated"]
    return (f"held out ({best['images_judged']:.0f} test-split images): ham128 "
            f"{best['recon_psnr'] - seed['recon_psnr']:+.2f} dB PSNR and recon "
            f"FD x{best['fd_reconstructions'] / seed['fd_reconstructions']:.2f} vs seed; sample FD "
            f"x{best['fd_samples'] / gated['fd_samples']:.2f} vs gated (transformer {best['fd_samples']:.3f}, gated "
            f"{gated['fd_samples']:.3f}, a perfect prior's {best['fd_samples_floor']:.3f})")


def _report(root: Path, names: list[str], reevaluate: bool, images: Path, csv: Path) -> None:
    """Measure the finished runs under ``root``, on the validation split and on the held-out test split;
    ``reevaluate``: first re-run their evaluate stage (a changed judge or metric), which trains nothing."""
    for name in names if reevaluate else ():
        done = _run_child("launch/pipeline.py", "--config", str(root / name / "config.json"), "--only", "evaluate")
        if done != 0:
            sys.exit(f"error: evaluating {root / name} failed (exit {done})")
    results = {name: _measure(root, name) for name in names}
    held = _judge_held_out(root, names, images, csv)
    _grids(root, [name for name in names if _is_variant(name)])
    md, js = write_results([*_rows(results), *_rows(held, "held out: ", _HELD_OUT)], root, quick=False)
    print(md.read_text())
    print("\n".join([*_verdicts(results), _held_out_verdict(held), *tokenizer_verdicts(held)]))
    print(f"written: {md}, {js} and {root / 'grids'}/*.png")
