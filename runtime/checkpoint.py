"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory ``checkpoints/step-00000123/`` holding

- ``model.safetensors``: model weights and buffers (safetensors: no code can hide in it),
- ``optimizer.pt``: optimizer state, tensors and plain containers only (loaded with ``weights_only=True``),
- ``rng.pt``: torch RNG state (same rules),
- ``critic.safetensors`` and ``critic_optimizer.pt``: only for a training with a critic (the VQ-VAE's GAN
  discriminator), the same formats as the two above,
- ``state.json``: step, epoch, position in the epoch, config digest and the sha256 of every file above.

It is written under a temporary directory name and renamed in one ``os.replace``, so a kill at any
moment leaves either a complete checkpoint or a ``*.tmp-*`` directory that is never read. Loading
re-hashes the files, so a checkpoint damaged after the fact is skipped in favour of the previous one.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from runtime.errors import UserError
from runtime.files import DIR_MODE, TMP_MARK, atomic_path, fsync_dir, naming, sha256_file
from runtime.log import get_logger

log = get_logger(__name__)

STEP_PREFIX = "step-"
_FILES = ("model.safetensors", "optimizer.pt", "rng.pt")
_CRITIC_FILES = ("critic.safetensors", "critic_optimizer.pt")

Trained = tuple[torch.nn.Module, torch.optim.Optimizer]
"""A network and its optimizer (the critic of an adversarial training)."""


class CheckpointError(UserError):
    pass


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    position: int = 0
    """Samples of ``epoch`` consumed by all ranks together: where the data resumes, whatever the world size."""
    config_digest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (e.g. tied weights, views).
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Weights alone (for encode / sample), atomically, byte-for-byte reproducible.

    ``metadata`` is stored as ONE safetensors metadata entry ``lesion_vq`` (sorted JSON): safetensors
    writes its metadata map in hash order, so several entries would make identical weights give files
    (and ``weights_sha256``) that differ from process to process."""
    packed = {"lesion_vq": json.dumps(metadata, sort_keys=True)} if metadata else None
    data = safetensors_bytes(_model_tensors(model), metadata=packed)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for damaged files
        raise CheckpointError(f"cannot read weights {path}: {err}") from err
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"weights {path} do not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]} (was it trained with another config?)"
        )


def _write(path: Path, data: bytes, shown: Path) -> None:
    """Serialised in memory first, then one plain write: a full disk then raises OSError(ENOSPC) naming
    ``shown``, where torch.save / safetensors would raise ``unexpected pos N vs M`` or a SafetensorError."""
    with naming(shown):
        path.write_bytes(data)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_rng_json() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _restore_rng(tensors: dict[str, Any], py: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    version, internal, gauss = py["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = py["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState, keep: int = 3, critic: Trained | None = None) -> Path:
    """Write ``directory/step-XXXXXXXX`` atomically and prune all but the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{STEP_PREFIX}{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}{TMP_MARK}", dir=directory))
    try:
        os.chmod(tmp, DIR_MODE)  # mkdtemp makes it 0o700; the renamed checkpoint must honour the umask
        _write(tmp / "model.safetensors", safetensors_bytes(_model_tensors(model)), final / "model.safetensors")
        _write(tmp / "optimizer.pt", _torch_bytes(optimizer.state_dict()), final / "optimizer.pt")
        _write(tmp / "rng.pt", _torch_bytes(_rng_state()), final / "rng.pt")
        if critic is not None:
            _write(tmp / "critic.safetensors", safetensors_bytes(_model_tensors(critic[0])),
                   final / "critic.safetensors")
            _write(tmp / "critic_optimizer.pt", _torch_bytes(critic[1].state_dict()), final / "critic_optimizer.pt")
        names = _FILES + (_CRITIC_FILES if critic is not None else ())
        meta = asdict(state) | {"rng_python": _python_rng_json(),
                                "sha256": {name: sha256_file(tmp / name) for name in names}}
        _write(tmp / "state.json", json.dumps(meta, indent=1).encode(), final / "state.json")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # same step saved twice (e.g. signal right after a periodic save)
            _discard(final)
        os.replace(tmp, final)
        fsync_dir(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(directory)[:-keep]:
        _discard(old)
    for stale in directory.glob(f"{STEP_PREFIX}*{TMP_MARK}*"):  # left by a writer killed mid-way; never read
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _discard(path: Path) -> None:
    """Delete a checkpoint dir; renamed to a temporary name first, so a kill during the deletion never
    leaves a half-deleted directory that is still listed as a checkpoint."""
    doomed = Path(tempfile.mkdtemp(prefix=f"{path.name}{TMP_MARK}deleting-", dir=path.parent))
    os.replace(path, doomed)  # onto the new empty directory: atomic
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete-looking checkpoint dirs, oldest first (temporary dirs are never listed)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir()
             if p.is_dir() and p.name.startswith(STEP_PREFIX) and TMP_MARK not in p.name
             and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Return its state.json if every file is present and matches its recorded sha256."""
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path}: state.json missing")
    meta = json.loads(state_file.read_text())
    # The critic's files are checked whenever state.json records them (only those names: never a path
    # taken from the file).
    for name in _FILES + tuple(n for n in _CRITIC_FILES if n in meta["sha256"]):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: {name} missing")
        if sha256_file(path / name) != meta["sha256"][name]:
            raise CheckpointError(f"{path}: {name} does not match its recorded sha256 (damaged)")
    return meta


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
            return path
        except (CheckpointError, json.JSONDecodeError, KeyError) as err:
            log.warning("skipping damaged checkpoint: %s", err)
    return None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    critic: Trained | None = None, identity: str | None = None) -> TrainState:
    """Restore weights, optimizer state(s) and RNG. ``identity``: refuse a checkpoint of another configuration
    before anything is loaded (that is also what refuses to mix a run with a critic and one without)."""
    meta = verify_checkpoint(path)
    if identity is not None and meta["config_digest"] != identity:
        raise CheckpointError(
            f"checkpoint {path} belongs to another configuration or input data "
            f"(identity {meta['config_digest']} != {identity}); use a new run_dir or --resume none")
    if all(name in meta["sha256"] for name in _CRITIC_FILES) != (critic is not None):
        has = "has a critic (adversarial training)" if critic is None else "has no critic (adversarial training)"
        raise CheckpointError(f"{path} {has}, unlike this training; use a new run_dir or --resume none")
    load_weights(model, path / "model.safetensors")
    if critic is not None:
        load_weights(critic[0], path / "critic.safetensors")
    try:
        # weights_only=True: a checkpoint carrying a pickled object (code) is refused, never run.
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        if critic is not None:
            critic[1].load_state_dict(torch.load(path / "critic_optimizer.pt", map_location="cpu", weights_only=True))
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: refusing to load (not a plain tensor checkpoint): {err}") from err
    _restore_rng(rng, meta["rng_python"])
    if "position" not in meta:
        raise CheckpointError(f"{path} was written by an older lesion-vq (no data position); start afresh with "
                              "--resume none or a new run_dir")
    return TrainState(step=meta["step"], epoch=meta["epoch"], position=meta["position"],
                      config_digest=meta["config_digest"], extra=meta.get("extra", {}))
