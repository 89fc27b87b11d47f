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
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from runtime.config import RunConfig
from runtime.errors import NonFiniteLossError
from runtime.files import sha256_file
from runtime.lineage import StageRun, content_digest, token
from runtime.log import get_logger
from runtime.pretrained import write_model_config
from runtime.process import exclusive_lock
from runtime.seeding import seed_everything
from runtime.signals import StopRequest
from runtime.tracking import RunLogger
from runtime.train_config import OptimConfig

log = get_logger(__name__)


class TrainTask(Protocol):
    stage: str

    def build_model(self) -> torch.nn.Module: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss and extra scalars to log (per rank; averaged across ranks when logged)."""

    def evaluate(self, model: torch.nn.Module, step: int, out_dir: Path) -> tuple[dict[str, float], dict[str, Path]]:
        """Validation metrics and image files, on the main process with the unwrapped model."""


@dataclass
class Critic:
    """A second network trained against the model (a GAN discriminator), from a task's optional
    ``build_critic()``. The trainer owns its optimizer (Adam, the model's learning-rate schedule scaled to
    ``lr``), DDP wrapping, checkpoints and rank digests; the task owns its losses (:class:`CriticTask`)."""

    module: torch.nn.Module
    lr: float
    betas: tuple[float, float]
    start_step: int
    """From this step on the critic is trained and used at every step; before it, neither."""


class CriticTask(TrainTask, Protocol):
    """A TrainTask with a critic. At each step from ``critic.start_step`` on, after ``loss`` and in the same
    autocast: ``adversarial_loss`` completes the model's loss, ``critic_loss`` gives the critic's on this
    step's outputs (detached); then the model is updated, then the critic."""

    def build_critic(self) -> Critic | None:
        """None: no critic in this configuration."""

    def adversarial_loss(self, model: torch.nn.Module, critic: torch.nn.Module, loss: torch.Tensor,
                         extras: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The model's loss with its adversarial term. Both networks unwrapped; the critic must be used without
        gradients to its parameters, so the model's DDP step never involves it."""

    def critic_loss(self, critic: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The critic's loss and scalars to log; ``critic`` as prepared by accelerate (DDP under several
        processes, so its gradients are all-reduced)."""


class TrainData(Protocol):
    """What the trainer needs of its data (shards.loader.ShardTrainData implements it)."""

    @property
    def num_samples(self) -> int:
        """Samples in one epoch."""

    @property
    def train_splits(self) -> tuple[Path, ...]:
        """The split folders trained on (the manifest's ``trained_on``: no test split may be among them)."""

    def check(self, world_size: int) -> None:
        """Raise a UserError when the data cannot be trained on (damaged, empty, too small)."""

    def steps_per_epoch(self, world_size: int) -> int: ...

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """A batch of :meth:`loader` moved to (and, where deferred, decoded on) the training device."""

    def loader(self, *, epoch: int, position: int, rank: int, world_size: int) -> Iterable[dict[str, Any]]:
        """This rank's batches, epoch after epoch, from ``position`` (samples of ``epoch`` consumed by all ranks
        together) on: the same count on every rank, whatever world size reached the position. Each batch
        carries its ``epoch`` and the ``position`` after it."""


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
    model_config: dict[str, Any] | None = None
    """What builds the trained model (runtime/pretrained.py): written as ``final/config.json`` beside the weights,
    with their sha256 and the lineage they came from, so the folder loads by itself."""

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


def make_optimizer(params: Iterable[torch.nn.Parameter], *, fused: bool, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam for every trained network: ``fused`` (one kernel for all parameters) on the GPU path
    (``OptimConfig.gpu_path_on``), torch's default implementation elsewhere, so CPU runs keep their bitwise results."""
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def make_accelerator(optim: OptimConfig, timeout_s: int) -> Accelerator:
    mixed = None if optim.mixed_precision == "no" else optim.mixed_precision  # None: honour launch flags
    return Accelerator(
        mixed_precision=mixed,
        kwargs_handlers=[
            # Bounded: if a rank dies, the others fail with an error instead of waiting forever.
            InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s)),
            # broadcast_buffers stays on (BatchNorm stats of the seed model); it is harmless for the EMA
            # codebook only because the quantizer all-reduces its statistics (see vqvae/quantizers/codebook.py).
            DistributedDataParallelKwargs(broadcast_buffers=True),
        ],
    )


def _any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag, true where any rank's is true: one all-reduce for all of them."""
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    t = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _sync_point(optim: OptimConfig, step: int) -> bool:
    """Steps after which ranks compare notes (non-finite loss, stop requests) and may log, evaluate or save;
    between them a step never waits for the device or the other ranks beyond DDP's own all-reduce."""
    return any(step % every == 0 for every in (optim.log_every, optim.eval_every, optim.checkpoint_every)) or (
        step == optim.max_steps)


def _first_bad(step: torch.Tensor, loss: torch.Tensor, accelerator: Accelerator) -> str:
    """'VALUE at step S' for the earliest non-finite loss on any rank (-1 where a rank saw none)."""
    pair = torch.stack([step.double(), loss.double()]).reshape(1, 2)
    rows = accelerator.gather(pair).reshape(-1, 2).tolist()
    first = min((r for r in rows if r[0] >= 0), key=lambda r: r[0])
    return f"{first[1]} at step {int(first[0])}"


def _note_world_change(state: TrainState, world: int, num_samples: int, resume_from: Path | None, stage: str,
                       main: bool) -> None:
    """Resuming with another number of processes continues the same epoch from the same sample position:
    no sample is repeated or skipped, but each step now takes another number of samples, so the weights
    differ from an uninterrupted run. Allowed, never silent: logged and recorded in the manifest."""
    saved = state.extra.get("world_size")
    if saved is not None and saved != world:
        state.extra.setdefault("world_size_changes", []).append(
            {"step": state.step, "from": saved, "to": world, "epoch": state.epoch, "position": state.position})
        if main:
            log.warning("%s: resuming %s (step %d) with %d processes instead of %d: epoch %d continues at sample "
                        "%d of %d, no sample repeated or skipped; each step now takes %d batches instead of %d "
                        "(recorded as world_size_changes in the manifest)", stage, resume_from, state.step, world,
                        saved, state.epoch, state.position, num_samples, world, saved)
    state.extra["world_size"] = world


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
    # On its device before its optimizer exists: fused Adam (CUDA) wants its parameters there.
    model = task.build_model().to(accelerator.device)
    gpu_path = optim.gpu_path_on(accelerator.device.type)
    if gpu_path:  # tensor-core convolutions want NHWC; batches arrive so (TrainData)
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), fused=gpu_path, lr=optim.lr, weight_decay=optim.weight_decay)
    # Built after the model, so the model's initial weights are the same with or without a critic.
    critic = build_critic() if (build_critic := getattr(task, "build_critic", None)) else None
    critic_net, critic_opt = None, None
    if critic is not None:
        critic_opt = make_optimizer(critic.module.to(accelerator.device).parameters(), fused=gpu_path,
                                    lr=critic.lr, betas=critic.betas)
    ckpt_dir = plan.out_dir / "checkpoints"

    state = TrainState(config_digest=plan.run.identity)
    resume_from = latest_checkpoint(ckpt_dir) if plan.resume == "auto" else (
        None if plan.resume == "none" else Path(plan.resume))
    if resume_from is not None:
        # Refuses a checkpoint of another identity (a CheckpointError: one line, exit 2) before loading it.
        state = load_checkpoint(resume_from, model, optimizer, identity=plan.run.identity,
                                critic=None if critic is None else (critic.module, critic_opt))
        if accelerator.is_main_process:
            log.info("resumed from %s (step %d)", resume_from, state.step)
    model, optimizer = accelerator.prepare(model, optimizer)
    if critic is not None:  # critic_net: DDP-wrapped under several processes; critic.module stays the plain one
        critic_net, critic_opt = accelerator.prepare(critic.module, critic_opt)
    world, rank = accelerator.num_processes, accelerator.process_index
    num_samples = plan.data.num_samples
    _note_world_change(state, world, num_samples, resume_from, task.stage, accelerator.is_main_process)
    if accelerator.is_main_process:
        log.info("%s: %d processes (%s), %d steps/epoch, training to step %d (from epoch %d, sample %d of %d)",
                 task.stage, world, accelerator.distributed_type, plan.data.steps_per_epoch(world),
                 optim.max_steps, state.epoch, state.position, num_samples)

    logger = RunLogger(plan.out_dir, task.stage, cfg.model_dump(mode="json"),
                       enabled=accelerator.is_main_process, wandb_mode=cfg.wandb, resume_step=state.step)
    bar = tqdm(total=optim.max_steps, initial=state.step, disable=not accelerator.is_main_process,
               desc=task.stage, dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)

    def checkpoint() -> None:
        if accelerator.is_main_process:
            save_checkpoint(ckpt_dir, accelerator.unwrap_model(model), optimizer, state,
                            keep=plan.keep_checkpoints, critic=None if critic is None else (critic.module, critic_opt))
        accelerator.wait_for_everyone()

    # Throughput since the previous log row (not since start: loader start-up and evaluations would
    # drag a running average down).
    images_seen, bad_samples, t_log, exit_status = 0, 0, time.perf_counter(), 0
    # The first non-finite loss (step, value), kept on the device: checked at sync points only, so a step
    # never waits for the GPU; weights it spoiled are never evaluated or checkpointed.
    bad_step = torch.full((), -1, dtype=torch.long, device=accelerator.device)
    bad_loss = torch.zeros((), device=accelerator.device)
    # One loader (and its workers) for the whole run: it streams epoch after epoch from the saved position.
    # Nothing to read when the checkpoint of the last step is resumed: only the outputs remain to be written.
    loader = plan.data.loader(epoch=state.epoch, position=state.position, rank=rank, world_size=world) if (
        state.step < optim.max_steps) else ()
    for batch in loader:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(optim, state.step)
        model.train()
        epoch, after = batch.pop("epoch"), batch.pop("position")
        state.epoch, state.position = (epoch, after) if after < num_samples else (epoch + 1, 0)
        batch = plan.data.to_device(batch, accelerator.device)
        with accelerator.autocast():
            loss, extras = task.loss(model, batch)
            if adversarial := critic is not None and state.step >= critic.start_step:
                loss, extras = task.adversarial_loss(accelerator.unwrap_model(model), critic.module, loss, extras,
                                                     state.step)
                critic_loss, critic_extras = task.critic_loss(critic_net)
                extras = {**extras, **critic_extras}
                # Adds 0 to the model's loss, or the critic's loss when that is not finite: the one non-finite
                # check below then guards the critic's weights too.
                loss = loss + torch.where(torch.isfinite(critic_loss.detach()), 0.0, critic_loss.detach())
        finite = torch.isfinite(loss.detach())
        first = (bad_step < 0) & ~finite
        bad_step = torch.where(first, state.step, bad_step)
        bad_loss = torch.where(first, loss.detach().float(), bad_loss)
        _update(accelerator, model, optimizer, loss, optim.grad_clip)
        if adversarial:  # after the model: its adversarial term saw the critic of the previous step
            for group in critic_opt.param_groups:
                group["lr"] = learning_rate(optim, state.step) * critic.lr / optim.lr
            _update(accelerator, critic_net, critic_opt, critic_loss, optim.grad_clip)
        state.step += 1
        images_seen += len(batch["label"]) * world
        bad_samples += len(batch.get("dropped", ()))
        bar.update(1)
        if not _sync_point(optim, state.step):
            continue

        stopping, diverged = _any_rank([stop.requested, bool(bad_step >= 0)], accelerator.device)
        if diverged:
            bar.close()  # the error message gets a line of its own
            raise NonFiniteLossError(
                f"{task.stage}: loss became {_first_bad(bad_step, bad_loss, accelerator)} on at least one rank; "
                f"no weights after it were saved. Last good checkpoint: {latest_checkpoint(ckpt_dir) or 'none'}. "
                f"Try a lower learning rate ({task.stage}_train.lr={optim.lr}"
                f"{'' if critic is None else ', or the critic: vqvae_train.adversarial.lr / .weight'}) or grad_clip.")
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
        if state.step % optim.checkpoint_every == 0 or state.step == optim.max_steps or stopping:
            checkpoint()
        if stopping:
            exit_status = stop.exit_status
            if accelerator.is_main_process:
                log.warning("stop requested (%s): checkpoint at step %d saved, exiting %d (%s)",
                            stop.received or "signal on another rank", state.step, exit_status, stop.meaning)
            break
        if state.step >= optim.max_steps:
            break
    bar.close()

    if exit_status == 0:
        _adopt_rank0_batchnorm_stats(accelerator.unwrap_model(model), accelerator)
        digests = _rank_digests(accelerator.unwrap_model(model), accelerator)
        critic_digests = [] if critic is None else _rank_digests(critic.module, accelerator)
        for what, found in (("weights", digests), ("critic weights", critic_digests)):
            if len(set(found)) > 1:
                raise RuntimeError(f"{task.stage}: ranks ended with different {what} {found}; DDP is broken")
        nodes = _rank_nodes(accelerator)  # a collective: every rank takes part
        if accelerator.is_main_process:
            _write_stage_outputs(accelerator.unwrap_model(model), plan, task.stage, state, {
                "world_size": world, "distributed_type": str(accelerator.distributed_type).split(".")[-1],
                "rank_state_digests": digests, **({"rank_critic_digests": critic_digests} if critic else {}),
                "nodes": nodes,
                "world_size_changes": state.extra.get("world_size_changes", [])})
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exit_status


def _update(accelerator: Accelerator, net: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
            grad_clip: float) -> None:
    accelerator.backward(loss)
    if grad_clip:
        accelerator.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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


def _adopt_rank0_batchnorm_stats(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """BatchNorm running statistics (the seed model's) from rank 0 on every rank. DDP copies rank 0's buffers
    at the start of each forward, but the last forward then updates each rank's from its own batch, so the
    ranks would end with different statistics (and fail the digest check below). Only these: every other
    buffer must already agree, and the digest check is there to catch one that does not."""
    if accelerator.num_processes == 1:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)


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
    if plan.model_config is not None:
        lineage = {**plan.run.lineage, stage: token({"identity": plan.run.identity, "content": content_digest(sha)})}
        write_model_config(weights.parent, {**plan.model_config, "lineage": lineage})
    trained_on = [os.path.relpath(split, plan.config.run_dir) for split in plan.data.train_splits]
    plan.run.finish(sha, {"steps": state.step, "weights": str(weights.relative_to(plan.out_dir)),
                          "weights_sha256": sha, "trained_on": trained_on, **plan.manifest_extras, **distributed})
