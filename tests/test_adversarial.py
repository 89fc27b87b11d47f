"""VQGAN-style adversarial training of the VQ-VAE: discriminator, losses, adaptive weight, config, checkpoints
with a critic, bit-exact resume on CPU, and a real 2-process gloo DDP run (through accelerate launch)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_cli, stage_env, tiny_config
from torch import nn

from bench.common import free_port
from runtime.checkpoint import CheckpointError, TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from runtime.config import ConfigError, build_config
from runtime.launcher import accelerate_command
from vqvae.discriminator import PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss
from vqvae.models import build_vqvae

ADV = ["vqvae_train.adversarial.enabled=true", "vqvae_train.adversarial.start_step=5",
       "vqvae_train.adversarial.ramp_steps=6", "vqvae_train.max_steps=12", "vqvae_train.checkpoint_every=4",
       "vqvae_train.log_every=2", "vqvae_train.eval_every=100"]
"""Tiny run (32 px) with the discriminator starting inside it and its weight ramping in over steps 5-10;
checkpoints at 4 (before the start), 8 (mid-ramp), 12."""

ADV_METRICS = ("train/d_loss", "train/g_adv", "train/adv_weight", "train/logits_real", "train/logits_fake")


# ----- the parts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "layers", "side"), [(64, 3, 6), (64, 2, 14), (32, 3, 2), (24, 3, 1)])
def test_discriminator_gives_one_logit_per_patch(size: int, layers: int, side: int) -> None:
    disc = PatchDiscriminator(layers=layers, channels=8)
    assert disc(torch.rand(2, 3, size, size)).shape == (2, 1, side, side)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert sum(c.stride == (2, 2) for c in convs) == layers


def test_discriminator_widths_double_up_to_eight_times_the_first() -> None:
    convs = [m for m in PatchDiscriminator(layers=5, channels=4).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16, 32, 32, 32, 1]


def test_hinge_and_generator_losses_on_known_logits() -> None:
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2.5] -> mean 7/6; half their sum = 1.
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.0)
    assert generator_loss(fake).item() == pytest.approx(1 / 6)  # -mean([-2, 0, 1.5])
    empty = torch.zeros(0)  # a batch emptied by damaged shards: zero, never NaN
    assert hinge_d_loss(empty, empty).item() == 0.0 and generator_loss(empty).item() == 0.0


def test_adaptive_weight_equals_the_hand_computation() -> None:
    w = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    a, b = torch.tensor([[0.3, 0.1], [2.0, -0.4]]), torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    rec, adv = ((w * a) ** 2).sum(), (w * b).sum()
    # d rec / dw = 2 a^2 w; d adv / dw = b
    expected = (2 * a**2 * w.detach()).norm() / (b.norm() + 1e-4)
    got = adaptive_weight(rec, adv, w)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not got.requires_grad and w.grad is None  # detached; nothing accumulated into .grad
    # An adversarial loss without gradient at the layer: clamped at 1e4 instead of ||grad rec|| / 1e-4.
    assert adaptive_weight(((w * a) ** 2).sum(), (w * 0.0).sum(), w).item() == 1e4


def test_adversarial_weight_ramps_in_linearly_from_the_start_step() -> None:
    """ramp_steps=4 from start_step=10: the generator's adversarial term at 1/4, 2/4, ... of its full weight,
    on the same images and networks (the adaptive weight itself unchanged); 0 = full at once (VQGAN)."""
    from vqvae.train import VQVAETask

    cfg = build_config("smoke", ["data.image_size=32", "vqvae_train.max_steps=40", *(
        f"vqvae_train.adversarial.{k}" for k in ("enabled=true", "start_step=10", "ramp_steps=4"))])
    task = VQVAETask(cfg, Path())
    torch.manual_seed(0)
    model, critic = task.build_model(), task.build_critic()
    batch = {"image": torch.rand(4, 3, 32, 32)}
    weights = []
    for step in (10, 11, 13, 14, 30):
        loss, extras = task.loss(model, batch)
        weights.append(float(task.adversarial_loss(model, critic.module, loss, extras, step)[1]["adv_weight"]))
    full = weights[-1]
    assert weights == pytest.approx([full / 4, full / 2, full, full, full], rel=1e-5) and full > 0
    assert [task.ramp(s) for s in (10, 12, 13, 99)] == [0.25, 0.75, 1.0, 1.0]
    plain = VQVAETask(build_config("smoke", ["vqvae_train.adversarial.enabled=true"]), Path())
    assert plain.ramp(0) == 1.0


@pytest.mark.parametrize("preset", ["smoke", "seed"])
def test_last_layer_is_the_decoders_output_convolution(preset: str) -> None:
    model = build_vqvae(build_config(preset).vqvae)
    out_channels = model.last_layer.shape[1 if preset == "seed" else 0]  # ConvTranspose2d: (in, out, k, k)
    assert out_channels == 3
    recon = model(torch.rand(2, 3, 64, 64)).recon
    assert torch.autograd.grad(recon.sum(), model.last_layer)[0].abs().sum() > 0


# ----- config -------------------------------------------------------------------------------------------
def test_adversarial_is_off_by_default_in_every_preset() -> None:
    for preset in ("smoke", "seed", "improved"):
        assert not build_config(preset).vqvae_train.adversarial.enabled


@pytest.mark.parametrize(("override", "needle"), [
    ("vqvae_train.adversarial.start_step=20", "adversarial.start_step=20 is not below vqvae_train.max_steps=20"),
    ("vqvae_train.adversarial.betas=[0.5,1.0]", "vqvae_train.adversarial.betas.1"),
    ("vqvae_train.adversarial.lr=0", "vqvae_train.adversarial.lr"),
    ("vqvae_train.adversarial.disc_layers=0", "vqvae_train.adversarial.disc_layers"),
    ("vqvae_train.adversarial.weight=-1", "vqvae_train.adversarial.weight"),
    ("vqvae_train.adversarial.gan=1", "'gan' is not in vqvae_train.adversarial; allowed: betas,"),
])
def test_impossible_adversarial_settings_are_refused(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config("smoke", ["vqvae_train.max_steps=20", "vqvae_train.adversarial.enabled=true", override])
    assert needle in str(err.value)


@pytest.mark.slow
def test_a_discriminator_too_deep_for_the_images_is_refused_when_planning(tmp_path: Path) -> None:
    expected = ("vqvae_train.adversarial.disc_layers=4 is too deep for data.image_size=32: the discriminator "
                "needs images of at least 48 px; allowed: disc_layers <= 3")
    too_deep = [*ADV, "vqvae_train.adversarial.disc_layers=4", "data.image_size=32", "vqvae.channels=[16,32]"]
    with pytest.raises(ConfigError, match=expected):
        build_config("smoke", too_deep)
    build_config("smoke", [*too_deep[:-3], "vqvae_train.adversarial.disc_layers=3", *too_deep[-2:]])  # fits
    # The dry run refuses it in one line, before any stage runs (it used to wait for the vqvae stage).
    result = subprocess.run([sys.executable, "launch/pipeline.py", "--preset", "smoke", *too_deep,
                             f"run_dir={tmp_path / 'run'}", "--dry-run"], cwd=REPO, env=stage_env(),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert expected in result.stderr
    assert not (tmp_path / "run").exists()


# ----- checkpoints with a critic (in-process) ------------------------------------------------------------
def _nets(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, torch.optim.Optimizer]:
    """A model and a critic, each with an optimizer that has taken one step (so it has state)."""
    torch.manual_seed(seed)
    model, critic = nn.Linear(4, 3), PatchDiscriminator(layers=1, channels=4)
    opt, critic_opt = torch.optim.Adam(model.parameters()), torch.optim.Adam(critic.parameters(), betas=(0.5, 0.9))
    model(torch.randn(2, 4)).sum().backward()
    critic(torch.rand(2, 3, 12, 12)).sum().backward()
    opt.step()
    critic_opt.step()
    return model, opt, critic, critic_opt


def test_checkpoint_restores_the_critic_and_refuses_mixing_runs_with_and_without(tmp_path: Path) -> None:
    model, opt, critic, critic_opt = _nets(0)
    with_critic = save_checkpoint(tmp_path / "a", model, opt, TrainState(step=3, config_digest="x"),
                                  critic=(critic, critic_opt))
    meta = json.loads((with_critic / "state.json").read_text())
    assert set(meta["sha256"]) == {"model.safetensors", "optimizer.pt", "rng.pt", "critic.safetensors",
                                   "critic_optimizer.pt"}

    m2, o2, c2, co2 = _nets(1)
    load_checkpoint(with_critic, m2, o2, critic=(c2, co2), identity="x")
    for a, b in zip(critic.state_dict().values(), c2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(critic_opt.state_dict()["state"][0]["exp_avg"], co2.state_dict()["state"][0]["exp_avg"])
    assert co2.param_groups[0]["betas"] == (0.5, 0.9)

    # A checkpoint as written without a critic (every checkpoint before adversarial training existed) loads
    # as before when there is no critic, and is refused (never half-restored) when there is one.
    without = save_checkpoint(tmp_path / "b", model, opt, TrainState(step=3, config_digest="x"))
    load_checkpoint(without, *_nets(1)[:2], identity="x")
    m3, o3, c3, co3 = _nets(2)
    with pytest.raises(CheckpointError, match="has no critic"):
        load_checkpoint(without, m3, o3, critic=(c3, co3), identity="x")
    with pytest.raises(CheckpointError, match="has a critic"):
        load_checkpoint(with_critic, m3, o3, identity="x")
    with pytest.raises(CheckpointError, match="belongs to another configuration"):
        load_checkpoint(with_critic, m3, o3, critic=(c3, co3), identity="y")
    assert torch.equal(m3.weight, _nets(2)[0].weight)  # refused before anything was loaded


def test_damaged_critic_file_makes_the_checkpoint_skipped(tmp_path: Path) -> None:
    model, opt, critic, critic_opt = _nets(0)
    save_checkpoint(tmp_path, model, opt, TrainState(step=1), critic=(critic, critic_opt))
    newest = save_checkpoint(tmp_path, model, opt, TrainState(step=2), critic=(critic, critic_opt))
    (newest / "critic.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(tmp_path).name == "step-00000001"


# ----- real training runs ---------------------------------------------------------------------------------
def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "vqvae" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """One uninterrupted adversarial run to step 12 (checkpoints 4, 8 and 12 kept)."""
    run_dir = tmp_path_factory.mktemp("adversarial") / "ref"
    tiny_config(run_dir, *ADV)
    (run_dir / "data").symlink_to(tiny_data, target_is_directory=True)
    result = run_cli("vqvae/train.py", "--config", run_dir / "config.json")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_adversarial_metrics_are_logged_from_the_start_step_on(finished: Path) -> None:
    rows = [json.loads(line) for line in (finished / "vqvae" / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r for r in rows if "train/loss" in r}
    assert sorted(train_rows) == [2, 4, 6, 8, 10, 12]
    for step, row in train_rows.items():  # the row of step s is the loss of step s - 1; start_step = 5
        assert all(key in row for key in ADV_METRICS) == (step > 5), (step, row)
    manifest = _manifest(finished)
    assert len(manifest["rank_critic_digests"]) == 1 and len(manifest["rank_state_digests"]) == 1


@pytest.mark.parametrize("resume_at", [4, 8])
@pytest.mark.slow
def test_stop_and_resume_ends_bitwise_equal_to_the_uninterrupted_run(tmp_path: Path, finished: Path,
                                                                     resume_at: int) -> None:
    """The run as if stopped after step 4 (before the discriminator starts) or 8 (discriminator and its Adam
    state in the checkpoint), then resumed: final model AND discriminator identical to the uninterrupted run."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir, symlinks=True)
    tiny_config(run_dir, *ADV)  # same settings, run_dir pointing at the copy
    (run_dir / "vqvae" / "manifest.json").unlink()
    shutil.rmtree(run_dir / "vqvae" / "final")
    for ckpt in (run_dir / "vqvae" / "checkpoints").iterdir():
        if int(ckpt.name[5:]) > resume_at:
            shutil.rmtree(ckpt)
    result = run_cli("vqvae/train.py", "--config", run_dir / "config.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step-{resume_at:08d} (step {resume_at})" in result.stderr
    ours, reference = _manifest(run_dir), _manifest(finished)
    for key in ("rank_state_digests", "rank_critic_digests", "weights_sha256"):
        assert ours[key] == reference[key], key
    # The last checkpoints hold the same bytes: both optimizers' states and the RNG states included.
    last = Path("vqvae/checkpoints/step-00000012")
    hashes = [json.loads((run / last / "state.json").read_text())["sha256"] for run in (run_dir, finished)]
    for name in ("model.safetensors", "optimizer.pt", "rng.pt", "critic.safetensors", "critic_optimizer.pt"):
        assert hashes[0][name] == hashes[1][name], name


@pytest.mark.slow
def test_resuming_with_adversarial_on_from_a_checkpoint_without_is_refused(tmp_path: Path, tiny_run) -> None:
    """Switching adversarial training on is a config change: a checkpoint saved without a discriminator is
    refused by identity (one line, exit 2), never resumed with a fresh discriminator."""
    plain, plain_config = tiny_run("vqvae_train.max_steps=4", "vqvae_train.checkpoint_every=4", name="plain")
    assert run_cli("vqvae/train.py", "--config", plain_config).returncode == 0
    ckpt = plain.run_dir / "vqvae" / "checkpoints" / "step-00000004"
    adv, adv_config = tiny_run(*ADV, name="adv")
    result = run_cli("vqvae/train.py", "--config", adv_config, "--resume", str(ckpt))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: checkpoint {ckpt} belongs to another configuration" in result.stderr
    assert not (adv.run_dir / "vqvae" / "checkpoints").exists()


@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_model_and_discriminator(tiny_run) -> None:
    cfg, config = tiny_run("vqvae_train.adversarial.enabled=true", "vqvae_train.adversarial.start_step=3",
                           "vqvae_train.max_steps=8", "vqvae_train.log_every=4", "vqvae_train.eval_every=100")
    argv, env = accelerate_command("vqvae/train.py", ["--config", str(config)], processes=2, main_port=free_port())
    result = subprocess.run(argv, cwd=REPO, env=stage_env(**env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = _manifest(cfg.run_dir)
    assert manifest["distributed_type"] == "MULTI_CPU" and manifest["world_size"] == 2
    for key in ("rank_state_digests", "rank_critic_digests"):
        assert len(manifest[key]) == 2 and manifest[key][0] == manifest[key][1], key
    rows = [json.loads(line) for line in (cfg.run_dir / "vqvae" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/loss" in r][-1]
    assert last["step"] == 8 and all(key in last for key in ADV_METRICS)
