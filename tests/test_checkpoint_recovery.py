"""Fault injection, checkpoints from elsewhere or damaged on disk, seen through the real training CLI.

- A checkpoint whose optimizer.pt / rng.pt carries a pickle payload (an object whose ``__reduce__`` would
  create a marker file), with a state.json made consistent with it: training refuses it (exit 2, one-line
  error) and the payload never runs, whether found by ``--resume auto`` or named with ``--resume DIR``.
- A damaged newest checkpoint (bytes flipped, truncated, state.json missing): skipped with a warning,
  the previous one is used, and the final weights are bitwise those of an undamaged run.

Unit-level versions (save/load in-process) are in tests/test_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_config

from runtime.files import sha256_file

EXTRA = ["vqvae_train.max_steps=20", "vqvae_train.checkpoint_every=5", "vqvae_train.eval_every=100"]


class _Payload:
    """Unpickling this creates ``marker`` (through builtins.open, so no test code needs importing)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """One complete, undamaged run (checkpoints at steps 10, 15, 20 kept)."""
    run_dir = tmp_path_factory.mktemp("faults-ckpt") / "ref"
    tiny_config(run_dir, *EXTRA)
    (run_dir / "data").symlink_to(tiny_data, target_is_directory=True)
    result = run_cli("vqvae/train.py", "--config", run_dir / "config.json")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _unfinished_copy(finished: Path, dest: Path, keep_up_to: int) -> Path:
    """The finished run as if it had been stopped after step ``keep_up_to``."""
    shutil.copytree(finished, dest, symlinks=True)
    tiny_config(dest, *EXTRA)  # same settings, run_dir pointing at the copy
    (dest / "vqvae" / "manifest.json").unlink()
    shutil.rmtree(dest / "vqvae" / "final")
    for ckpt in (dest / "vqvae" / "checkpoints").iterdir():
        if int(ckpt.name[5:]) > keep_up_to:
            shutil.rmtree(ckpt)
    return dest


def _weights_sha(run_dir: Path) -> str:
    return json.loads((run_dir / "vqvae" / "manifest.json").read_text())["weights_sha256"]


def _plant_payload(ckpt: Path, name: str, marker: Path) -> None:
    """Replace ``name`` by a pickle payload and make state.json agree with it (a consistent, hostile checkpoint)."""
    original = torch.load(ckpt / name, weights_only=True)
    if name == "optimizer.pt":
        original["state"][0]["evil"] = _Payload(marker)
    else:
        original["evil"] = _Payload(marker)
    torch.save(original, ckpt / name)
    meta = json.loads((ckpt / "state.json").read_text())
    meta["sha256"][name] = sha256_file(ckpt / name)
    (ckpt / "state.json").write_text(json.dumps(meta))


def test_the_payload_is_real(tmp_path):
    """Control: plain unpickling (what an unsafe load does) DOES run the payload, so the refusals below
    are what keep it from running."""
    marker = tmp_path / "RAN"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize(("name", "how"), [("optimizer.pt", "auto"), ("rng.pt", "auto"), ("optimizer.pt", "dir")])
@pytest.mark.slow
def test_checkpoint_with_pickle_payload_is_refused_and_never_runs(tmp_path, finished, name, how):
    run_dir = _unfinished_copy(finished, tmp_path / "run", keep_up_to=15)
    ckpt = run_dir / "vqvae" / "checkpoints" / "step-00000015"
    marker = tmp_path / "PAYLOAD_RAN"
    _plant_payload(ckpt, name, marker)
    before = sorted(p.relative_to(run_dir) for p in (run_dir / "vqvae").rglob("*"))
    resume = ["--resume", str(ckpt)] if how == "dir" else []
    result = run_cli("vqvae/train.py", "--config", run_dir / "config.json", *resume)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"error: {ckpt}: refusing to load (not a plain tensor checkpoint)" in result.stderr
    assert not marker.exists(), "the pickle payload ran"
    assert sorted(p.relative_to(run_dir) for p in (run_dir / "vqvae").rglob("*")) == before, "work was done"


@pytest.mark.parametrize("damage", ["flipped", "truncated", "no_state"])
@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, finished, damage):
    run_dir = _unfinished_copy(finished, tmp_path / "run", keep_up_to=15)
    newest = run_dir / "vqvae" / "checkpoints" / "step-00000015"
    weights = newest / "model.safetensors"
    if damage == "flipped":
        with open(weights, "r+b") as fh:
            fh.seek(os.path.getsize(weights) // 2)
            fh.write(b"\x00\xff\x00\xff")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (newest / "state.json").unlink()
    result = run_cli("vqvae/train.py", "--config", run_dir / "config.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping damaged checkpoint" in result.stderr and "step-00000015" in result.stderr
    assert "resumed from" in result.stderr and "step-00000010 (step 10)" in result.stderr
    assert _weights_sha(run_dir) == _weights_sha(finished)


@pytest.mark.slow
def test_all_checkpoints_damaged_starts_over_and_still_matches(tmp_path, finished):
    """Nothing usable left: training starts from step 0 (with a warning per checkpoint), never from garbage."""
    run_dir = _unfinished_copy(finished, tmp_path / "run", keep_up_to=15)
    for ckpt in (run_dir / "vqvae" / "checkpoints").iterdir():
        (ckpt / "rng.pt").write_bytes(b"garbage")
    result = run_cli("vqvae/train.py", "--config", run_dir / "config.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("skipping damaged checkpoint") == 2 and "resumed from" not in result.stderr
    assert _weights_sha(run_dir) == _weights_sha(finished)


@pytest.mark.slow
def test_checkpoint_of_another_configuration_is_refused_not_resumed(tmp_path, finished):
    """The same run dir trained again with a setting that changes the weights: never mixed, nothing touched,
    exit 2 (the pipeline would keep the old outputs in .history/ and start afresh)."""
    run_dir = _unfinished_copy(finished, tmp_path / "run", keep_up_to=15)
    tiny_config(run_dir, *EXTRA, "vqvae_train.lr=0.003")
    result = run_cli("vqvae/train.py", "--config", run_dir / "config.json")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "holds vqvae outputs of another configuration" in result.stderr
    assert "nothing was changed" in result.stderr and "RUN_DIR/.history/" in result.stderr
    assert not (run_dir / "vqvae" / "manifest.json").exists()
