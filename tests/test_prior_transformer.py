"""The transformer prior: causality by gradients, KV-cache sampling against a naive sampler, the sampling
knobs (temperature, top-k, top-p, classifier-free guidance), label dropout, config, and training."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import assert_ok, run_cli, tiny_config, write_class_coded_shards
from test_models_prior import CLASSES, GATED, POSITIONS, K, _codes, _dependence, _model, _strictly_before
from torch import Tensor

from prior.base import draw, filter_logits
from prior.config import TransformerPriorConfig
from prior.models import build_prior
from prior.transformer import TransformerPrior
from runtime.checkpoint import load_weights
from runtime.config import CLASSES as LESION_CLASSES
from runtime.config import ConfigError, build_config

TRANSFORMER = TransformerPriorConfig(d_model=32, heads=4, layers=2, label_dropout=0.1, conditional=True)
UNCONDITIONAL = TRANSFORMER.model_copy(update={"conditional": False})
# Key/value heads: 1 (multi-query, the default), 2 (grouped-query: 2 query heads each), 0 (= heads, multi-head).
ATTENTIONS = pytest.mark.parametrize("cfg", [TRANSFORMER.model_copy(update={"kv_heads": kv}) for kv in (1, 2, 0)],
                                     ids=["multi-query", "grouped-query", "multi-head"])


def _transformer(cfg: TransformerPriorConfig = TRANSFORMER) -> TransformerPrior:
    model = _model(cfg)
    assert isinstance(model, TransformerPrior)
    with torch.no_grad():  # class token and per-class LayerNorm offsets large: the labels steer even untrained draws
        generator = torch.Generator().manual_seed(0)
        model.class_embed.weight.normal_(generator=generator)
        for block in model.blocks:
            block.modulation.weight.normal_(generator=generator)
    return model


@torch.no_grad()
def _naive_sample(model: TransformerPrior, n: int, grid: tuple[int, int], labels: Tensor | None,
                  temperature: float, generator: torch.Generator, top_k: int = 0, top_p: float = 1.0,
                  guidance_scale: float = 1.0) -> Tensor:
    """The reference: one full forward over the whole grid per position (no cache), the guided logits
    from a second forward with the null class."""
    model.eval()
    codes = torch.zeros(n, *grid, dtype=torch.long)
    null = torch.full((n,), model.null_class)
    for i in range(grid[0]):
        for j in range(grid[1]):
            logits = model(codes, labels)[:, :, i, j]
            if guidance_scale != 1.0:
                cond, uncond = logits.float(), model(codes, null)[:, :, i, j].float()
                logits = uncond + guidance_scale * (cond - uncond)
            codes[:, i, j] = draw(logits, temperature, generator, top_k, top_p)
    return codes


# ----- causality -----------------------------------------------------------------------------------
@ATTENTIONS
@pytest.mark.parametrize(("row", "col"), POSITIONS)
def test_transformer_depends_on_exactly_the_earlier_positions(cfg: TransformerPriorConfig, row: int, col: int) -> None:
    assert torch.equal(_dependence(_transformer(cfg), row, col), _strictly_before(row, col))


def test_every_position_sees_the_class_token_and_nothing_else_of_the_label() -> None:
    model = _transformer()
    codes = _codes(1).repeat(2, 1, 1)
    logits = model(codes, torch.tensor([0, 1]))
    # The class token is slot 0, visible from every position, the first included.
    assert (logits[0] - logits[1]).abs().amax(0).gt(0).all()
    with pytest.raises(ValueError, match="labels"):
        model(codes, None)
    unconditional = _transformer(UNCONDITIONAL)  # labels ignored: its start token is always the null class
    assert torch.equal(unconditional(codes, torch.tensor([0, 1])), unconditional(codes, None))


def test_the_class_reaches_every_position_without_attention() -> None:
    # Every block's LayerNorms carry a per-class gain and shift, so the class steers each position directly,
    # not only through attention to the class token (the weak conditioning that came before).
    model = _transformer()
    with torch.no_grad():
        for block in model.blocks:  # no slot can read another: only the per-class LayerNorms can carry the label
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
    codes = _codes(1).repeat(2, 1, 1)
    logits = model(codes, torch.tensor([0, 1]))
    assert (logits[0] - logits[1]).abs().amax(0).gt(1e-3).all()
    with torch.no_grad():
        for block in model.blocks:
            block.modulation.weight.zero_()
    # Without them, only slot 0 (whose input is the class token) still depends on the label.
    unmodulated = model(codes, torch.tensor([0, 1])).flatten(2)
    assert torch.equal(unmodulated[0, :, 1:], unmodulated[1, :, 1:])


def test_rectangular_grid_and_grid_limit() -> None:
    model = _transformer()
    codes = torch.randint(0, K, (2, 3, 5), generator=torch.Generator().manual_seed(0))
    assert model(codes, torch.tensor([0, 2])).shape == (2, K, 3, 5)
    with pytest.raises(ValueError, match="max_grid_side"):
        model(torch.zeros(1, 65, 2, dtype=torch.long), torch.tensor([0]))


# ----- sampling --------------------------------------------------------------------------------------
KNOBS = [(1.0, 0, 1.0, 1.0), (0.7, 5, 1.0, 1.0), (1.3, 0, 0.8, 1.0), (0.9, 6, 0.9, 2.5), (1.0, 0, 1.0, 0.0)]


@ATTENTIONS
@pytest.mark.parametrize(("temperature", "top_k", "top_p", "guidance"), KNOBS)
def test_kv_cache_sampling_equals_uncached_sampling(cfg: TransformerPriorConfig, temperature: float, top_k: int,
                                                    top_p: float, guidance: float) -> None:
    # float64: cached and uncached attention sum in different orders; in double precision the
    # probabilities agree far below anything a draw could resolve.
    model = _transformer(cfg).double()
    labels, grid = torch.tensor([0, 1, 2, 0, 3]), (4, 5)  # 3 = the null class: unconditional rows
    cached = model.sample(5, grid, labels, temperature, torch.Generator().manual_seed(3), top_k=top_k,
                          top_p=top_p, guidance_scale=guidance)
    naive = _naive_sample(model, 5, grid, labels, temperature, torch.Generator().manual_seed(3), top_k, top_p,
                          guidance)
    assert torch.equal(cached, naive)
    assert not torch.equal(cached, model.sample(5, grid, labels, temperature, torch.Generator().manual_seed(4),
                                                top_k=top_k, top_p=top_p, guidance_scale=guidance))


def test_unconditional_kv_cache_sampling_equals_uncached_sampling() -> None:
    model = _transformer(UNCONDITIONAL).double().train()
    cached = model.sample(4, (3, 3), None, 1.0, torch.Generator().manual_seed(0))
    assert model.training  # sampling restores the mode it found (and samples in eval mode)
    assert torch.equal(cached, _naive_sample(model, 4, (3, 3), None, 1.0, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("cfg", [TRANSFORMER, GATED], ids=["transformer", "gated"])
def test_top_k_1_is_greedy(cfg: TransformerPriorConfig) -> None:
    model = _model(cfg)
    labels = torch.tensor([0, 2])
    codes = model.sample(2, (3, 4), labels, 1.0, torch.Generator().manual_seed(0), top_k=1)
    with torch.no_grad():
        logits = model(codes, labels)
    # Each drawn code is the argmax given the codes before it (which are exactly the ones drawn).
    assert torch.equal(logits.argmax(1), codes)


def test_guidance_zero_is_the_unconditional_model() -> None:
    model = _transformer().double()
    labels = torch.tensor([0, 1, 2, 1])
    guided = model.sample(4, (4, 4), labels, 1.0, torch.Generator().manual_seed(5), guidance_scale=0.0)
    unconditional = model.sample(4, (4, 4), torch.full((4,), model.null_class), 1.0,
                                 torch.Generator().manual_seed(5))
    assert torch.equal(guided, unconditional)
    conditional = model.sample(4, (4, 4), labels, 1.0, torch.Generator().manual_seed(5))
    assert not torch.equal(guided, conditional)


def test_filter_logits_top_k_and_nucleus() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]).log()

    def kept(**knobs: float) -> Tensor:
        return torch.isfinite(filter_logits(logits, **knobs))

    assert kept().all() and kept(top_k=4).all() and kept(top_k=10).all()
    assert kept(top_k=2).tolist() == [[True, True, False, False], [False, False, True, True]]
    # Nucleus: the smallest set of most likely codes holding top_p of the mass.
    assert kept(top_p=0.8).tolist() == [[True, True, False, False], [False, False, True, True]]
    assert kept(top_p=0.81).tolist() == [[True, True, True, False], [False, True, True, True]]
    assert kept(top_p=0.01).sum(1).tolist() == [1, 1]  # the most likely code always survives
    assert kept(top_k=3, top_p=0.99).tolist() == [[True, True, True, False], [False, True, True, True]]


def test_sampled_codes_stay_inside_the_filters() -> None:
    model = _transformer()
    labels = torch.arange(6) % CLASSES
    codes = model.sample(6, (3, 3), labels, 1.0, torch.Generator().manual_seed(1), top_k=3)
    with torch.no_grad():
        top3 = model(codes, labels).topk(3, dim=1).indices
    assert (top3 == codes[:, None]).any(1).all()


def test_guidance_needs_a_null_class() -> None:
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"guidance scale 2\.0.*GatedPixelCNN.*allowed: 1\.0"):
        _model(GATED).sample(1, (2, 2), torch.tensor([0]), 1.0, generator, guidance_scale=2.0)
    with pytest.raises(ValueError, match="class-conditional"):
        _transformer(UNCONDITIONAL).sample(1, (2, 2), None, 1.0, generator, guidance_scale=2.0)
    with pytest.raises(ValueError, match="without label dropout"):
        _transformer(TRANSFORMER.model_copy(update={"label_dropout": 0.0})).sample(
            1, (2, 2), torch.tensor([0]), 1.0, generator, guidance_scale=2.0)


@pytest.mark.parametrize(("overrides", "needs"), [
    (["prior.arch=gated"], "prior.arch=transformer"),
    (["prior.arch=transformer", "prior.conditional=false"], "prior.conditional=true"),
    (["prior.arch=transformer", "prior.label_dropout=0"], "prior.label_dropout > 0"),
])
def test_guidance_without_a_null_class_is_refused_when_planning(overrides: list[str], needs: str) -> None:
    """Refused when the config is built (so by the dry run), not once the prior has trained."""
    with pytest.raises(ConfigError, match=rf"sample\.guidance_scale=2\.0 .*needs {re.escape(needs)}"):
        build_config("improved", [*overrides, "sample.guidance_scale=2"])
    assert build_config("improved", [*overrides, "sample.guidance_scale=1"]).sample.guidance_scale == 1.0


# ----- label dropout --------------------------------------------------------------------------------
def test_label_dropout_drops_the_configured_fraction_deterministically() -> None:
    model = _transformer(TRANSFORMER.model_copy(update={"label_dropout": 0.25})).train()
    labels = torch.arange(20_000) % CLASSES

    def tokens(seed: int) -> Tensor:
        torch.manual_seed(seed)  # the trainer seeds (and checkpoints) this global RNG
        return model.class_tokens(labels, len(labels))

    first = tokens(0)
    dropped = first == model.null_class
    assert abs(dropped.float().mean().item() - 0.25) < 0.015
    assert torch.equal(first[~dropped], labels[~dropped])  # the others keep their class
    assert torch.equal(first, tokens(0))
    assert not torch.equal(first, tokens(1))
    assert torch.equal(model.eval().class_tokens(labels, len(labels)), labels)  # never when evaluating
    assert (_transformer(UNCONDITIONAL).train().class_tokens(labels, len(labels)) == 0).all()


# ----- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["smoke", "seed", "improved"])
def test_every_preset_takes_the_transformer_by_override(preset: str) -> None:
    cfg = build_config(preset, ["prior.arch=transformer"])
    model = build_prior(cfg.prior, cfg.vqvae.codebook_size, len(LESION_CLASSES))
    assert isinstance(model, TransformerPrior) and len(model.blocks) == cfg.prior.layers
    labels = torch.arange(2) if cfg.prior.conditional else None
    assert model(torch.zeros(2, 16, 16, dtype=torch.long), labels).shape == (2, cfg.vqvae.codebook_size, 16, 16)


@pytest.mark.parametrize(("override", "message"), [
    ("prior.heads=5", "prior.d_model=256 is not divisible by prior.heads=5"),
    ("prior.kv_heads=3", "prior.heads=8 is not divisible by prior.kv_heads=3"),
    ("prior.label_dropout=1", "label_dropout"),
    ("sample.top_p=0", "sample.top_p"),
    ("sample.top_p=1.5", "sample.top_p"),
    ("sample.top_k=-1", "sample.top_k"),
    ("sample.guidance_scale=-0.5", "sample.guidance_scale"),
])
def test_impossible_transformer_and_sampling_values_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config("improved", ["prior.arch=transformer", override])


# ----- training ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_trained_by_prior_train_its_conditional_samples_match_their_class(tmp_path: Path) -> None:
    """prior/train.py on class-coded codes (class c uses code c at ~70 % of positions): conditional
    samples are dominated by their class's code, guidance 0 (the unconditional model learned through
    label dropout) is not."""
    codes_dir = tmp_path / "codes"
    cfg = tiny_config(tmp_path / "run", "prior.arch=transformer", "prior.d_model=32", "prior.heads=4",
                      "prior.label_dropout=0.2", "prior_train.max_steps=150", "prior_train.lr=3e-3",
                      "prior_train.eval_every=150", "prior_train.checkpoint_every=150")
    write_class_coded_shards(codes_dir, codebook=16, grid=6, per_class=24, cfg=cfg)
    assert_ok(run_cli("prior/train.py", "--config", tmp_path / "run" / "config.json", "--codes", codes_dir))
    model = build_prior(cfg.prior, 16, len(LESION_CLASSES))
    load_weights(model, tmp_path / "run" / "prior" / "final" / "model.safetensors")
    labels = torch.arange(len(LESION_CLASSES)).repeat_interleave(8)

    def judge(guidance: float) -> tuple[float, float]:
        """Fraction of samples whose most frequent code is their class's, and the mean fraction of
        positions holding it."""
        samples = model.sample(len(labels), (6, 6), labels, 1.0, torch.Generator().manual_seed(0),
                               guidance_scale=guidance)
        dominant = torch.stack([torch.bincount(grid.flatten(), minlength=16).argmax() for grid in samples])
        share = (samples == labels[:, None, None]).float().mean()
        return (dominant == labels).float().mean().item(), share.item()

    conditional, unconditional, guided = judge(1.0), judge(0.0), judge(3.0)
    assert conditional[0] >= 0.9
    assert unconditional[0] <= 0.4  # about chance (1/7): the label no longer steers it
    assert guided[0] >= conditional[0] and guided[1] > conditional[1]  # guidance sharpens the class
