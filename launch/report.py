"""Self-contained HTML report of a run (finished or not), plus ``metrics.json``.

    python -m launch.report RUN_DIR          (or --config RUN_DIR/config.json, as the pipeline runs it)

Reads only what the stages wrote (manifests, metrics.jsonl, PNGs) and writes
``RUN_DIR/report/{report.html,metrics.json,*.png}``; images are embedded, so the HTML opens
anywhere without a server.
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib.metadata
import io
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from judge.comparison import comparison_tables
from launch.plan import stage_timings
from runtime.cli import run_cli
from runtime.config import CLASSES, ConfigError, RunConfig, add_config_args, config_from_args
from runtime.files import atomic_write_bytes, atomic_write_json, naming, read_json
from runtime.integrity import recorded_problems
from runtime.lineage import claim_run_dir, claim_stage_dir
from runtime.log import get_logger
from runtime.stages import STAGES, RunLayout
from runtime.tracking import read_metrics

_CURVES = {
    "vqvae": [("train/loss", "training loss"), ("train/recon_mse", "training reconstruction MSE"),
              ("val/psnr", "validation PSNR (dB)"), ("val/ssim", "validation SSIM"),
              ("val/perplexity", "validation codebook perplexity"), ("val/code_usage", "fraction of codes used")],
    "prior": [("train/bits_per_code", "training bits per code"), ("val/bits_per_code", "validation bits per code"),
              ("val/sample_code_kl", "KL(data || samples) of code histograms, bits")],
}
_VERSIONED = ("lesion-vq", "torch", "torchvision", "accelerate", "webdataset", "submitit", "wandb", "numpy")
log = get_logger("report")


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    return RunLayout.of(cfg).stage_dir(stage)


def _manifest(cfg: RunConfig, stage: str) -> dict[str, Any] | None:
    path = RunLayout.of(cfg).manifest(stage)
    return read_json(path) if path.is_file() else None


def _png_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _figure_png(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())  # a full disk leaves no half-written PNG
    return path


def _curves(cfg: RunConfig, stage: str, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(stage_dir(cfg, stage) / "metrics.jsonl")
    present = [(k, title) for k, title in _CURVES[stage] if any(k in r and r[k] is not None for r in rows)]
    if not present:
        return None
    cols = min(3, len(present))
    rows_n = -(-len(present) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax in axes.flat[len(present):]:
        ax.set_visible(False)
    for ax, (key, title) in zip(axes.flat, present, strict=False):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = _figure_png(fig, out / f"curves-{stage}.png")
    plt.close(fig)
    return path


def _codebook_histogram(cfg: RunConfig, out: Path) -> tuple[Path | None, dict[str, float]]:
    """Usage of every code over the encoded training split, sorted by frequency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shards.codes import make_code_eval_loader
    from vqvae.metrics import codebook_usage

    manifest = _manifest(cfg, "encode")
    if manifest is None:
        return None, {}
    damaged = recorded_problems(stage_dir(cfg, "encode"), manifest, limit=1)
    if damaged:  # read only as recorded: a summary of changed shards would describe codes nobody made
        log.warning("codebook histogram left out: %s", damaged[0])
        return None, {}
    counts = np.zeros(manifest["codebook_size"], dtype=np.int64)
    for batch in make_code_eval_loader(stage_dir(cfg, "encode") / "train", batch_size=256):
        counts += np.bincount(batch["codes"].numpy().ravel(), minlength=counts.size)
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.bar(np.arange(counts.size), np.sort(counts)[::-1], width=1.0)
    ax.set_yscale("symlog")
    ax.set_xlabel("code (sorted by use)", fontsize=8)
    ax.set_ylabel("occurrences", fontsize=8)
    ax.set_title("codebook usage over the training split", fontsize=9)
    path = _figure_png(fig, out / "codebook-usage.png")
    plt.close(fig)
    import torch

    return path, codebook_usage(torch.from_numpy(counts).double())


def collect_metrics(cfg: RunConfig) -> dict[str, Any]:
    """Final metrics of every stage, from the same JSONL files wandb was fed."""
    metrics: dict[str, Any] = {"run_dir": str(cfg.run_dir), "preset": cfg.preset,
                               "timings_s": stage_timings(RunLayout.of(cfg))}
    for stage in ("vqvae", "prior"):
        rows = read_metrics(stage_dir(cfg, stage) / "metrics.jsonl")
        last: dict[str, Any] = {}
        for row in rows:
            last.update({k: v for k, v in row.items() if v is not None})
        metrics[stage] = last
    data = _manifest(cfg, "data")
    if data is not None:
        metrics["data"] = {k: data.get(k) for k in ("splits", "num_skipped", "image_size") if k in data}
    sample = _manifest(cfg, "sample")
    if sample is not None:
        metrics["sample"] = {"num_samples": sample["num_samples"], "samples_per_s": sample["samples_per_s"]}
    evaluation = _manifest(cfg, "evaluate")
    if evaluation is not None:
        metrics["evaluate"] = evaluation["metrics"]
    return metrics


def _evaluation_section(metrics: dict[str, Any]) -> str:
    """The judge's numbers (judge/evaluate.py), or a note that the stage has not run."""
    found = metrics.get("evaluate")
    if not found:
        return "<p>not available yet (the evaluate stage has not completed)</p>"
    rows = [[k, f"{v:.4g}" if isinstance(v, float) else v] for k, v in found.items()
            if not isinstance(v, dict)]
    per_class = found.get("sample_class_agreement_per_class", {})
    return (_table(["metric", "value"], rows)
            + "<p>samples classified as the class they were drawn for:</p>"
            + _table(list(per_class), [[f"{v:.2f}" for v in per_class.values()]]))


def _augment_section(cfg: RunConfig) -> str:
    """The augment stage's comparison (judge/augment.py): arms, per-class scores, paired differences."""
    found = _manifest(cfg, "augment")
    if found is None:
        return "<p>not available yet (the augment stage has not completed)</p>"
    added = ", ".join(f"{c} {n}" for c, n in found["synthetic_added"].items() if n) or "none"
    intro = (f"<p>fresh classifiers of the judge's recipe, {len(found['seeds'])} seeds x {found['steps']} steps "
             f"each, judged on the {found['test_images']} real test images; synthetic images added: {added}; "
             f"cost {found['cost']['total_seconds'] / 60:.1f} min. Differences: mean over seeds, paired by seed, "
             f"with {found['differences']['synthetic - real']['macro_f1']['confidence']:.0%} bootstrap "
             "intervals.</p>")
    return intro + "".join(_table(headers, rows) for headers, rows in comparison_tables(found))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _data_section(cfg: RunConfig) -> str:
    data = _manifest(cfg, "data")
    if data is None:
        return "<p>data stage not complete yet.</p>"
    rows = []
    for split in ("train", "val", "test"):
        path = stage_dir(cfg, "data") / split / "manifest.json"
        if path.is_file():
            m = read_json(path)
            rows.append([split, m["num_samples"], *(m["class_counts"].get(c, 0) for c in CLASSES)])
    parts = [_table(["split", "images", *CLASSES], rows)]
    skipped = data.get("skipped", [])
    if skipped:
        reasons: dict[str, int] = {}
        for item in skipped:
            reason = str(item.get("reason", "?")).split(":")[-1].strip()[:80]
            reasons[reason] = reasons.get(reason, 0) + 1
        parts.append(f"<p>{len(skipped)} input(s) skipped:</p>"
                     + _table(["reason", "count"], sorted(reasons.items(), key=lambda kv: -kv[1])))
        parts.append(_table(["id", "path", "reason"], [[s.get("id"), s.get("path"), s.get("reason")]
                                                        for s in skipped[:50]]))
    else:
        parts.append("<p>no input was skipped.</p>")
    return "\n".join(parts)


def _img(path: Path | None, alt: str, width: int | None = None) -> str:
    """An embedded PNG; ``width`` scales small image grids up (drawn pixelated) so they can be seen."""
    if path is None or not path.is_file():
        return f"<p><em>{html.escape(alt)}: not available yet.</em></p>"
    size = f' width="{width}"' if width else ""
    return f'<figure><img alt="{html.escape(alt)}"{size} src="data:image/png;base64,{_png_b64(path)}">' \
           f"<figcaption>{html.escape(alt)}</figcaption></figure>"


def write_report(cfg: RunConfig) -> Path:
    claim_run_dir(cfg)
    out = stage_dir(cfg, "report")
    claim_stage_dir(out, "report", "latest")  # always re-made: one identity
    with naming(out):  # a failed write (disk full) names no file by itself
        return _write_report(cfg, out)


def _write_report(cfg: RunConfig, out: Path) -> Path:
    metrics = collect_metrics(cfg)
    hist_png, code_stats = _codebook_histogram(cfg, out)
    metrics["codebook_train"] = code_stats
    atomic_write_json(out / "metrics.json", metrics)

    recon = sorted(stage_dir(cfg, "vqvae").glob("recon-step-*.png"))
    sample_png = stage_dir(cfg, "sample") / "samples.png"
    versions = []
    for name in _VERSIONED:
        try:
            versions.append([name, importlib.metadata.version(name)])
        except importlib.metadata.PackageNotFoundError:
            versions.append([name, "not installed"])
    versions.append(["python", platform.python_version()])
    done = [s.name for s in STAGES if RunLayout.of(cfg).manifest(s.name).is_file()]
    final_rows = [[stage, key, f"{value:.4g}" if isinstance(value, float) else value]
                  for stage in ("vqvae", "prior") for key, value in sorted(metrics[stage].items())
                  if key.startswith("val/")]
    body = f"""
<h1>lesion-vq run report</h1>
<p>run <code>{html.escape(str(cfg.run_dir))}</code>, preset <b>{html.escape(cfg.preset)}</b>;
completed stages: {html.escape(', '.join(done) or 'none')}</p>
<h2>Data</h2>{_data_section(cfg)}
<h2>VQ-VAE</h2>{_img(_curves(cfg, 'vqvae', out), 'VQ-VAE training curves')}
{_img(recon[-1] if recon else None, 'validation images (top) and reconstructions (bottom), last evaluation',
       width=800)}
{_img(hist_png, 'codebook usage histogram')}
<h2>Prior</h2>{_img(_curves(cfg, 'prior', out), 'prior training curves')}
<h2>Samples</h2>{_img(sample_png, 'class-conditional samples, one row per class: ' + ', '.join(CLASSES),
                      width=400)}
<h2>Evaluation</h2>{_evaluation_section(metrics)}
<h2>Do synthetic lesions help a classifier?</h2>{_augment_section(cfg)}
<h2>Final validation metrics</h2>{_table(['stage', 'metric', 'value'], final_rows)}
<h2>Timings</h2>{_table(['stage', 'wall seconds'], [[k, f'{v:.1f}'] for k, v in metrics['timings_s'].items()])}
<h2>Versions</h2>{_table(['package', 'version'], versions)}
<h2>Configuration</h2><pre>{html.escape(json.dumps(cfg.model_dump(mode='json'), indent=2))}</pre>
"""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>lesion-vq report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:2px 8px;font-size:90%}}
img{{max-width:100%;image-rendering:pixelated}}figure{{margin:1em 0}}figcaption{{font-size:85%;color:#555}}
pre{{background:#f6f6f6;padding:1em;font-size:80%;overflow:auto}}</style></head><body>{body}</body></html>"""
    path = out / "report.html"
    # backslashreplace: a file name with bytes that are not UTF-8 (kept in the data manifest's skipped list) is
    # shown as \udcXX instead of failing the report on every rerun.
    atomic_write_bytes(path, page.encode("utf-8", "backslashreplace"))
    return path


def main(args: argparse.Namespace) -> int:
    if args.overrides and "=" not in args.overrides[0]:  # python -m launch.report RUN_DIR [KEY=VALUE ...]
        if args.config is not None:
            raise ConfigError("give a run directory or --config, not both")
        run_dir = Path(args.overrides.pop(0))
        if not run_dir.is_dir():
            raise ConfigError(f"run directory {run_dir} does not exist or is not a folder")
        if not (run_dir / "config.json").is_file():
            raise ConfigError(f"{run_dir} is not a lesion-vq run directory: it has no config.json (written by "
                              "python launch/pipeline.py); nothing to report")
        args.config = run_dir / "config.json"
    cfg = config_from_args(args)
    # Logged, not printed: the pipeline prints the report's path in its own summary, once.
    log.info("report written: %s", write_report(cfg))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage="%(prog)s RUN_DIR | --config C")
    add_config_args(p)
    return p


if __name__ == "__main__":
    run_cli(main, parser())
