"""Checkpoints: atomic, verified, pickle-free."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from runtime.checkpoint import (
    CheckpointError,
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    save_checkpoint(tmp_path, model, optimizer, TrainState(step=7, epoch=1, position=40, config_digest="abc"))
    expected_draw = torch.rand(3)

    other, other_opt = _model_and_optimizer(1)
    state = load_checkpoint(latest_checkpoint(tmp_path), other, other_opt)
    assert (state.step, state.epoch, state.position, state.config_digest) == (7, 1, 40, "abc")
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_draw)  # RNG continues exactly where it was saved


def test_only_newest_are_kept_and_temporaries_are_never_listed(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    for step in range(1, 6):
        save_checkpoint(tmp_path, model, optimizer, TrainState(step=step), keep=2)
    (tmp_path / "step-00000009.tmp-abc").mkdir()  # what a kill during a write leaves behind
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    assert latest_checkpoint(tmp_path).name == "step-00000005"


def test_damaged_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    save_checkpoint(tmp_path, model, optimizer, TrainState(step=1))
    newest = save_checkpoint(tmp_path, model, optimizer, TrainState(step=2))
    with open(newest / "model.safetensors", "r+b") as fh:
        fh.seek(os.path.getsize(newest / "model.safetensors") // 2)
        fh.write(b"\xff\xff\xff\xff")
    assert latest_checkpoint(tmp_path).name == "step-00000001"


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_payload_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model, optimizer = _model_and_optimizer(0)
    path = save_checkpoint(tmp_path / "ckpt", model, optimizer, TrainState(step=3))
    torch.save({"state": {}, "param_groups": [], "evil": _Payload()}, path / "optimizer.pt")
    meta = json.loads((path / "state.json").read_text())
    from runtime.files import sha256_file

    meta["sha256"]["optimizer.pt"] = sha256_file(path / "optimizer.pt")  # a consistent, malicious checkpoint
    (path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path, *_model_and_optimizer(1))
    assert not (tmp_path / "PWNED").exists()
