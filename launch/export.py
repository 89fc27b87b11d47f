"""Export a finished run's models in the Hugging Face layout, each loadable without the run directory.

    python -m launch.export --config RUN_DIR/config.json

Writes ``RUN_DIR/export/{tokenizer,prior,classifier}/``, each with ``config.json`` (what to build, the weights'
sha256 and lineage: runtime/pretrained.py), ``model.safetensors`` (the stage's final weights, byte for byte) and
``README.md``, a model card: architecture and parameter count, training data (split counts per class, licence),
training steps and time, the evaluate stage's metrics, intended use and limitations. Load them with
``vqvae.Tokenizer`` / ``prior.Generator`` / ``judge.Classifier`` ``.from_pretrained(folder)`` (or upload one with
``.push_to_hub``: docs/library.md).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import torch

from judge.api import Classifier, classifier_config
from judge.classifier import build_classifier
from launch.plan import stage_timings
from prior.api import Generator, prior_config
from prior.models import build_prior
from runtime.cli import run_cli, stage_parser
from runtime.config import CLASSES, RunConfig, config_from_args
from runtime.files import atomic_path, atomic_write_text, sha256_file
from runtime.integrity import stage_weights
from runtime.lineage import StageRun, begin_stage
from runtime.log import get_logger
from runtime.pretrained import CONFIG, WEIGHTS, write_model_config
from runtime.stages import RunLayout
from vqvae.api import Tokenizer, tokenizer_config
from vqvae.models import build_vqvae, count_parameters

log = get_logger("export")

LICENCES = {
    "isic": "HAM10000 / ISIC 2018 images (Tschandl et al. 2018, ISIC archive): CC BY-NC 4.0. The weights are derived "
            "from them and shared under the same licence: no commercial use.",
    "synthetic": "procedurally generated lesion images (shards/synth.py), no real patient data. Shared under CC BY-NC "
                 "4.0 like the models trained on HAM10000.",
}
INTENDED_USE = ("Research on generative models and image tokenizers for dermoscopy: reconstructing, tokenizing and "
                "sampling lesion images, and measuring them. **Not for diagnosis, screening or any clinical "
                "decision**: nothing here was validated on patients, and a class label on a generated image is not "
                "a diagnosis.")


def _model_folder(cfg: RunConfig, run: StageRun, name: str, kind: str, config: dict[str, Any]) -> Path:
    """``export/KIND/``: the stage's verified final weights copied byte for byte, then their config.json."""
    folder = run.out_dir / kind
    folder.mkdir(parents=True, exist_ok=True)
    source = stage_weights(RunLayout.of(cfg).stage_dir(name), run.manifests[name])
    with atomic_path(folder / WEIGHTS) as tmp:
        shutil.copyfile(source, tmp)
    write_model_config(folder, {**config, "lineage": run.manifests[name]["lineage"]})
    return folder


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}",
            *(f"| {' | '.join(str(cell) for cell in row)} |" for row in rows)]


def _data_section(cfg: RunConfig, data: dict[str, Any]) -> list[str]:
    splits = data.get("splits", {})
    rows = [(c, *(splits.get(s, {}).get("class_counts", {}).get(c, 0) for s in ("train", "val", "test")))
            for c in CLASSES]
    rows.append(("all", *(splits.get(s, {}).get("num_samples", 0) for s in ("train", "val", "test"))))
    source = "HAM10000 / ISIC dermoscopy images" if cfg.data.source == "isic" else "synthetic lesions"
    return ["## Training data", "",
            f"{source} at {cfg.data.image_size}x{cfg.data.image_size} px, split by lesion (no lesion in two "
            "splits). Images per class and split:", "", *_table(rows, ("class", "train", "val", "test")), "",
            f"Licence: {LICENCES[cfg.data.source]}", ""]


def _metrics_section(evaluation: dict[str, Any]) -> list[str]:
    metrics = evaluation.get("metrics", {})
    rows = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in sorted(metrics.items())
            if not isinstance(v, dict)]
    rows += [(f"{k}: {c}", f"{x:.4g}") for k, v in sorted(metrics.items()) if isinstance(v, dict)
             for c, x in v.items()]
    return ["## Evaluation (the evaluate stage)", "",
            "Judged by the run's own lesion classifier (export/classifier; no pretrained network): Fréchet distances "
            "in its feature space are comparable between runs of this project only, not to Inception FID.", "",
            *_table(rows, ("metric", "value")), ""]


def _card(title: str, kind: str, architecture: list[str], cfg: RunConfig, run: StageRun, stage: str,
          optim: Any, seconds: float | None, load: str) -> str:
    steps = run.manifests[stage].get("steps")
    time = f"{seconds / 60:.1f} min wall time" if seconds is not None else "wall time not recorded"
    lines = ["---", "license: cc-by-nc-4.0", "library_name: lesion-vq",
             f"tags: [lesion-vq, dermoscopy, {kind}, research-only]", "---", "", f"# {title}", "",
             "## Architecture", "", *architecture, "",
             *_data_section(cfg, run.manifests["data"]),
             "## Training", "",
             f"{steps} optimizer steps of batch {optim.batch_size} per process, learning rate {optim.lr} "
             f"({optim.schedule}, {optim.warmup_steps} warm-up steps), {time}; preset `{cfg.preset}`. The complete "
             f"settings are in config.json and the run's config.json; lineage: `{run.manifests[stage]['lineage']}`.",
             "", *_metrics_section(run.manifests["evaluate"]),
             "## Intended use", "", INTENDED_USE, "",
             "## Limitations", "",
             f"- Trained on {run.manifests['data'].get('splits', {}).get('train', {}).get('num_samples', '?')} "
             f"images at {cfg.data.image_size} px; other sizes are resized to it (bilinear, aspect not kept).",
             "- Real lesion sets are dominated by one class (HAM10000: 67 % NV); rare classes are learned from few "
             "images.",
             "- No evaluation across skin types, devices or clinics; dermoscopy only.",
             "- The judge shares the training data, so its scores say how the models compare, not how they would "
             "fare on new data.", "",
             "## Use", "", "```python", *load.splitlines(), "```", ""]
    return "\n".join(lines)


def export(cfg: RunConfig, run: StageRun) -> list[str]:
    """Write the three model folders and their cards; returns the sha256 of every file written."""
    timings = stage_timings(RunLayout.of(cfg))
    m = run.manifests
    tokenizer = _model_folder(cfg, run, "vqvae", "tokenizer", tokenizer_config(cfg.vqvae, cfg.data.image_size))
    grid, codebook = tuple(m["prior"]["grid"]), int(m["prior"]["codebook_size"])
    prior = _model_folder(cfg, run, "prior", "prior", prior_config(cfg.prior, codebook, grid))
    classifier = _model_folder(cfg, run, "classifier", "classifier",
                               classifier_config(cfg.classifier, cfg.data.image_size))
    vq = cfg.vqvae
    vq_params = count_parameters(build_vqvae(vq))
    prior_params = sum(p.numel() for p in build_prior(cfg.prior, codebook, len(CLASSES)).parameters())
    judge_params = sum(p.numel() for p in build_classifier(cfg.classifier, len(CLASSES)).parameters())
    cards = {
        tokenizer: _card(
            "lesion-vq tokenizer (VQ-VAE)", "vq-vae",
            [f"VQ-VAE, `{vq.arch}` architecture: encoder widths {vq.channels}, code vectors of {vq.code_dim}, "
             f"quantizer `{vq.quantizer.kind}` with {vq.codebook_size} codes. A {cfg.data.image_size} px image "
             f"becomes a "
             f"{grid[0]}x{grid[1]} grid of codes. {vq_params:,} parameters."],
            cfg, run, "vqvae", cfg.vqvae_train, timings.get("vqvae"),
            "from vqvae import Tokenizer\n\ntokenizer = Tokenizer.from_pretrained(\"PATH/export/tokenizer\")\n"
            "codes = tokenizer.encode(images)   # B×3×H×W uint8 or float, or PIL images\n"
            "images = tokenizer.decode(codes)   # floats in [0, 1]"),
        prior: _card(
            "lesion-vq prior (class-conditional generator)", "autoregressive-prior",
            [f"Autoregressive prior `{cfg.prior.arch}` over {grid[0]}x{grid[1]} grids of {codebook} codes, "
             f"{'conditioned on the 7 lesion classes' if cfg.prior.conditional else 'unconditional'}: "
             f"{cfg.prior.model_dump(mode='json')}. {prior_params:,} parameters. Decoded to images by the tokenizer "
             "exported beside it (../tokenizer)."],
            cfg, run, "prior", cfg.prior_train, timings.get("prior"),
            "from prior import Generator\n\ngenerator = Generator.from_pretrained(\"PATH/export/prior\")  # with "
            "../tokenizer\nout = generator.sample([\"MEL\", \"NV\"], n=4, seed=0)   # out.images, out.codes"),
        classifier: _card(
            "lesion-vq judge (lesion classifier)", "image-classification",
            [f"Four stride-2 conv blocks from width {cfg.classifier.width}, global average pooling, a linear layer to "
             f"the 7 classes {', '.join(CLASSES)}; its pooled features give the Fréchet distances. "
             f"{judge_params:,} parameters. Trained with class weights `{cfg.classifier.balance}`."],
            cfg, run, "classifier", cfg.classifier_train, timings.get("classifier"),
            "from judge import Classifier\n\nclassifier = Classifier.from_pretrained(\"PATH/export/classifier\")\n"
            "guesses = classifier.predict(images)"),
    }
    for folder, card in cards.items():
        atomic_write_text(folder / "README.md", card)
    return [sha256_file(folder / name) for folder in cards for name in (WEIGHTS, CONFIG, "README.md")]


def check_loads(folder: Path) -> None:
    """Each exported folder loads through the API before the stage calls itself complete."""
    device = torch.device("cpu")
    Tokenizer.from_pretrained(folder / "tokenizer", device=device)
    Generator.from_pretrained(folder / "prior", device=device)
    Classifier.from_pretrained(folder / "classifier", device=device)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    run = begin_stage(cfg, "export")
    run.claim()
    files = export(cfg, run)
    check_loads(run.out_dir)
    run.finish(files, {"models": ["tokenizer", "prior", "classifier"]})
    log.info("exported %s", ", ".join(str(run.out_dir / k) for k in ("tokenizer", "prior", "classifier")))
    return 0


if __name__ == "__main__":
    run_cli(main, stage_parser(__doc__.splitlines()[0]))
