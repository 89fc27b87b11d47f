"""Recorded files are verified before they are trusted (runtime/integrity.py): a path a manifest records stays
inside its stage folder, and its bytes are the ones whose sha256 the producer recorded (issue 28, principle 3)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import FinishedRun, assert_ok, copy_run, run_pipeline

from runtime.config import RunConfig, load_config
from runtime.integrity import IntegrityError, recorded_problems, stage_weights, verified_file
from runtime.lineage import LineageError, begin_stage
from runtime.stages import STAGE_NAMES, RunLayout


def _stage(tmp_path: Path, payload: bytes = b"weights") -> tuple[Path, dict]:
    folder = tmp_path / "vqvae"
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "model.safetensors").write_bytes(payload)
    manifest = {"weights": "final/model.safetensors", "weights_sha256": hashlib.sha256(payload).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, manifest


def test_intact_weights_pass(tmp_path: Path) -> None:
    folder, manifest = _stage(tmp_path)
    assert stage_weights(folder, manifest) == folder / "final" / "model.safetensors"
    assert recorded_problems(folder, manifest) == []


def test_replaced_weights_refused(tmp_path: Path) -> None:
    folder, manifest = _stage(tmp_path)
    (folder / "final" / "model.safetensors").write_bytes(b"a checkpoint copied over")
    with pytest.raises(IntegrityError, match="sha256 differs from the one"):
        stage_weights(folder, manifest)
    assert recorded_problems(folder, manifest)


def test_missing_weights_refused(tmp_path: Path) -> None:
    folder, manifest = _stage(tmp_path)
    (folder / "final" / "model.safetensors").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        stage_weights(folder, manifest)


@pytest.mark.parametrize("recorded", ["../other/model.safetensors", "/etc/passwd", "final/../../x", "", None, 7,
                                      "final\\..\\x"])
def test_recorded_path_outside_folder_refused(tmp_path: Path, recorded: object) -> None:
    folder, manifest = _stage(tmp_path)
    with pytest.raises(IntegrityError, match=r"refusing to follow|not a relative path"):
        verified_file(folder, recorded, manifest["weights_sha256"], manifest=folder / "manifest.json")


def test_recorded_symlink_leaving_folder_refused(tmp_path: Path) -> None:
    folder, manifest = _stage(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"weights")  # the same bytes: the place alone is refused
    (folder / "final" / "link.safetensors").symlink_to(outside)
    with pytest.raises(IntegrityError, match="outside"):
        verified_file(folder, "final/link.safetensors", manifest["weights_sha256"], manifest=folder / "manifest.json")


def test_missing_sha_refused(tmp_path: Path) -> None:
    folder, manifest = _stage(tmp_path)
    with pytest.raises(IntegrityError, match="no recorded sha256"):
        verified_file(folder, manifest["weights"], None, manifest=folder / "manifest.json")


def test_split_shards_checked(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "shard-000000.tar").write_bytes(b"tar")
    (folder / "train" / "manifest.json").write_text(json.dumps(
        {"shards": [{"name": "shard-000000.tar", "sha256": hashlib.sha256(b"tar").hexdigest()}]}))
    manifest = {"splits": {"train": {}}}
    assert recorded_problems(folder, manifest) == []
    (folder / "train" / "shard-000000.tar").write_bytes(b"tampered")
    assert "sha256 differs" in recorded_problems(folder, manifest)[0]
    assert "refusing to follow" in recorded_problems(folder, {"splits": {"../x": {}}})[0]


# ----- the session's finished run (conftest ``finished_run``); each test below attacks its own copy -------------
@pytest.fixture
def run(finished_run: FinishedRun, tmp_path: Path) -> tuple[Path, RunConfig]:
    copy = copy_run(finished_run.run_dir, tmp_path / "run")
    return copy, load_config(copy / "config.json")


def _actions(cfg: RunConfig) -> dict[str, tuple[str, str]]:
    from launch.plan import make_plan

    return {s.stage.name: (s.action, s.reason) for s in make_plan(cfg, list(STAGE_NAMES), set())}


def _edit_manifest(folder: Path, **changes: object) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, **changes}))


@pytest.mark.slow
def test_intact_run_is_up_to_date(run: tuple[Path, RunConfig]) -> None:
    actions = _actions(run[1])
    assert all(action == "skip" for name, (action, _) in actions.items() if name != "report"), actions


@pytest.mark.slow
def test_checkpoint_copied_over_final_weights_is_remade_and_refused_downstream(run: tuple[Path, RunConfig]) -> None:
    run_dir, cfg = run
    final = run_dir / "vqvae" / "final" / "model.safetensors"
    earliest = sorted((run_dir / "vqvae" / "checkpoints").glob("step-*"))[0]
    shutil.copyfile(earliest / "model.safetensors", final)
    actions = _actions(cfg)
    assert actions["vqvae"][0] == "run" and "changed after they were made" in actions["vqvae"][1], actions["vqvae"]
    assert all(actions[name][0] == "run" for name in ("encode", "prior", "sample", "evaluate"))
    with pytest.raises(LineageError, match="refusing to run on its input vqvae, which cannot be trusted"):
        begin_stage(cfg, "encode")


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["../prior/final/model.safetensors", "/etc/hostname", "final/../../config.json"])
def test_weights_path_outside_the_stage_folder_refused_by_every_consumer(run: tuple[Path, RunConfig],
                                                                         weights: str) -> None:
    run_dir, cfg = run
    _edit_manifest(run_dir / "vqvae", weights=weights)
    for consumer in ("encode", "sample", "evaluate"):
        with pytest.raises(LineageError, match="refusing to follow"):
            begin_stage(cfg, consumer)
    assert _actions(cfg)["vqvae"][0] == "run"
    with pytest.raises(IntegrityError):  # and the loader's own helper, whatever called it
        stage_weights(run_dir / "vqvae", json.loads((run_dir / "vqvae" / "manifest.json").read_text()))


@pytest.mark.slow
def test_tampered_sample_shard_refused_by_evaluate(run: tuple[Path, RunConfig]) -> None:
    run_dir, cfg = run
    shard = sorted((run_dir / "samples").glob("shard-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte inside a sample
    shard.write_bytes(bytes(data))
    with pytest.raises(LineageError, match="refusing to run on its input sample, which cannot be trusted"):
        begin_stage(cfg, "evaluate")


@pytest.mark.slow
def test_restore_from_history_verifies_what_it_restores(run: tuple[Path, RunConfig]) -> None:
    """Keep the prior aside (other settings), damage the kept weights, go back: re-made, not 'restored'."""
    run_dir, cfg = run
    from launch.plan import make_plan, prepare

    other = load_config(run_dir / "config.json", ["prior_train.lr=0.0037"])
    for step in make_plan(other, ["prior"], set()):
        prepare(RunLayout.of(other), step)  # moves the prior's outputs to .history/prior@IDENTITY
    kept = next((run_dir / ".history").glob("prior@*"))
    assert _actions(cfg)["prior"][0] == "restore"
    (kept / "final" / "model.safetensors").unlink()
    action, reason = _actions(cfg)["prior"]
    assert action == "run" and "cannot be restored" in reason and str(kept) in reason, reason


@pytest.mark.slow
def test_pipeline_remakes_tampered_weights_in_one_run(run: tuple[Path, RunConfig]) -> None:
    run_dir, _ = run
    final = run_dir / "prior" / "final" / "model.safetensors"
    final.write_bytes(final.read_bytes()[:-8] + b"\x00" * 8)
    result = assert_ok(run_pipeline(run_dir / "config.json", "--dry-run"))
    assert "[prior] run: its files changed after they were made" in result.stdout
    assert "[vqvae] skip" in result.stdout


@pytest.mark.slow
def test_report_reads_code_shards_only_as_recorded(run: tuple[Path, RunConfig]) -> None:
    from launch.report import write_report

    run_dir, cfg = run
    shard = sorted((run_dir / "codes" / "train").glob("shard-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (run_dir / "report" / "codebook-usage.png").unlink()  # made by the pipeline's report from intact shards
    write_report(cfg)
    assert not (run_dir / "report" / "codebook-usage.png").exists()
    assert json.loads((run_dir / "report" / "metrics.json").read_text())["codebook_train"] == {}
