"""CPU stand-ins for the training's CUDA branches: fused Adam, channels-last model and batches, bf16 autocast,
pinned loader memory with non-blocking copies, and the deferred-decode batch path.

``*_train.gpu_path=always`` takes the GPU path's branches on any device, ``mixed_precision=bf16`` autocasts on
the CPU too and ``decode_on=device`` decodes whole batches in the training process, so one tiny in-process
training on the CPU runs every branch a CUDA machine takes. Each test asserts that its branch was taken (what the
optimizer was built with, the memory layout the model saw, the autocast state inside the loss), not only that the
training finished. What a CPU cannot show: pinning needs an accelerator (torch leaves the memory unpinned and
warns), and a non-blocking copy to the CPU is a plain one; ``python -m bench gpu`` measures those on a GPU.
"""

from __future__ import annotations

import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_config

from runtime.train_config import OptimConfig
from runtime.trainer import make_optimizer, train
from shards.loader import ShardTrainData
from vqvae.train import VQVAETask, build_plan

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason=(
    "CPU stand-ins: with CUDA the trainer takes these branches for real (python -m bench gpu measures them)"))


class WatchedTask(VQVAETask):
    """The VQ-VAE stage's task, noting what its loss sees at each step."""

    seen: list[dict[str, Any]]

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        self.seen.append({
            "batch_channels_last": batch["image"].is_contiguous(memory_format=torch.channels_last),
            "batch_contiguous": batch["image"].is_contiguous(),
            "weights_channels_last": conv.weight.is_contiguous(memory_format=torch.channels_last),
            "autocast": torch.is_autocast_enabled("cpu"),
            "autocast_dtype": torch.get_autocast_dtype("cpu"),
            "conv_output_dtype": conv(batch["image"][:1]).dtype,
        })
        return super().loss(model, batch)


class WatchedData(ShardTrainData):
    """The VQ-VAE stage's shard data, noting its loader and the batches the trainer hands to ``to_device``."""

    loaders: list[torch.utils.data.DataLoader]
    raw_batches: list[set[str]]

    def loader(self, **kw: Any) -> torch.utils.data.DataLoader:
        loader = super().loader(**kw)
        self.loaders.append(loader)
        return loader

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        self.raw_batches.append(set(batch))
        return super().to_device(batch, device)


@pytest.fixture(scope="module")
def gpu_path_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two steps of the tiny VQ-VAE trained in this process on the CPU with every GPU-path branch selected."""
    from accelerate.state import AcceleratorState

    run_dir = tmp_path_factory.mktemp("gpu-path") / "run"
    run_dir.mkdir()
    (run_dir / "data").symlink_to(tiny_data, target_is_directory=True)
    cfg = tiny_config(run_dir, "vqvae_train.gpu_path=always", "vqvae_train.mixed_precision=bf16",
                      "vqvae_train.decode_on=device", "vqvae_train.max_steps=2", "vqvae_train.checkpoint_every=2",
                      "vqvae_train.eval_every=2", "vqvae_train.log_every=1", "vqvae_train.eval_batches=1")
    stage_task, plan = build_plan(cfg, resume="none")
    task = WatchedTask(cfg, stage_task.val_split)
    data = WatchedData(plan.data.train_split, plan.data.val_split, cfg.vqvae_train)
    task.seen, data.loaders, data.raw_batches = [], [], []
    plan.data = data
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            status = train(task, plan)
    finally:
        for signum, handler in handlers.items():  # the trainer's stop handlers stay with the training
            signal.signal(signum, handler)
        # accelerate keeps one process-wide state: the next Accelerator in this process must not inherit bf16.
        AcceleratorState._reset_state(reset_partial_state=True)
    checkpoint = max((plan.out_dir / "checkpoints").glob("step-*"))
    yield {"status": status, "seen": task.seen, "loaders": data.loaders, "raw": data.raw_batches,
           "warnings": [str(w.message) for w in caught],
           "optimizer": torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)}


def test_fused_adam_is_built_on_the_gpu_path(gpu_path_run: dict[str, Any]) -> None:
    assert gpu_path_run["status"] == 0
    groups = gpu_path_run["optimizer"]["param_groups"]
    assert groups and all(g["fused"] is True for g in groups)  # the trainer built it with fused=True
    assert gpu_path_run["optimizer"]["state"]  # and it stepped
    assert OptimConfig(gpu_path="always").gpu_path_on("cpu") and OptimConfig().gpu_path_on("cuda")
    assert not OptimConfig().gpu_path_on("cpu")  # the default CPU path keeps torch's bitwise-stable Adam


def test_fused_cpu_adam_steps_like_the_default_one() -> None:
    """The fused kernel is the same algorithm: one step from the same weights and gradient lands on the same
    weights (to float rounding) as the default implementation the CPU path uses."""
    torch.manual_seed(0)
    weights = torch.randn(64, 32)
    grad = torch.randn(64, 32)
    after = {}
    for fused in (True, False):
        param = torch.nn.Parameter(weights.clone())
        optimizer = make_optimizer([param], fused=fused, lr=1e-2, weight_decay=1e-4)
        assert optimizer.param_groups[0]["fused"] is (True if fused else None)
        for _ in range(3):
            param.grad = grad.clone()
            optimizer.step()
        after[fused] = param.detach()
    assert not torch.equal(after[True], weights)
    torch.testing.assert_close(after[True], after[False])


def test_model_and_batches_are_channels_last(gpu_path_run: dict[str, Any]) -> None:
    seen = gpu_path_run["seen"]
    assert len(seen) == 2  # both training steps
    for step in seen:
        assert step["weights_channels_last"]
        assert step["batch_channels_last"] and not step["batch_contiguous"]  # NHWC for real, not a 1-pixel tie


def test_loss_runs_under_bf16_autocast(gpu_path_run: dict[str, Any]) -> None:
    for step in gpu_path_run["seen"]:
        assert step["autocast"] and step["autocast_dtype"] == torch.bfloat16
        assert step["conv_output_dtype"] == torch.bfloat16  # convolutions really ran in bf16


def test_loader_pins_memory_and_batches_copy_non_blocking(gpu_path_run: dict[str, Any], tiny_data: Path) -> None:
    """The training loader is built with pin_memory=True on the GPU path (on a CPU without an accelerator torch
    leaves the memory unpinned and says so); ``to_device`` copies non-blocking into the channels-last layout and
    keeps every value. The default CPU path pins nothing and keeps the layout."""
    (loader,) = gpu_path_run["loaders"]
    assert loader.pin_memory is True
    assert any("pin_memory" in w for w in gpu_path_run["warnings"])  # torch saw the request; no accelerator here

    def first(gpu_path: str) -> tuple[ShardTrainData, torch.utils.data.DataLoader, dict[str, Any]]:
        optim = OptimConfig(batch_size=8, seed=3, num_workers=0, gpu_path=gpu_path, decode_on="workers")
        data = ShardTrainData(tiny_data / "train", tiny_data / "val", optim)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unpinned-memory warning, asserted above
            loader = data.loader(epoch=0, position=0, rank=0, world_size=1)
            return data, loader, next(iter(loader))

    gpu_data, gpu_loader, batch = first("always")
    cpu_data, cpu_loader, same = first("auto")
    assert gpu_loader.pin_memory is True and cpu_loader.pin_memory is False
    moved, kept = gpu_data.to_device(dict(batch), CPU), cpu_data.to_device(dict(same), CPU)
    assert moved["image"].is_contiguous(memory_format=torch.channels_last) and not moved["image"].is_contiguous()
    assert kept["image"].is_contiguous()
    assert torch.equal(moved["image"], kept["image"]) and torch.equal(moved["label"], kept["label"])


def test_deferred_batches_are_decoded_by_the_trainer(gpu_path_run: dict[str, Any]) -> None:
    """decode_on=device: the loader hands over JPEG bytes and augmentation draws, never pixels, and the trainer's
    ``to_device`` decodes them into the batch the loss trains on (pixel equality with the worker path:
    tests/test_shards_loader.py)."""
    raw = gpu_path_run["raw"]
    assert len(raw) == 2
    for keys in raw:
        assert {"encoded", "augment"} <= keys and "image" not in keys
    assert all(step["batch_channels_last"] for step in gpu_path_run["seen"])  # decoded images reached the loss


def test_decode_on_auto_decodes_in_the_workers(tiny_data: Path) -> None:
    """Until ``python -m bench gpu`` has passed on a real GPU (docs/gpu.md), auto never defers decoding."""
    data = ShardTrainData(tiny_data / "train", tiny_data / "val", OptimConfig(batch_size=4, num_workers=0))
    batch = next(iter(data.loader(epoch=0, position=0, rank=0, world_size=1)))
    assert "image" in batch and "encoded" not in batch and "augment" not in batch
