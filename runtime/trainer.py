"""The one training loop shared by ``vqvae/train.py`` and ``prior/train.py``.

What a stage supplies is a :class:`TrainTask` (model, loss, evaluation, how to decode a shard
sample); this module owns everything else: accelerate/DDP set-up, the step-based schedule,
deterministic data position, atomic checkpoints and ``--resume auto``, the Slurm warning signal,
NaN/Inf detection, metric logging and the stage manifest that the next stage reads.

Data: each rank asks the plan's :class:`TrainData` for its own loader for (epoch, start step, rank,
world). The loader is deliberately NOT passed to ``accelerator.prepare()``: accelerate would wrap it
for dispatching or sharding and split the data a second time, silently losing samples.

One writer: the main process holds ``OUT/.lock`` for the whole run, so two trainings (a rerun while
an orphan still trains, a by-hand run beside the pipeline) can never write one checkpoint folder.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
from tqdm import tqdm

from runtime.checkpoint import (
    CheckpointError,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from runtime.config import OptimConfig, RunConfig
from runtime.errors import NonFiniteLossError
from runtime.files import sha256_file
from runtime.lineage import StageRun
from runtime.log import get_logger
from runtime.process import exclusive_lock
from runtime.seeding import seed_everything
from runtime.signals import StopRequest
from runtime.tracking import RunLogger

log = get_logger(__name__)


class TrainTask(Protocol):
    stage: str

    def build_model(self) -> torch.nn.Module: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss and extra scalars to log (per rank; averaged across ranks when logged)."""

    def evaluate(self, model: torch.nn.Module, step: int, out_dir: Path) -> tuple[dict[str, float], dict[str, Path]]:
        """Validation metrics and image files, on the main process with the unwrapped model."""


class TrainData(Protocol):
    """What the trainer needs of its data (shards.loader.ShardTrainData implements it)."""

    def check(self, world_size: int) -> None:
        """Raise a UserError when the data cannot be trained on (damaged, empty, too small)."""

    def steps_per_epoch(self, world_size: int) -> int: ...

    def loader(self, *, epoch: int, start_step: int, rank: int, world_size: int) -> Iterable[dict[str, Any]]:
        """This rank's batches of one epoch from ``start_step`` on; the same count on every rank."""


@dataclass
class TrainPlan:
    """Where a training stage reads and writes, and what its outputs depend on."""

    run: StageRun
    """Output folder and identity (runtime/lineage.py): a checkpoint of another identity is never resumed."""
    data: TrainData
    optim: OptimConfig
    config: RunConfig
    resume: str = "auto"
    keep_checkpoints: int = 3
    process_group_timeout_s: int = 600
    manifest_extras: dict[str, Any] = field(default_factory=dict)
    """Facts downstream stages read from this stage's manifest (e.g. the prior's code grid)."""

    @property
    def out_dir(self) -> Path:
        return self.run.out_dir


def learning_rate(optim: OptimConfig, step: int) -> float:
    """Linear warm-up then constant or cosine decay; a pure function of the step, so no scheduler
    state has to be checkpointed and resuming cannot shift the schedule."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    progress = (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps)
    return optim.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_accelerator(optim: OptimConfig, timeout_s: int) -> Accelerator:
    mixed = None if optim.mixed_precision == "no" else optim.mixed_precision  # None: honour launch flags
    return Accelerator(
        mixed_precision=mixed,
        kwargs_handlers=[
            # Bounded: if a rank dies, the others fail with an error instead of waiting forever.
            InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s)),
            # broadcast_buffers stays on (BatchNorm stats of the seed model); it is harmless for the EMA
            # codebook only because the quantizer all-reduces its statistics (see vqvae/quantizer.py).
            DistributedDataParallelKwargs(broadcast_buffers=True),
        ],
    )


def _any_rank(flag: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train(task: TrainTask, plan: TrainPlan) -> int:
    """Run (or resume) training; returns the process exit status (0 done, 75 or 130 stopped by a signal)."""
    # Every rank checks before any process group exists, so a refusal cannot leave a peer waiting.
    plan.data.check(int(os.environ.get("WORLD_SIZE", "1")))
    plan.run.claim()
    if int(os.environ.get("RANK", "0")) == 0:
        with exclusive_lock(plan.out_dir / ".lock", f"another {task.stage} training is writing to {plan.out_dir}"):
            return _train(task, plan)
    return _train(task, plan)


def _train(task: TrainTask, plan: TrainPlan) -> int:
    optim, cfg = plan.optim, plan.config
    accelerator = make_accelerator(optim, plan.process_group_timeout_s)
    # Both USR signals, whatever cluster.signal says: a job submitted by plain sbatch with its own --signal
    # must not lose the warning (the launchers ignore both for the same reason).
    stop = StopRequest((cfg.cluster.signal, "USR1", "USR2", "TERM", "INT"))
    seed_everything(optim.seed)  # same initial weights on every rank, and across reruns
    model = task.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    ckpt_dir = plan.out_dir / "checkpoints"

    state = TrainState(config_digest=plan.run.identity)
    resume_from = latest_checkpoint(ckpt_dir) if plan.resume == "auto" else (
        None if plan.resume == "none" else Path(plan.resume))
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        if state.config_digest != plan.run.identity:
            raise CheckpointError(  # a UserError: one line, exit 2 (SystemExit gave exit 1)
                f"checkpoint {resume_from} belongs to another configuration or input data "
                f"(identity {state.config_digest} != {plan.run.identity}); use a new run_dir or --resume none")
        if accelerator.is_main_process:
            log.info("resumed from %s (step %d)", resume_from, state.step)
    model, optimizer = accelerator.prepare(model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    saved_world = state.extra.get("world_size")
    if saved_world is not None and saved_world != world:
        # Resuming is by global step: with another world size each step takes world x batch samples, so the
        # data order (and the final weights) differ from an uninterrupted run. Allowed, but never silent.
        state.extra.setdefault("world_size_changes", []).append({"step": state.step, "from": saved_world,
                                                                 "to": world})
        if accelerator.is_main_process:
            log.warning("%s: resuming at step %d with %d processes, but %s was saved by %d: each step now takes "
                        "%d x %d samples instead of %d x %d, so the data order differs from an uninterrupted run "
                        "(recorded as world_size_changes in the manifest)", task.stage, state.step, world,
                        resume_from, saved_world, world, optim.batch_size, saved_world, optim.batch_size)
    state.extra["world_size"] = world
    spe = plan.data.steps_per_epoch(world)
    if accelerator.is_main_process:
        log.info("%s: %d processes (%s), %d steps/epoch, training to step %d", task.stage, world,
                 accelerator.distributed_type, spe, optim.max_steps)

    logger = RunLogger(plan.out_dir, task.stage, cfg.model_dump(mode="json"),
                       enabled=accelerator.is_main_process, wandb_mode=cfg.wandb, resume_step=state.step)
    bar = tqdm(total=optim.max_steps, initial=state.step, disable=not accelerator.is_main_process,
               desc=task.stage, dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)

    def checkpoint() -> None:
        state.epoch, state.step_in_epoch = divmod(state.step, spe)
        if accelerator.is_main_process:
            save_checkpoint(ckpt_dir, accelerator.unwrap_model(model), optimizer, state,
                            keep=plan.keep_checkpoints)
        accelerator.wait_for_everyone()

    # Throughput since the previous log row (not since start: loader start-up and evaluations would
    # drag a running average down).
    images_seen, bad_samples, t_log, exit_status = 0, 0, time.perf_counter(), 0
    while state.step < optim.max_steps and exit_status == 0:
        epoch, start = divmod(state.step, spe)
        for batch in plan.data.loader(epoch=epoch, start_step=start, rank=rank, world_size=world):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(optim, state.step)
            model.train()
            batch = _to_device(batch, accelerator.device)
            with accelerator.autocast():
                loss, extras = task.loss(model, batch)
            if _any_rank(not bool(torch.isfinite(loss.detach()).item()), accelerator.device):
                last = latest_checkpoint(ckpt_dir)
                bar.close()  # the error message gets a line of its own
                raise NonFiniteLossError(
                    f"{task.stage}: loss became {loss.item()} at step {state.step} on at least one rank; "
                    f"stopped before updating the weights. Last good checkpoint: {last or 'none'}. "
                    f"Try a lower learning rate ({task.stage}_train.lr={optim.lr}) or grad_clip.")
            accelerator.backward(loss)
            if optim.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            images_seen += len(batch["label"]) * world
            bad_samples += len(batch.get("dropped", ()))
            bar.update(1)

            if state.step % optim.log_every == 0 or state.step == optim.max_steps:
                scalars = {"loss": loss.detach(), **{k: v.detach() for k, v in extras.items()}}
                means = {k: accelerator.reduce(v.float().reshape(1), "mean").item() for k, v in scalars.items()}
                elapsed, t_log = time.perf_counter() - t_log, time.perf_counter()
                dropped = accelerator.reduce(torch.tensor([float(bad_samples)], device=accelerator.device), "sum")
                means |= {"lr": learning_rate(optim, state.step - 1), "epoch": epoch,
                          "images_per_s": images_seen / max(elapsed, 1e-9), "bad_samples": dropped.item()}
                images_seen = 0
                logger.log(state.step, {f"train/{k}": v for k, v in means.items()})
                bar.set_postfix(loss=f"{means['loss']:.4f}", refresh=False)
            if state.step % optim.eval_every == 0 or state.step == optim.max_steps:
                _evaluate(task, accelerator, model, state.step, plan.out_dir, logger)
            if state.step % optim.checkpoint_every == 0 or state.step == optim.max_steps:
                checkpoint()
            if _any_rank(stop.requested, accelerator.device):
                if state.step % optim.checkpoint_every and state.step != optim.max_steps:
                    checkpoint()
                exit_status = stop.exit_status
                if accelerator.is_main_process:
                    log.warning("stop requested (%s): checkpoint at step %d saved, exiting %d (%s)",
                                stop.received or "signal on another rank", state.step, exit_status,
                                stop.meaning)
                break
            if state.step >= optim.max_steps:
                break
    bar.close()

    if exit_status == 0:
        digests = _rank_digests(accelerator.unwrap_model(model), accelerator)
        if len(set(digests)) != 1:
            raise RuntimeError(f"{task.stage}: ranks ended with different weights {digests}; DDP is broken")
        nodes = _rank_nodes(accelerator)  # a collective: every rank takes part
        if accelerator.is_main_process:
            _write_stage_outputs(accelerator.unwrap_model(model), plan, task.stage, state, {
                "world_size": world, "distributed_type": str(accelerator.distributed_type).split(".")[-1],
                "rank_state_digests": digests, "nodes": nodes,
                "world_size_changes": state.extra.get("world_size_changes", [])})
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exit_status


def _evaluate(task: TrainTask, accelerator: Accelerator, model: torch.nn.Module, step: int, out_dir: Path,
              logger: RunLogger) -> None:
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model)
        inner.eval()
        metrics, images = task.evaluate(inner, step, out_dir)
        inner.train()
        logger.log(step, {f"val/{k}": v for k, v in metrics.items()}, images)
        log.info("step %d validation: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    accelerator.wait_for_everyone()


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (codebook, EMA statistics, BatchNorm stats included)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:15]


def _rank_digests(model: torch.nn.Module, accelerator: Accelerator) -> list[str]:
    """Every rank's state digest, so the manifest proves the ranks hold identical weights and codebooks."""
    mine = state_digest(model)
    if accelerator.num_processes == 1:
        return [mine]
    # 15 hex digits = 60 bits: fits an int64 tensor, which every backend (gloo, NCCL) can all-gather.
    local = torch.tensor([int(mine[:15], 16)], dtype=torch.int64, device=accelerator.device)
    gathered = [torch.zeros_like(local) for _ in range(accelerator.num_processes)]
    dist.all_gather(gathered, local)
    return [f"{int(t.item()):015x}" for t in gathered]


def _rank_nodes(accelerator: Accelerator) -> list[str]:
    """The node each rank ran on, by rank (Slurm's node name, else the host name), as every rank itself saw
    it: a multi-node run whose ranks all claim one node (every node took machine rank 0) shows here."""
    mine = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    if accelerator.num_processes == 1:
        return [mine]
    gathered: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(gathered, mine)
    return [str(node) for node in gathered]


def _write_stage_outputs(model: torch.nn.Module, plan: TrainPlan, stage: str, state: TrainState,
                         distributed: dict[str, Any]) -> None:
    """Final weights, then the manifest (written last: its presence means the stage is complete)."""
    weights = plan.out_dir / "final" / "model.safetensors"
    save_weights(model, weights, metadata={"stage": stage, "identity": plan.run.identity})
    sha = sha256_file(weights)
    plan.run.finish(sha, {"steps": state.step, "weights": str(weights.relative_to(plan.out_dir)),
                          "weights_sha256": sha, **plan.manifest_extras, **distributed})
