"""Autoregressive priors: causality measured by gradients, class conditioning, sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from prior.config import GatedPriorConfig, PixelCNNPriorConfig, PriorConfig
from prior.models import AutoregressivePrior, build_prior
from runtime.config import build_config

K, SIDE, CLASSES = 16, 8, 3
# layers · (kernel // 2) ≥ SIDE − 1, so the gated model's receptive field covers the whole grid.
GATED = GatedPriorConfig(filters=16, layers=4, kernel_size=5, embed_dim=8, conditional=True)
MASKED = PixelCNNPriorConfig(filters=16, layers=3, kernel_size=3, embed_dim=8, conditional=False)


def _model(cfg: PriorConfig) -> AutoregressivePrior:
    torch.manual_seed(0)
    return build_prior(cfg, K, CLASSES).eval()


def _codes(n: int = 1, seed: int = 0) -> Tensor:
    return torch.randint(0, K, (n, SIDE, SIDE), generator=torch.Generator().manual_seed(seed))


def _labels(model: AutoregressivePrior, n: int = 1) -> Tensor | None:
    return torch.arange(n) % CLASSES if model.conditional else None


def _dependence(model: AutoregressivePrior, row: int, col: int) -> Tensor:
    """SIDE×SIDE bool map: which input positions the logits at (row, col) have a gradient from."""
    captured: list[Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: object, output: Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    handle = model.embed.register_forward_hook(keep)
    model(_codes(), _labels(model))[0, :, row, col].sum().backward()
    handle.remove()
    return captured[0].grad[0].abs().sum(-1) > 0


def _strictly_before(row: int, col: int) -> Tensor:
    index = torch.arange(SIDE * SIDE).view(SIDE, SIDE)
    return index < row * SIDE + col


POSITIONS = [(0, 0), (0, 5), (3, 0), (4, 3), (7, 7)]


@pytest.mark.parametrize(("row", "col"), POSITIONS)
def test_gated_depends_on_exactly_the_earlier_positions(row: int, col: int) -> None:
    assert torch.equal(_dependence(_model(GATED), row, col), _strictly_before(row, col))


@pytest.mark.parametrize(("row", "col"), POSITIONS)
def test_masked_pixelcnn_is_causal_but_has_a_blind_spot(row: int, col: int) -> None:
    dep = _dependence(_model(MASKED), row, col)
    before = _strictly_before(row, col)
    assert not (dep & ~before).any()  # nothing at or after the position
    if (row, col) == (4, 3):
        # Row above, far right: earlier in raster order, yet invisible to stacked masked convs.
        assert before[3, 7] and not dep[3, 7]
        assert dep[3, 2] and dep[4, 2]  # while nearby earlier positions are seen


def test_seed_prior_is_the_report_pixelcnn() -> None:
    cfg = build_config("seed").prior
    model = build_prior(cfg, 512, CLASSES)
    assert type(model).__name__ == "PixelCNN" and not model.conditional
    assert model.first.kernel_size == (7, 7) and model.first.out_channels == 120
    assert len(model.blocks) == 8
    logits = model(torch.randint(0, 512, (2, 16, 16)), None)
    assert logits.shape == (2, 512, 16, 16)


def test_class_conditioning_changes_logits() -> None:
    for cfg in (GATED, MASKED.model_copy(update={"conditional": True})):
        model = _model(cfg)
        codes = _codes(1).repeat(2, 1, 1)
        logits = model(codes, torch.tensor([0, 1]))
        assert not torch.allclose(logits[0], logits[1])
        with pytest.raises(ValueError, match="labels"):
            model(codes, None)


def test_logits_train_with_cross_entropy() -> None:
    model = _model(GATED).train()
    codes, labels = _codes(4, seed=1), torch.arange(4) % CLASSES
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(codes, labels), codes)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("cfg", [GATED, MASKED], ids=["gated", "pixelcnn"])
def test_sample_shape_range_and_determinism(cfg: PriorConfig) -> None:
    model = _model(cfg).train()
    labels = _labels(model, 3)

    def draw(seed: int) -> Tensor:
        return model.sample(3, (4, 5), labels, 1.0, torch.Generator().manual_seed(seed))

    first = draw(7)
    assert first.shape == (3, 4, 5) and first.dtype == torch.long
    assert first.min() >= 0 and first.max() < K
    assert torch.equal(first, draw(7))
    assert not torch.equal(first, draw(8))
    assert model.training  # sampling restores the mode it found


def test_low_temperature_sampling_is_greedy() -> None:
    model = _model(GATED)
    labels = torch.tensor([2])
    codes = model.sample(1, (3, 3), labels, 1e-4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(codes, labels)
    # Each drawn code is the argmax given the codes before it (which are exactly the ones drawn).
    assert torch.equal(logits.argmax(1), codes)


def test_balanced_prior_loss_weighs_each_image_as_its_class(tmp_path: Path) -> None:
    from prior.train import PriorTask

    manifest = {"codebook_size": K, "grid": [SIDE, SIDE],
                "splits": {"train": {"class_counts": {"MEL": 10, "NV": 90, "BCC": 0}}}}
    cfg = build_config("smoke", ["prior.balance=inverse", "prior.arch=gated", "prior.filters=16", "prior.layers=2",
                                 "prior.kernel_size=3", "prior.embed_dim=8"])
    task = PriorTask(cfg, tmp_path, manifest)
    assert task.weights[0] * 10 == pytest.approx(float(task.weights[1] * 90))  # MEL and NV weigh the same in total
    assert float(task.weights[2]) == 0.0  # no BCC in train
    torch.manual_seed(0)
    model = task.build_model()
    batch = {"codes": _codes(3), "label": torch.tensor([0, 1, 1])}
    loss, metrics = task.loss(model, batch)
    per_image = F.cross_entropy(model(batch["codes"], batch["label"]), batch["codes"], reduction="none").mean((1, 2))
    assert float(loss) == pytest.approx(float((per_image * task.weights[batch["label"]]).mean()), rel=1e-5)
    # The logged bits per code stay the unweighted likelihood, comparable with validation.
    assert float(metrics["bits_per_code"]) == pytest.approx(float(per_image.mean()) / 0.6931471805599453, rel=1e-5)
    plain = PriorTask(build_config("smoke", []), tmp_path, {"codebook_size": K, "grid": [SIDE, SIDE]})
    assert torch.equal(plain.weights, torch.ones(7))  # balance=none never reads the class counts
