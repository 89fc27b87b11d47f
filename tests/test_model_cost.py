"""What a model costs: MACs of one forward (runtime/cost.py) and ``--print-params`` of both training stages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prior.train import main as prior_main
from prior.train import parser as prior_parser
from runtime.config import build_config
from runtime.cost import forward_macs
from vqvae.models import build_vqvae
from vqvae.train import main as vqvae_main
from vqvae.train import parser as vqvae_parser


def test_macs_are_multiply_accumulates_of_products_and_convolutions() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).train()
    # conv: 8 outputs x 3*3*3 inputs at 4x4 positions; linear: 128 x 5. Activations and biases are not counted.
    assert forward_macs(model, torch.zeros(1, 3, 4, 4)) == 8 * 27 * 16 + 128 * 5
    assert model.training  # its mode is given back


def test_macs_of_the_seed_vqvae_match_its_layers_and_change_no_state() -> None:
    """The report's model at 256 px: 1.0 GMAC (five 4x4 stride-2 convs and their transposes), counted without
    training its codebook or BatchNorm statistics."""
    model = build_vqvae(build_config("seed", ["vqvae.quantizer.kind=ema"]).vqvae).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert forward_macs(model, torch.zeros(1, 3, 256, 256)) == 998_244_352
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("preset", ["seed", "ham128"])
def test_print_params_gives_macs_per_image_for_the_vqvae_and_the_prior(
        preset: str, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = ["data.isic_images=/images"] if preset == "ham128" else ["data.image_size=128"]
    cfg = build_config(preset, overrides)
    assert vqvae_main(vqvae_parser().parse_args(["--preset", preset, "--print-params", *overrides])) == 0
    assert prior_main(prior_parser().parse_args(["--preset", preset, "--print-params", *overrides])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    vqvae_macs = forward_macs(build_vqvae(cfg.vqvae), torch.zeros(1, 3, 128, 128))
    assert f"{cfg.vqvae.arch} VQ-VAE MACs per 128x128 image (encode, quantize, decode): {vqvae_macs:,}" in lines
    side = 8 if preset == "seed" else 16  # seed: 4x4 positions of 2x2 codes; ham128: 16x16 codes
    prior_line = next(line for line in lines if line.startswith(f"{cfg.prior.arch} prior MACs"))
    assert f"per {side}x{side} code grid" in prior_line
    assert int(prior_line.rsplit(": ", 1)[1].replace(",", "")) > 10**6
    assert any(line.startswith(f"{cfg.prior.arch} prior parameters: ") for line in lines)
