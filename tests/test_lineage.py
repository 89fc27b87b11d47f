"""One lineage: the plan keeps or restores outputs by identity (--dry-run says what happens), --until/--from,
settings added at their old behaviour keep identities, and inputs of another lineage are refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_cli, run_pipeline, tiny_config

FAST_VQ = ["vqvae_train.max_steps=4", "vqvae_train.eval_every=100", "vqvae_train.checkpoint_every=2"]
FAST_PRIOR = ["prior_train.max_steps=4", "prior_train.eval_every=100", "prior_train.checkpoint_every=2"]


# ----- 7. a forgotten override: nothing deleted, dry run == real run, and the old outputs come back -------
def _actions(text: str, dry: bool) -> list[tuple[str, str]]:
    pattern = r"^\[(\w+)\] (\w+):" if dry else r"pipeline: stage (\w+): (skip|resume|restore|run):"
    return re.findall(pattern, text, flags=re.M)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A run through the prior (short trainings), data shared with the session's tiny shards."""
    run_dir = tmp_path_factory.mktemp("orchestration") / "run"
    run_dir.mkdir()
    (run_dir / "data").symlink_to(tiny_data, target_is_directory=True)
    tiny_config(run_dir, *FAST_VQ, *FAST_PRIOR)
    for stage in ("vqvae", "encode", "prior"):
        result = run_pipeline(str(run_dir / "config.json"), "--only", stage)
        assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_forgotten_override_keeps_the_old_outputs_and_dry_run_says_what_happens(trained: Path) -> None:
    config = str(trained / "config.json")
    weights = (trained / "vqvae" / "final" / "model.safetensors").read_bytes()
    lr = json.loads((trained / "config.json").read_text())["vqvae_train"]["lr"]
    # --until prior: the stages after it follow the same plan (test_pipeline_crash runs them after a change).
    dry = run_pipeline(config, f"vqvae_train.lr={lr * 2}", "--until", "prior", "--dry-run")
    real = run_pipeline(config, f"vqvae_train.lr={lr * 2}", "--until", "prior")
    assert dry.returncode == 0 and real.returncode == 0, real.stderr[-3000:]
    planned, done = _actions(dry.stdout, dry=True), _actions(real.stderr, dry=False)
    assert planned == done, f"dry run {planned} != real run {done}"
    assert dict(done)["vqvae"] == "run" and dict(done)["encode"] == "run" and dict(done)["data"] == "skip"
    assert f"vqvae_train.lr: {lr} -> {lr * 2}" in real.stderr
    kept = list((trained / ".history").glob("vqvae@*"))
    assert len(kept) == 1 and (kept[0] / "final" / "model.safetensors").read_bytes() == weights

    # Back to the original settings: the kept outputs are renamed back, nothing is retrained.
    dry = run_pipeline(config, f"vqvae_train.lr={lr}", "--until", "prior", "--dry-run")
    back = run_pipeline(config, f"vqvae_train.lr={lr}", "--until", "prior")
    assert back.returncode == 0, back.stderr[-3000:]
    assert _actions(dry.stdout, dry=True) == _actions(back.stderr, dry=False)
    assert ("vqvae", "restore") in _actions(back.stderr, dry=False)
    assert (trained / "vqvae" / "final" / "model.safetensors").read_bytes() == weights


@pytest.mark.slow
def test_until_stops_after_a_stage_and_combines_with_from(trained: Path) -> None:
    """``--until STAGE``: what STAGE needs and STAGE, up-to-date stages skipped, nothing after it is made."""
    config = str(trained / "config.json")
    def samples() -> dict[Path, int]:  # whatever an earlier test left there, by modification time
        return {path: path.stat().st_mtime_ns for path in (trained / "samples").rglob("*")}

    settings, made = (trained / "config.json").read_bytes(), samples()
    until = run_pipeline(config, "--until", "prior", "sample.per_class=3")
    (trained / "config.json").write_bytes(settings)  # the module's run keeps its settings for the other tests
    assert until.returncode == 0, until.stderr[-3000:]
    assert _actions(until.stderr, dry=False) == [(s, "skip") for s in ("data", "vqvae", "encode", "prior")]
    assert samples() == made  # a changed sample setting: not run
    assert "report:" not in until.stdout
    # A changed VQ-VAE setting: re-made up to the codes, the prior left as it is.
    lr = json.loads((trained / "config.json").read_text())["vqvae_train"]["lr"]
    dry = run_pipeline(config, f"vqvae_train.lr={lr * 3}", "--until", "encode", "--dry-run")
    assert _actions(dry.stdout, dry=True) == [("data", "skip"), ("vqvae", "run"), ("encode", "run")], dry.stdout
    dry = run_pipeline(config, "--from", "encode", "--until", "prior", "--dry-run")
    assert _actions(dry.stdout, dry=True) == [("encode", "run"), ("prior", "run")], dry.stdout
    assert_one_line_error(run_pipeline(config, "--from", "sample", "--until", "prior", "--dry-run"),
                          "--until prior stops before --from sample", alone=True)
    assert_one_line_error(run_pipeline(config, "--only", "vqvae", "--until", "prior", "--dry-run"),
                          "--until cannot be combined with --only", alone=True)


# ----- 8. one lineage -----------------------------------------------------------------------------------
# A vqvae identity fixed before vqvae_train.adversarial.ramp_steps existed (tiny config, no upstream): adding
# an option must not make outputs of the old behaviour stale, or every upgrade would retrain every stage.
IDENTITY_BEFORE_RAMP_STEPS = "d18fd603ad70cf20"


ENCODE_IDENTITY_BEFORE_TRAIN_VIEWS = "f68e0843571f6430"  # the smoke encode stage's, no upstream


def test_an_added_setting_at_its_old_behaviour_keeps_the_identity() -> None:
    from runtime.config import build_config
    from runtime.lineage import identity, settings

    assert identity(build_config("smoke", []), "vqvae", {}) == IDENTITY_BEFORE_RAMP_STEPS
    ramped = build_config("smoke", ["vqvae_train.adversarial.ramp_steps=5"])
    assert identity(ramped, "vqvae", {}) != IDENTITY_BEFORE_RAMP_STEPS  # another value: another output
    assert settings(ramped, "vqvae")["vqvae_train.adversarial"]["ramp_steps"] == 5
    assert identity(build_config("smoke", []), "encode", {}) == ENCODE_IDENTITY_BEFORE_TRAIN_VIEWS
    assert identity(build_config("smoke", ["encode.train_views=8"]), "encode", {}) != ENCODE_IDENTITY_BEFORE_TRAIN_VIEWS


@pytest.mark.slow
def test_code_shards_of_another_vqvae_are_refused(trained: Path, tmp_path: Path, tiny_data: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "data").symlink_to(tiny_data, target_is_directory=True)
    tiny_config(other, *FAST_VQ, *FAST_PRIOR, "vqvae_train.seed=7")
    for stage in ("vqvae", "encode"):
        assert run_pipeline(str(other / "config.json"), "--only", stage).returncode == 0
    shutil.rmtree(other / "codes")
    shutil.copytree(trained / "codes", other / "codes")  # codes of the other VQ-VAE, copied in
    result = run_cli("prior/train.py", "--config", str(other / "config.json"))
    assert_one_line_error(result, "its inputs were made from vqvae", f"{other / 'vqvae'} holds vqvae", alone=True)
    assert not (other / "prior").exists()


@pytest.mark.slow
def test_array_tasks_of_two_configs_never_complete_a_stage(trained: Path) -> None:
    config = str(trained / "config.json")
    shutil.rmtree(trained / "samples", ignore_errors=True)
    first = run_cli("prior/sample.py", "--config", config, "--shard-index", "0", "--num-shards", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    other = run_cli("prior/sample.py", "--config", config, "sample.temperature=0.5",
                    "--shard-index", "1", "--num-shards", "2")
    assert_one_line_error(other, "holds sample outputs of another configuration", alone=True)
    assert not (trained / "samples" / "manifest.json").exists()
    assert not (trained / "samples" / "shard-000001.tar").exists()


@pytest.mark.slow
def test_manifest_without_lineage_is_refused_not_trusted(tmp_path: Path, tiny_data: Path) -> None:
    run_dir = tmp_path / "run"
    tiny_config(run_dir)
    shutil.copytree(tiny_data, run_dir / "data")
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    del manifest["identity"]  # as an older lesion-vq wrote it
    (run_dir / "data" / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("vqvae/train.py", "--config", str(run_dir / "config.json"))
    assert_one_line_error(result, "lacks identity", "older lesion-vq", alone=True)
    assert not (run_dir / "vqvae").exists()
