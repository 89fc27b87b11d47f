"""VQ-VAE models and the vector quantiser, including its DDP codebook-consistency contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from runtime.config import build_config
from runtime.cost import forward_macs
from vqvae.config import EMAQuantizerConfig, ImprovedVQVAEConfig
from vqvae.models import build_vqvae, count_parameters
from vqvae.quantizers import VectorQuantizer

SEED_PARAMS = 3_512_387
REPORT_PARAMS = 3_545_155


def _blobs(n: int, size: int, seed: int) -> Tensor:
    """Images of one soft coloured disc on a coloured background: random but structured."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    centre = torch.rand(n, 2, 1, 1, generator=g) * 0.6 + 0.2
    radius = torch.rand(n, 1, 1, generator=g) * 0.2 + 0.15
    dist2 = (yy - centre[:, 0]) ** 2 + (xx - centre[:, 1]) ** 2
    disc = torch.sigmoid((radius**2 - dist2) * 200)[:, None]
    fg, bg = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    return disc * fg + (1 - disc) * bg


# ----- seed architecture ---------------------------------------------------------------------------
def test_seed_parameter_count_matches_described_layers() -> None:
    model = build_vqvae(build_config("seed").vqvae)
    assert count_parameters(model) == SEED_PARAMS
    # The report's figure is exactly one extra 512×64 codebook.
    assert REPORT_PARAMS - SEED_PARAMS == 512 * 64
    ema = build_vqvae(build_config("seed", ["vqvae.quantizer.kind=ema"]).vqvae)
    assert count_parameters(ema) == SEED_PARAMS  # the EMA codebook (a buffer) is counted once too


def test_seed_shapes_at_256px() -> None:
    torch.manual_seed(0)
    model = build_vqvae(build_config("seed").vqvae)
    assert model.code_grid(256) == (16, 16)
    with torch.no_grad():
        out = model(torch.rand(16, 3, 256, 256))
    assert out.recon.shape == (16, 3, 256, 256)
    assert out.recon.min() >= 0 and out.recon.max() <= 1
    assert out.codes.shape == (16, 16, 16) and out.codes.dtype == torch.long
    assert out.codes.numel() == 4096  # 16 images × 8×8 positions × 4 codes of 64 channels
    assert out.loss.ndim == 0
    assert {"commitment_loss", "codebook_loss", "perplexity", "dead_codes"} <= set(out.stats)


def test_seed_code_layout_is_depth_to_space_and_encode_decode_agree_with_forward() -> None:
    torch.manual_seed(0)
    model = build_vqvae(build_config("seed").vqvae).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        codes = model.encode(x)
        z = model.encoder(x)  # 2×256×2×2
        assert codes.shape == (2, 4, 4) == (2, *model.code_grid(64))
        for b in range(2):
            for i in range(2):
                for j in range(2):
                    for k in range(4):
                        chunk = z[b, 64 * k: 64 * (k + 1), i, j]
                        assert codes[b, 2 * i + k // 2, 2 * j + k % 2] == model.quantizer.nearest(chunk[None])[0]
        assert torch.equal(out.codes, codes)
        torch.testing.assert_close(model.decode_codes(codes), out.recon)
        # The depth-to-space layout and its inverse round-trip exactly.
        assert torch.equal(model._from_grid(model._to_grid(codes.view(2, 2, 2, 4))), codes.view(2, 2, 2, 4))


# ----- improved architecture -----------------------------------------------------------------------
SMALL = ImprovedVQVAEConfig(channels=[16, 32], res_blocks=1, code_dim=8,
                            quantizer=EMAQuantizerConfig(codebook_size=32))


def test_improved_shapes_and_encode_decode() -> None:
    torch.manual_seed(0)
    model = build_vqvae(SMALL)
    x = _blobs(4, 32, seed=1)
    out = model(x)  # training mode: k-means init on this batch
    assert model.code_grid(32) == (8, 8)
    assert out.recon.shape == x.shape and out.codes.shape == (4, 8, 8)
    assert out.recon.min() >= 0 and out.recon.max() <= 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert torch.equal(model.encode(x), out.codes)
        torch.testing.assert_close(model.decode_codes(out.codes), out.recon)


def test_improved_loss_decreases_below_best_constant_image() -> None:
    torch.manual_seed(0)
    model = build_vqvae(SMALL)
    optim = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = _blobs(8, 32, seed=2)
    losses, recon = [], []
    for _ in range(40):
        out = model(x)
        mse = F.mse_loss(out.recon, x)
        loss = mse + out.loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
        recon.append(mse.item())
    assert losses[-1] < 0.6 * losses[0], losses
    # Beating the best image-independent output means the codes carry per-image information.
    best_constant = F.mse_loss(x.mean(0, keepdim=True).expand_as(x), x).item()
    assert sum(recon[-3:]) / 3 < 0.8 * best_constant, (recon, best_constant)


# ----- improved architecture with a cheap stem (patch_size) ------------------------------------------
@pytest.mark.parametrize("patch", [2, 4])
def test_patch_stem_runs_nothing_at_full_resolution_and_round_trips_codes(patch: int) -> None:
    cfg = SMALL.model_copy(update={"patch_size": patch})
    assert cfg.downsample_factor == patch * 4
    torch.manual_seed(0)
    model = build_vqvae(cfg)
    x = _blobs(2, 32, seed=1)
    sides: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sides.append(out.shape[-1]))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    out = model(x)  # training mode: k-means init on this batch
    for hook in hooks:
        hook.remove()
    assert max(sides) == 32 // patch  # every convolution runs at 1/patch of the image side or less
    side = 32 // (patch * 4)
    assert model.code_grid(32) == (side, side) and out.codes.shape == (2, side, side)
    assert out.recon.shape == x.shape and out.recon.min() >= 0 and out.recon.max() <= 1
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert torch.equal(model.encode(x), out.codes)
        torch.testing.assert_close(model.decode_codes(out.codes), out.recon)


def test_patch_stem_is_cheaper_and_patch_size_1_keeps_the_layers_of_older_weights() -> None:
    # ham128's VQ-VAE as it was before patch_size existed (76 tensors, the last conv at decoder.12): its weights load.
    before = build_vqvae(build_config("ham128", ["data.isic_images=/images", "vqvae.quantizer.kind=fsq",
                                                 "vqvae.patch_size=1", "vqvae.channels=[32,64,128]",
                                                 "vqvae.res_blocks=1"]).vqvae)
    keys = [key for key in before.state_dict() if key.startswith("decoder.")]
    assert count_parameters(before) == 1_143_559 and len(before.state_dict()) == 76
    assert keys[-2:] == ["decoder.12.weight", "decoder.12.bias"]
    # The same 16x16 code grid at 64 px with one stage fewer: no conv at 64 px, fewer MACs.
    cheap = build_vqvae(SMALL.model_copy(update={"patch_size": 2, "channels": [32]}))
    full = build_vqvae(SMALL)
    assert cheap.code_grid(64) == full.code_grid(64) == (16, 16)
    image = torch.zeros(1, 3, 64, 64)
    assert forward_macs(cheap, image) < 0.7 * forward_macs(full, image)


# ----- quantiser, single process -------------------------------------------------------------------
def test_loss_mode_gradients_reach_codebook_and_encoder() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(8, 4, commitment=0.25, mode="loss", kmeans_init=False)
    z = torch.randn(32, 4, requires_grad=True)
    out = q(z)
    out.quantized.sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight-through: identity gradient
    assert q.embedding.grad is None
    out.loss.backward()
    assert q.embedding.grad is not None and q.embedding.grad.abs().sum() > 0


def test_usage_statistics() -> None:
    q = VectorQuantizer(4, 2, mode="loss", kmeans_init=False).eval()
    q.embedding.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    out = q(torch.tensor([[0.1, 0.0], [0.0, -0.1], [0.9, 0.1], [0.0, 1.2]]))
    assert out.indices.tolist() == [0, 0, 1, 2]
    torch.testing.assert_close(out.stats["perplexity"], torch.tensor(2 * 2**0.5))  # exp(H(½, ¼, ¼))
    assert out.stats["codes_used"] == 0.75


def test_eval_mode_changes_no_state() -> None:
    q = VectorQuantizer(8, 4, mode="ema").eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(16, 4))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_ema_resume_is_bitwise_identical_and_does_not_reinit() -> None:
    batches = [torch.randn(24, 4, generator=torch.Generator().manual_seed(s)) + s % 3 for s in range(6)]

    def quantizer(seed: int) -> VectorQuantizer:
        torch.manual_seed(seed)
        return VectorQuantizer(16, 4, mode="ema", decay=0.8, dead_code_threshold=2.0, kmeans_init=True)

    straight = quantizer(0)
    restarted = 0.0
    for b in batches:
        restarted += float(straight(b).stats["restarted_codes"])
    assert restarted > 0  # the comparison covers restarts, not just EMA steps

    first = quantizer(0)
    for b in batches[:3]:
        first(b)
    resumed = quantizer(123)  # different random init: only the loaded state may matter
    resumed.load_state_dict(first.state_dict())
    for b in batches[3:]:
        resumed(b)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# ----- quantiser under torch.distributed (real gloo processes) -------------------------------------
K, D, STEPS, WORLD = 16, 4, 4, 2


def _rank_batch(step: int, rank: int) -> Tensor:
    """Different, clustered data per rank (and per step); rank 1's rows are fewer, to exercise padding."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    centres = torch.randn(5, D, generator=g) * 3 + 4 * rank
    n = 24 - 4 * rank
    return centres[torch.randint(5, (n,), generator=g)] + 0.1 * torch.randn(n, D, generator=g)


def _quantizer() -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(K, D, commitment=0.25, mode="ema", decay=0.8, dead_code_threshold=2.0,
                           kmeans_init=True)


class _Scaled(nn.Module):
    """A parameter in front of the quantiser: DDP needs something to all-reduce gradients for."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.quantizer = _quantizer()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        out = self.quantizer(z * self.scale)
        return out.loss, out.stats["restarted_codes"]


def _snapshot(q: VectorQuantizer, restarted: Tensor) -> dict[str, Tensor]:
    return {**{k: v.detach().clone() for k, v in q.state_dict().items()}, "restarted": restarted.clone()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    snapshots: dict[str, list[dict[str, Tensor]]] = {"plain": [], "ddp": []}
    q = _quantizer().train()
    for step in range(STEPS):
        snapshots["plain"].append(_snapshot(q, q(_rank_batch(step, rank)).stats["restarted_codes"]))
    module = _Scaled().train()
    ddp = DistributedDataParallel(module)  # broadcast_buffers=True, the default
    for step in range(STEPS):
        loss, restarted = ddp(_rank_batch(step, rank))
        loss.backward()
        snapshots["ddp"].append(_snapshot(module.quantizer, restarted))
    torch.save(snapshots, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _reference(ranks: range) -> list[dict[str, Tensor]]:
    """Single-process updates on the concatenation of the given ranks' batches."""
    q = _quantizer().train()
    out = []
    for step in range(STEPS):
        batch = torch.cat([_rank_batch(step, r) for r in ranks])
        out.append(_snapshot(q, q(batch).stats["restarted_codes"]))
    return out


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_ema_codebook_identical_across_ranks_and_equal_to_concatenated_update(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "pg-init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    reference = _reference(range(WORLD))
    assert sum(float(s["restarted"]) for s in reference) > 0  # dead-code restarts really happened
    for mode in ("plain", "ddp"):
        for step in range(STEPS):
            r0, r1 = ranks[0][mode][step], ranks[1][mode][step]
            for key in r0:
                where = f"{mode} step {step} {key}"
                assert torch.equal(r0[key], r1[key]), f"{where}: differs across ranks"
                torch.testing.assert_close(r0[key], reference[step][key], msg=lambda m, w=where: f"{w}: {m}")
    # Sanity: rank 0's data alone gives a different codebook, so the match above is not vacuous.
    rank0_only = _reference(range(1))
    assert not torch.allclose(rank0_only[-1]["embedding"], reference[-1]["embedding"])
