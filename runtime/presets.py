"""The presets: complete starting points a run names with ``--preset`` (smoke, seed, improved, ham128).

A preset is a partial config tree over the defaults of the config models. For a section that is one of several
kinds (``prior``, ``vqvae``, ``vqvae.quantizer``) it gives the chosen kind's values, and under :data:`OTHER_KINDS`
the values another kind takes when an override switches to it (``--preset improved prior.arch=gated``: the gated
PixelCNN the preset measures the transformer against). A saved config is complete: the preset it names is
provenance, so a preset can be retired without making old runs unloadable (runtime/config.py ``load_config``).
"""

from __future__ import annotations

from typing import Any

OTHER_KINDS = "other_kinds"
"""Key of a preset tree: {section: {kind: values}} for kinds the preset does not choose."""

# The gated PixelCNN the 256-px transformer presets are measured against (8.42 M parameters at 12 layers).
_PIXELCNNS_128: dict[str, dict[str, Any]] = {"gated": {"filters": 128, "kernel_size": 5},
                                             "pixelcnn": {"filters": 128, "kernel_size": 5}}


def _smoke() -> dict[str, Any]:
    """Minutes on 2 CPU cores, recognisable reconstructions on synthetic data."""
    return {
        "preset": "smoke",
        "run_dir": "runs/smoke",
        "data": {"num_images": 700, "image_size": 64, "shard_max_count": 128},
        # decay 0.95: a short run must notice dead codes quickly (0.99 left 80% of the codebook
        # unused after 300 steps); batch 16 x 600 steps beat 32 x 300 at the same cost (PSNR 25.2 vs 23.5).
        "vqvae": {"arch": "improved", "channels": [32, 64], "res_blocks": 1, "code_dim": 32,
                  "quantizer": {"kind": "ema", "codebook_size": 128, "decay": 0.95}},
        "vqvae_train": {"batch_size": 16, "lr": 2e-3, "max_steps": 600, "checkpoint_every": 200,
                        "eval_every": 200, "schedule": "cosine", "warmup_steps": 20},
        # d_model 128 / 4 heads: with prior.arch=transformer, 6 blocks are 1.1 M parameters, like the
        # gated prior's 1.1 M; a training step costs about 1.2x the gated one's on CPU.
        "prior": {"arch": "gated", "filters": 64, "layers": 6, "kernel_size": 5, "embed_dim": 32},
        OTHER_KINDS: {"prior": {"transformer": {"d_model": 128, "heads": 4}}},
        "prior_train": {"batch_size": 32, "lr": 2e-3, "max_steps": 300, "checkpoint_every": 100,
                        "eval_every": 150, "schedule": "cosine", "augment": False},
        "sample": {"per_class": 4, "num_tasks": 2},
        "classifier": {"width": 16},
        "classifier_train": {"batch_size": 32, "lr": 2e-3, "max_steps": 200, "checkpoint_every": 100,
                             "eval_every": 100, "schedule": "cosine"},
    }


def _seed() -> dict[str, Any]:
    """The report's exact settings: 256x256, five stride-2 convs, 512x64 codebook split 4 per position,
    Adam 1e-3, batch 16, commitment 0.25; PixelCNN 7x7 type-A + 8 residual blocks, 120 filters."""
    return {
        "preset": "seed",
        "run_dir": "runs/seed",
        "data": {"image_size": 256, "num_images": 2000},
        "vqvae": {"arch": "seed", "channels": [32, 64, 128, 256, 256], "code_dim": 64,
                  "quantizer": {"kind": "loss", "codebook_size": 512, "commitment": 0.25, "kmeans_init": False}},
        "vqvae_train": {"batch_size": 16, "lr": 1e-3, "max_steps": 11280, "schedule": "constant",
                        "checkpoint_every": 500, "eval_every": 500},
        "prior": {"arch": "pixelcnn", "filters": 120, "layers": 8, "kernel_size": 7, "conditional": False},
        "prior_train": {"batch_size": 16, "lr": 1e-3, "max_steps": 20000, "augment": False,
                        "checkpoint_every": 1000, "eval_every": 1000},
    }


def _improved() -> dict[str, Any]:
    """A careful modern setup: 16x16 one-code-per-position grid, residual blocks, EMA codebook with k-means
    init and dead-code restarts, class-conditional transformer prior (``prior.arch=gated``: the gated
    PixelCNN, kept as the baseline it is measured against)."""
    return {
        "preset": "improved",
        "run_dir": "runs/improved",
        "data": {"image_size": 256, "num_images": 2000},
        # 4.8 GMAC per 256-px image forward vs the seed model's 1.0 (channels [64,128,128,256] with
        # 2 residual blocks would be 18.9): the same 256 codes per image, one per position.
        # Factorised cosine codes: at 128 px and the same 16x16 grid of 512 EMA codes they kept 89 % of the codes
        # in use where plain codes kept 34 % (docs/results.md, issue 30).
        "vqvae": {"arch": "improved", "channels": [32, 64, 128, 256], "res_blocks": 1, "code_dim": 64,
                  "quantizer": {"kind": "ema", "codebook_size": 512, "lookup_dim": 8, "rotation_trick": True}},
        "vqvae_train": {"batch_size": 16, "lr": 3e-4, "max_steps": 20000, "schedule": "cosine",
                        "warmup_steps": 500, "grad_clip": 1.0, "checkpoint_every": 500, "eval_every": 500},
        # Transformer: 8.49 M parameters against the gated PixelCNN's 8.42 M (same 12 layers), sampling
        # 34-45x faster on CPU with its KV cache (bench sample), and classifier-free guidance. After 1,000 CPU
        # steps on real HAM10000 (1 M-parameter versions) it reached 0.94 fewer bits/code than the gated
        # PixelCNN, and the judge scored their samples alike (bench quality, docs/results.md).
        "prior": {"arch": "transformer", "layers": 12, "d_model": 256, "heads": 8, "kv_heads": 1,
                  "label_dropout": 0.1, "conditional": True},
        OTHER_KINDS: {"prior": _PIXELCNNS_128},
        "prior_train": {"batch_size": 32, "lr": 5e-4, "max_steps": 20000, "schedule": "cosine",
                        "warmup_steps": 500, "grad_clip": 1.0, "augment": False, "checkpoint_every": 1000,
                        "eval_every": 1000},
    }


def _ham128() -> dict[str, Any]:
    """Real dermoscopy images at 128 px (HAM10000, ISIC 2018/2019), whose paths the user gives:
    ``data.isic_images=DIR data.isic_csv=CSV``. A 4x4 patch stem and one down-sampling stage keep the 16x16
    code grid of the 256-px presets (8x8 codes are too few for a whole lesion); factorised cosine codes; the
    rest is ``improved``. The judge trains for about 16 epochs with class-balanced loss: HAM10000 is 67 % NV,
    and a short or unweighted run learns little beyond "always NV" (balanced accuracy 0.30 after 4 epochs
    unweighted, 0.46+ after 12 weighted)."""
    return {
        "preset": "ham128",
        "run_dir": "runs/ham128",
        "data": {"source": "isic", "image_size": 128, "shard_max_count": 1000},
        # A 4x4 patch stem (nothing at 128 or 64 px; 0.61 GMAC per image against 0.94 for three conv stages) and
        # factorised codes (8 dims, l2-normalised, cosine lookup, rotation trick) beat the three-stage FSQ
        # tokenizer this preset had, and the same stem with FSQ, at equal training time (bench quality --variants,
        # docs/results.md).
        "vqvae": {"arch": "improved", "patch_size": 4, "channels": [128], "res_blocks": 2, "code_dim": 64,
                  "quantizer": {"kind": "ema", "codebook_size": 512, "lookup_dim": 8, "rotation_trick": True}},
        OTHER_KINDS: {"prior": _PIXELCNNS_128},
        "vqvae_train": {"batch_size": 16, "lr": 1e-3, "max_steps": 20000, "schedule": "cosine",
                        "warmup_steps": 200, "grad_clip": 1.0, "checkpoint_every": 1000, "eval_every": 1000},
        # The data's own class mix in the loss (prior.balance=none): inverse class weights, once needed to draw
        # the rare classes at all, made the conditional-LayerNorm transformer worse at everything (bench
        # quality, 1,000 CPU prior steps: 2.73 vs 2.51 bits/code, sample Fréchet distance 1.09 vs 0.73, class
        # agreement 0.22 vs 0.26). Guidance 3 raised class agreement to 0.32 for +0.05 Fréchet distance
        # (docs/results.md).
        "prior": {"arch": "transformer", "layers": 8, "d_model": 256, "heads": 8, "kv_heads": 1,
                  "label_dropout": 0.1, "conditional": True},
        "prior_train": {"batch_size": 32, "lr": 5e-4, "max_steps": 10000, "schedule": "cosine",
                        "warmup_steps": 300, "grad_clip": 1.0, "augment": False, "checkpoint_every": 1000,
                        "eval_every": 1000},
        # 10,000 x 32 prior steps are 41 passes over 7,784 training grids. Each training image also in its 7 other
        # exact rotations/mirrorings: on 957 HAM images, 27 passes of a 1 M-parameter transformer, the plain
        # codes' validation bits/code stalled at 2.235 while 8 views reached 2.186 and were still falling
        # (docs/results.md).
        "encode": {"train_views": 8},
        # 700 samples in the data's class mix, at least 20 of each class: the Fréchet distance then compares the
        # model's marginal with the real images' unweighted (drawn 100 per class, it had to weight 11 DF
        # validation images as much as 100 samples, and its floor was 1.57 where the reconstructions' is 0.24).
        "sample": {"per_class": 100, "class_mix": "data", "min_per_class": 20, "num_tasks": 2,
                   "guidance_scale": 3.0},
        "classifier": {"width": 16},
        "classifier_train": {"batch_size": 32, "lr": 2e-3, "max_steps": 4000, "schedule": "cosine",
                             "warmup_steps": 100, "checkpoint_every": 500, "eval_every": 500},
        # 9 trainings (3 arms x 3 seeds) of the judge's recipe in about 30 minutes on 2 CPU cores at 128 px: 300
        # steps each, from 2.2 s per step measured at load average ~6 (about a third of the cores ours), i.e. ~0.7 s
        # unloaded, plus ~20 s per training for validation and the test split (docs/results.md).
        "augment": {"max_steps": 300},
    }


PRESETS = {"smoke": _smoke, "seed": _seed, "improved": _improved, "ham128": _ham128}


def preset_values(preset: str) -> dict[str, Any]:
    """The preset's partial tree, without :data:`OTHER_KINDS` (``preset`` must be one of PRESETS)."""
    tree = PRESETS[preset]()
    tree.pop(OTHER_KINDS, None)
    return tree


def other_kind_values(preset: Any, section: tuple[str, ...], kind: str) -> dict[str, Any]:
    """What ``preset`` sets for ``kind`` of ``section`` when an override switches to it ({} for none, or for a
    preset that no longer exists)."""
    if preset not in PRESETS:
        return {}
    return dict(PRESETS[preset]().get(OTHER_KINDS, {}).get(".".join(section), {}).get(kind, {}))
