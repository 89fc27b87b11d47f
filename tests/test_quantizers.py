"""Quantizer kinds behind one interface: codes round-trip, large FSQ codebooks end to end, identical state
on every DDP rank, and the config union (kind switching, one-line errors, old config files)."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from prior.config import GatedPriorConfig
from prior.models import build_prior
from runtime.config import ConfigError, build_config, load_config, save_config
from runtime.schema import identity_values
from shards.codes import CodeDecoder, code_dtype, codes_npy
from vqvae.config import (
    QUANTIZER_CONFIGS,
    EMAQuantizerConfig,
    FSQQuantizerConfig,
    ImprovedVQVAEConfig,
    LossQuantizerConfig,
    QuantizerConfig,
    parse_vqvae_config,
)
from vqvae.models import build_vqvae
from vqvae.quantizers import QUANTIZERS, Quantizer, build_quantizer

REPO = Path(__file__).resolve().parents[1]
PRESET_NAMES = ("smoke", "seed", "improved")

# One small configuration per kind (fsq twice: with and without the learned projections), and the codebook kinds
# with their options: factorised l2-normalised codes (lookup_dim), the rotation trick, both.
KINDS: dict[str, QuantizerConfig] = {
    "ema": EMAQuantizerConfig(codebook_size=16, decay=0.8, dead_code_threshold=2.0),
    "loss": LossQuantizerConfig(codebook_size=16, kmeans_init=True),
    "fsq": FSQQuantizerConfig(levels=[5, 4, 3]),
    "fsq-projected": FSQQuantizerConfig(levels=[8, 5, 5, 5]),
    "ema-cosine": EMAQuantizerConfig(codebook_size=16, decay=0.8, dead_code_threshold=2.0, lookup_dim=3),
    "ema-rotation": EMAQuantizerConfig(codebook_size=16, decay=0.8, dead_code_threshold=2.0, rotation_trick=True),
    "loss-cosine-rotation": LossQuantizerConfig(codebook_size=16, kmeans_init=True, lookup_dim=3, rotation_trick=True),
}
DIMS = {"ema": 4, "loss": 4, "fsq": 3, "fsq-projected": 6, "ema-cosine": 6, "ema-rotation": 4,
        "loss-cosine-rotation": 6}


def _quantizer(name: str, seed: int = 0) -> Quantizer:
    torch.manual_seed(seed)
    return build_quantizer(KINDS[name], DIMS[name])


def _batch(name: str, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIMS[name], generator=g) * 1.5


def test_registry_builds_every_config_kind() -> None:
    assert set(QUANTIZERS) == set(QUANTIZER_CONFIGS)
    for kind in QUANTIZER_CONFIGS:
        cfg = build_config("smoke", [f"vqvae.quantizer.kind={kind}"])
        model = build_vqvae(cfg.vqvae)
        assert isinstance(model.quantizer, Quantizer) and model.quantizer.dim == cfg.vqvae.code_dim
        assert model.quantizer.codebook_size == model.codebook_size == cfg.vqvae.codebook_size


# ----- codes round-trip, every kind ----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(KINDS))
def test_indices_to_vectors_gives_the_quantized_output_in_eval_mode(name: str) -> None:
    q = _quantizer(name).train()
    q(_batch(name, 64, seed=1))  # ema/loss: the k-means initialisation happens on this batch
    q.eval()
    z = _batch(name, 200, seed=2)
    with torch.no_grad():
        out = q(z)
    assert out.indices.dtype == torch.long and out.indices.shape == (200,)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
    assert len(out.indices.unique()) > 1
    assert torch.equal(q.nearest(z), out.indices)
    torch.testing.assert_close(q.indices_to_vectors(out.indices), out.quantized)
    # Any index shape: the vectors come back with a trailing D.
    grid = out.indices.view(2, 10, 10)
    torch.testing.assert_close(q.indices_to_vectors(grid), out.quantized.view(2, 10, 10, -1))


@pytest.mark.parametrize("name", sorted(KINDS))
def test_straight_through_gradients_reach_the_input(name: str) -> None:
    q = _quantizer(name).train()
    z = _batch(name, 32, seed=3).requires_grad_()
    out = q(z)
    (out.quantized.pow(2).sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert {"perplexity", "codes_used"} <= set(out.stats)


@pytest.mark.parametrize("kind", sorted(QUANTIZER_CONFIGS))
@pytest.mark.parametrize("arch", ["improved", "seed"])
def test_vqvae_encode_decode_of_a_code_grid(kind: str, arch: str) -> None:
    channels, code_dim = ([8, 16], 8) if arch == "improved" else ([8, 16], 4)  # seed: 16 / 4 = 2x2 codes
    cfg = parse_vqvae_config({"arch": arch, "channels": channels, "code_dim": code_dim,
                              "quantizer": QUANTIZER_CONFIGS[kind]().model_dump()})
    torch.manual_seed(0)
    model = build_vqvae(cfg)
    x = torch.rand(3, 3, 16, 16)
    model(x)  # one training-mode forward (k-means initialisation for the codebook kinds)
    model.eval()
    with torch.no_grad():
        out = model(x)
        codes = model.encode(x)
        assert codes.shape == (3, *model.code_grid(16)) and torch.equal(codes, out.codes)
        assert int(codes.max()) < cfg.codebook_size
        torch.testing.assert_close(model.decode_codes(codes), out.recon)


# ----- FSQ ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [8, 8, 8, 8], [8, 8, 8, 6, 5], [8, 8, 8, 5, 5, 5]])
def test_fsq_codebook_sizes_end_to_end(levels: list[int]) -> None:
    """All codes of the implicit codebook are distinct vectors, code grids survive the code-shard format, a
    prior predicts every code, and a drawn grid decodes to images."""
    k = math.prod(levels)
    cfg = ImprovedVQVAEConfig(channels=[8, 16], res_blocks=0, code_dim=len(levels),
                              quantizer=FSQQuantizerConfig(levels=levels))
    assert cfg.codebook_size == k
    torch.manual_seed(0)
    model = build_vqvae(cfg).eval()
    vectors = model.quantizer.indices_to_vectors(torch.arange(k))
    assert vectors.shape == (k, len(levels)) and len(vectors.unique(dim=0)) == k

    with torch.no_grad():
        codes = model.encode(torch.rand(2, 3, 16, 16))
    grid = tuple(codes.shape[1:])
    decoder = CodeDecoder(codebook_size=k, grid=grid)
    for code in codes:
        blob = codes_npy(code.numpy(), k)
        stored = np.load(io.BytesIO(blob), allow_pickle=False)
        assert stored.dtype == code_dtype(k) == (np.int16 if k <= 2**15 else np.uint16)
        assert torch.equal(decoder("key", {"codes.npy": blob, "cls": b"3"}, 0)["codes"], code)

    prior = build_prior(GatedPriorConfig(filters=8, layers=1, kernel_size=3, embed_dim=4), k, 7).eval()
    with torch.no_grad():
        assert prior(codes, torch.tensor([0, 1])).shape == (2, k, *grid)
        drawn = prior.sample(1, grid, torch.tensor([2]), 1.0, torch.Generator().manual_seed(0))
        assert int(drawn.max()) < k
        assert model.decode_codes(drawn).shape == (1, 3, 16, 16)


def test_fsq_changes_no_state_and_is_deterministic() -> None:
    a, b = _quantizer("fsq-projected", seed=5).train(), _quantizer("fsq-projected", seed=5).train()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    buffers = {k: v.clone() for k, v in a.named_buffers()}
    z = _batch("fsq-projected", 50, seed=6)
    out_a, out_b = a(z), b(z)
    assert torch.equal(out_a.quantized, out_b.quantized) and torch.equal(out_a.indices, out_b.indices)
    assert all(torch.equal(state[k], v) for k, v in a.state_dict().items())
    assert all(torch.equal(buffers[k], v) for k, v in a.named_buffers())
    assert float(out_a.loss) == 0.0  # no auxiliary loss: nothing to collapse


# ----- every kind under torch.distributed (real gloo processes) -------------------------------------
WORLD, STEPS = 2, 3


class _Front(nn.Module):
    """A parameter in front of the quantizer, so DDP has gradients to all-reduce for every kind."""

    def __init__(self, name: str, seed: int = 0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.quantizer = _quantizer(name, seed)

    def forward(self, z: Tensor) -> Tensor:
        out = self.quantizer(z * self.scale)
        return out.quantized.pow(2).mean() + out.loss


def _full_state(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and every buffer, the non-persistent ones included."""
    return {k: v.detach().clone() for k, v in [*module.named_parameters(), *module.named_buffers()]}


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    result = {}
    for name in sorted(KINDS):
        module = _Front(name).train()
        ddp = DistributedDataParallel(module)  # broadcast_buffers=True, the default
        optim = torch.optim.SGD(module.parameters(), lr=0.1)
        before = _full_state(module)
        for step in range(STEPS):
            loss = ddp(_batch(name, 20 - 4 * rank, seed=100 * step + rank))  # different data and sizes per rank
            optim.zero_grad()
            loss.backward()
            optim.step()
        module.eval()
        with torch.no_grad():
            indices = module.quantizer.nearest(_batch(name, 40, seed=999))
        result[name] = {"before": before, "after": _full_state(module), "indices": indices}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_every_kind_ends_with_identical_state_on_every_rank(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(str(tmp_path / "pg-init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for name in sorted(KINDS):
        after0, after1 = r0[name]["after"], r1[name]["after"]
        assert after0.keys() == after1.keys()
        for key in after0:
            assert torch.equal(after0[key], after1[key]), f"{name} {key}: differs across ranks"
        assert torch.equal(r0[name]["indices"], r1[name]["indices"]), name
        # Training really moved the parameters (and the codebook where there is one to learn), so the
        # equality is not vacuous.
        moved = {k for k in after0 if not torch.equal(after0[k], r0[name]["before"][k])}
        assert "scale" in moved, name
        if name != "fsq":  # plain fsq (code_dim == len(levels)) has nothing to learn
            assert any(k.startswith("quantizer.") for k in moved), (name, moved)


# ----- bit-exact resume, every kind ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_kind_resumes_bit_exactly_from_its_state(name: str) -> None:
    """6 training steps in one go equal 3 steps, the model's and the optimizer's state loaded into a module made
    from another seed, then 3 more: codebooks, EMA statistics, restart counters and projections alike."""
    batches = [_batch(name, 24, seed=s) + s % 3 for s in range(6)]

    def steps(module: _Front, optim: torch.optim.Optimizer, part: list[Tensor]) -> None:
        for batch in part:
            optim.zero_grad()
            module(batch).backward()
            optim.step()

    straight = _Front(name).train()
    opt = torch.optim.Adam(straight.parameters(), lr=0.05)
    steps(straight, opt, batches)
    first = _Front(name).train()
    first_opt = torch.optim.Adam(first.parameters(), lr=0.05)
    steps(first, first_opt, batches[:3])
    resumed = _Front(name, seed=123).train()
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=0.05)
    resumed.load_state_dict(first.state_dict())
    resumed_opt.load_state_dict(first_opt.state_dict())
    steps(resumed, resumed_opt, batches[3:])
    for key, value in _full_state(straight).items():
        assert torch.equal(value, _full_state(resumed)[key]), f"{name} {key}"
    assert not torch.equal(_full_state(straight)["scale"], _full_state(first)["scale"])  # the steps moved it


# ----- factorised codes and the rotation trick ----------------------------------------------------------
def test_factorised_codes_are_l2_normalised_and_looked_up_by_cosine() -> None:
    q = _quantizer("ema-cosine").train()
    for seed in range(3):
        q(_batch("ema-cosine", 64, seed=seed))
    q.eval()
    codebook = q.codebook()
    assert codebook.shape == (16, 3) and q.embedding.shape == (16, 3)  # a 3-wide lookup for 6-wide vectors
    torch.testing.assert_close(codebook.norm(dim=1), torch.ones(16))
    z = _batch("ema-cosine", 100, seed=7)
    with torch.no_grad():
        cosine = F.normalize(q.project_in(z), dim=1) @ codebook.t()
        out = q(z)
    assert torch.equal(q.nearest(z), cosine.argmax(1))
    assert out.quantized.shape == (100, 6)  # projected back to code_dim
    # The EMA moved the codebook (it is learned by averaging in the normalised space, not by gradients).
    assert not q.embedding.requires_grad and float(q.step) == 3


def test_codebook_kinds_without_options_keep_their_state_dict_keys() -> None:
    """lookup_dim 0 adds no module and no parameter: weights saved before the option existed still load."""
    ema = build_quantizer(EMAQuantizerConfig(codebook_size=8), 4)
    loss = build_quantizer(LossQuantizerConfig(codebook_size=8, rotation_trick=True), 4)
    assert set(ema.state_dict()) == {"embedding", "embed_sum", "cluster_size", "initialized", "step"}
    assert set(loss.state_dict()) == {"embedding", "cluster_size", "initialized", "step"}
    projected = build_quantizer(EMAQuantizerConfig(codebook_size=8, lookup_dim=2), 4)
    assert {"project_in.weight", "project_out.bias"} <= set(projected.state_dict())


def _plane_rotation(a: Tensor, b: Tensor) -> Tensor:
    """The D×D rotation taking the direction of ``a`` to that of ``b`` within their plane, the identity on its
    orthogonal complement (Fifty et al. 2024, eq. 2), built from an angle and an orthonormal basis of the plane."""
    u = F.normalize(a, dim=0)
    v = F.normalize(b - (b @ u) * u, dim=0)
    angle = torch.atan2(b @ v, b @ u)
    plane = torch.outer(u, u) + torch.outer(v, v)
    return torch.eye(len(a), dtype=a.dtype) + (angle.cos() - 1) * plane + angle.sin() * (
        torch.outer(v, u) - torch.outer(u, v))


@pytest.mark.parametrize("name", ["ema-rotation", "loss-cosine-rotation"])
def test_rotation_trick_gradient_is_the_rotated_rescaled_output_gradient(name: str) -> None:
    """d quantized / d z = (|e| / |z|) R with R rotating z onto its code e, so the input gets (|e| / |z|) R^T g for
    an output gradient g (straight-through would pass g itself); in the lookup space with lookup_dim."""
    q = _quantizer(name).train()  # the quantizer computes in float32; the reference in float64
    q(_batch(name, 64, seed=1))  # k-means initialisation
    q.eval()
    z = _batch(name, 8, seed=2).requires_grad_()
    out = q(z)
    g = torch.randn(out.quantized.shape, generator=torch.Generator().manual_seed(3))
    out.quantized.backward(g)
    lookup = q._to_lookup(z)  # the vectors the codes were looked up for (z itself without lookup_dim)
    codes = q.codebook()[out.indices].detach().double()
    # The gradient arriving in the lookup space (through project_out when there is one), rotated by definition.
    g_lookup = (g @ q.project_out.weight if q.normalized else g).detach().double()
    rotated = torch.stack([
        tgt.norm() / src.norm() * _plane_rotation(src, tgt).t() @ grad
        for src, tgt, grad in zip(lookup.detach().double(), codes, g_lookup, strict=True)])
    # ... and carried back to z through the lookup's own map (the projection and normalisation, if any).
    expected, = torch.autograd.grad(lookup, z, rotated.float())
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-5)
    straight_through, = torch.autograd.grad(q._to_lookup(z), z, g_lookup.float())
    assert not torch.allclose(z.grad, straight_through, atol=1e-3)
    # The forward values are the codes themselves, bit for bit, as indices_to_vectors gives them.
    assert torch.equal(out.quantized, q.indices_to_vectors(out.indices))


@pytest.mark.parametrize("name", ["ema-rotation", "loss-cosine-rotation", "ema-cosine"])
def test_options_take_an_empty_batch_without_nan(name: str) -> None:
    """A batch emptied by damaged shards still takes part in the step: zero loss, no NaN, no state change."""
    q = _quantizer(name).train()
    q(_batch(name, 32, seed=1))
    z = torch.zeros(0, DIMS[name], requires_grad=True)
    out = q(z)
    (out.quantized.sum() + out.loss).backward()
    assert out.quantized.shape == (0, DIMS[name]) and float(out.loss.detach()) == 0.0


# ----- config: one union, each kind with its own settings ------------------------------------------
def test_presets_keep_their_quantizers() -> None:
    assert build_config("smoke").vqvae.quantizer == EMAQuantizerConfig(codebook_size=128, decay=0.95)
    assert build_config("seed").vqvae.quantizer == LossQuantizerConfig(codebook_size=512, commitment=0.25,
                                                                      kmeans_init=False)
    # Issue 30: the two presets of a 16x16 grid of 512 EMA codes look them up as factorised cosine codes.
    cosine = EMAQuantizerConfig(codebook_size=512, decay=0.99, lookup_dim=8, rotation_trick=True)
    assert build_config("improved").vqvae.quantizer == cosine
    assert build_config("ham128", ["data.isic_images=/images"]).vqvae.quantizer == cosine
    assert build_config("seed").vqvae.code_dim == 64 and build_config("smoke").vqvae.code_dim == 32


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_switching_kind_resets_to_that_kinds_defaults_then_applies_later_overrides(preset: str) -> None:
    cfg = build_config(preset, ["vqvae.quantizer.kind=fsq"])
    assert cfg.vqvae.quantizer == FSQQuantizerConfig() and cfg.vqvae.codebook_size == 1000
    cfg = build_config(preset, ["vqvae.quantizer.kind=fsq", "vqvae.quantizer.levels=[8,8,8,6,5]"])
    assert cfg.vqvae.codebook_size == 15360
    cfg = build_config(preset, ["vqvae.quantizer=loss", "vqvae.quantizer.codebook_size=64"])  # shorthand for .kind
    assert cfg.vqvae.quantizer == LossQuantizerConfig(codebook_size=64)


def test_setting_the_same_kind_keeps_the_presets_settings() -> None:
    assert build_config("smoke", ["vqvae.quantizer.kind=ema"]).vqvae.quantizer.decay == 0.95


@pytest.mark.parametrize(("overrides", "needles"), [
    (["vqvae.quantizer.levels=[8,5,5,5]"],
     ["unknown config key 'vqvae.quantizer.levels'", "(kind ema); allowed: codebook_size, commitment, "
      "dead_code_threshold, decay, kind, kmeans_init", "set vqvae.quantizer.kind=fsq before it"]),
    (["vqvae.quantizer.kind=fsq", "vqvae.quantizer.decay=0.9"],
     ["'decay' is not in vqvae.quantizer (kind fsq); allowed: kind, levels", "belongs to kind ema"]),
    (["vqvae.quantizer.kind=vq"], ["vqvae.quantizer.kind: unknown kind 'vq'; allowed: ema, loss, fsq"]),
    (["vqvae.codebook_size=64"], ["it is a setting of vqvae.quantizer: vqvae.quantizer.codebook_size"]),
    (["vqvae.quantizer.kind=fsq", "vqvae.quantizer.levels=[8,8,8,8,8,8]"], ["make 262144 codes; allowed: at most"]),
    (["vqvae.quantizer.kind=fsq", "vqvae.quantizer.levels=[2,5]"], ["levels.0: Input should be greater than"]),
    (["vqvae.quantizer.lookup_dim=1"], ["lookup_dim=1 leaves each normalised vector only its sign"]),
    (["vqvae.quantizer.kind=fsq", "vqvae.quantizer.rotation_trick=true"],
     ["'rotation_trick' is not in vqvae.quantizer (kind fsq)"]),
])
def test_settings_of_another_kind_fail_on_one_line(overrides: list[str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        build_config("smoke", overrides)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("kind", ["ema", "loss"])
def test_codebook_options_enter_the_identity_only_when_set(kind: str) -> None:
    """Added settings: at their old values (off) finished stages stay up to date; set, they make new outputs."""
    plain = build_config("smoke", [f"vqvae.quantizer.kind={kind}"])
    assert {"lookup_dim", "rotation_trick"}.isdisjoint(identity_values(plain.vqvae.quantizer))
    assert "patch_size" not in identity_values(plain.vqvae)
    cfg = build_config("smoke", [f"vqvae.quantizer.kind={kind}", "vqvae.quantizer.lookup_dim=8",
                                 "vqvae.quantizer.rotation_trick=true", "vqvae.patch_size=2"])
    assert identity_values(cfg.vqvae.quantizer) | {"lookup_dim": 8, "rotation_trick": True} == \
        identity_values(cfg.vqvae.quantizer)
    assert identity_values(cfg.vqvae)["patch_size"] == 2 and cfg.downsample_factor == 8
    model = build_vqvae(cfg.vqvae)
    assert model.quantizer.codebook().shape == (cfg.vqvae.codebook_size, 8) and model.quantizer.rotation_trick


@pytest.mark.slow
def test_cli_refuses_another_kinds_setting_with_one_line_and_exit_2() -> None:
    result = subprocess.run([sys.executable, "vqvae/train.py", "--preset", "smoke", "--print-params",
                             "vqvae.quantizer.levels=[8,5,5,5]"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "'levels' is not in vqvae.quantizer (kind ema); allowed: codebook_size" in lines[0]


@pytest.mark.parametrize(("preset", "overrides"), [("smoke", ["vqvae.quantizer.kind=fsq"]),
                                                   ("seed", ["vqvae.quantizer.kind=ema"]),
                                                   ("improved", ["vqvae.quantizer.kind=loss"])])
def test_saved_config_of_another_kind_than_its_preset_loads_back(tmp_path: Path, preset: str,
                                                                 overrides: list[str]) -> None:
    cfg = build_config(preset, overrides)
    save_config(cfg, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg
    assert load_config(tmp_path / "config.json", ["vqvae.quantizer.kind=fsq"]).vqvae.quantizer == FSQQuantizerConfig()


def test_old_config_file_is_refused_with_the_overrides_that_remake_it(tmp_path: Path) -> None:
    saved = build_config("smoke").model_dump(mode="json")
    saved["vqvae"] |= {"quantizer": "ema", "codebook_size": 128, "commitment": 0.25, "ema_decay": 0.95,
                       "dead_code_threshold": 1.0, "kmeans_init": True}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "config.json")
    message = str(err.value)
    assert "\n" not in message and "uses the old vqvae quantizer keys" in message and "re-make it" in message
    overrides = message.split("run_dir=RUN_DIR ", 1)[1].split()
    assert overrides[0] == "vqvae.quantizer.kind=ema" and "vqvae.quantizer.decay=0.95" in overrides
    assert build_config("smoke", overrides).vqvae == build_config("smoke").vqvae  # they say the same thing
