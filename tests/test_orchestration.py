"""Orchestration must never destroy what it did not create, keep one lineage, and leave no orphans.

One test per way the pipeline used to lose data or mix runs (README, "Faults", orchestration rows):
pack over its own inputs, a run_dir holding user files or the repository, a copied run directory,
a forgotten override, code shards of another VQ-VAE, array tasks of two configs, a pipeline killed
or interrupted while training, and two trainers on one folder.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import REPO, TINY, stage_env, tiny_config

from shards.synth import render_lesion

PIPELINE = [sys.executable, "launch/pipeline.py"]
FAST_VQ = ["vqvae_train.max_steps=4", "vqvae_train.eval_every=100", "vqvae_train.checkpoint_every=2"]
FAST_PRIOR = ["prior_train.max_steps=4", "prior_train.eval_every=100", "prior_train.checkpoint_every=2"]


def _cli(*argv: str, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)


def _refused(result: subprocess.CompletedProcess[str], *needles: str, alone: bool = True) -> None:
    """Exit 2, one error line naming the problem (``alone``: and nothing else on stderr), no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and lines and lines[-1].startswith("error: "), result.stderr
    assert len(lines) == 1 or not alone, result.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _images(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(render_lesion(i, i % 7, 40)).save(folder / f"img_{i:03d}.jpg", "JPEG", quality=90)


# ----- 1. never destroy the inputs ---------------------------------------------------------------------
@pytest.mark.slow
def test_pack_into_the_folder_holding_its_inputs_is_refused_and_deletes_nothing(tmp_path: Path) -> None:
    ds = tmp_path / "DS"
    _images(ds / "train", 8)
    (ds / "meta.csv").write_text("image_id,dx\n" + "".join(f"img_{i:03d},nv\n" for i in range(8)))
    before = _tree(ds)
    result = _cli(sys.executable, "-m", "shards", "pack", "--images", str(ds / "train"), "--csv",
                  str(ds / "meta.csv"), "--out", str(ds))
    _refused(result, "contains the input images")
    assert _tree(ds) == before


@pytest.mark.slow
def test_pack_into_a_folder_of_foreign_files_is_refused(tmp_path: Path) -> None:
    _images(tmp_path / "images", 4)
    (tmp_path / "meta.csv").write_text("image_id,dx\n" + "".join(f"img_{i:03d},nv\n" for i in range(4)))
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "notes.txt").write_text("mine")
    result = _cli(sys.executable, "-m", "shards", "pack", "--images", str(tmp_path / "images"), "--csv",
                  str(tmp_path / "meta.csv"), "--out", str(out))
    _refused(result, "lesion-vq did not create", "nothing was changed")
    assert (out / "train" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_packing_that_yields_no_image_exits_non_zero_and_writes_no_manifest(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"img_{i}.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "meta.csv").write_text("image_id,dx\nimg_0,nv\nimg_1,mel\nimg_2,bcc\n")
    result = _cli(sys.executable, "-m", "shards", "pack", "--images", str(images), "--csv",
                  str(tmp_path / "meta.csv"), "--out", str(tmp_path / "out"))
    _refused(result, "no image could be packed", alone=False)  # after one warning per skipped image
    assert not (tmp_path / "out" / "manifest.json").exists()


# ----- 2./3. a run_dir with user files, or the repository -------------------------------------------------
@pytest.mark.slow
def test_run_dir_with_user_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    run_dir = tmp_path / "R"
    (run_dir / "data" / "raw").mkdir(parents=True)
    (run_dir / "data" / "raw" / "keep").write_text("precious")
    result = _cli(*PIPELINE, *TINY, f"run_dir={run_dir}", "--only", "data")
    _refused(result, "lesion-vq did not create", "nothing was changed")
    assert (run_dir / "data" / "raw" / "keep").read_text() == "precious"


@pytest.mark.slow
def test_run_dir_holding_the_input_images_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "R"
    _images(run_dir / "data" / "isic", 4)
    before = _tree(run_dir)
    result = _cli(*PIPELINE, *TINY, f"run_dir={run_dir}", "data.source=isic",
                  f"data.isic_images={run_dir / 'data' / 'isic'}")
    _refused(result, "contains the input images")
    assert _tree(run_dir) == before


@pytest.mark.slow
def test_run_dir_that_is_a_clone_of_the_repository_is_refused(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    result = _cli(sys.executable, "launch/pipeline.py", *TINY, "run_dir=.", cwd=clone)
    _refused(result, "contains the lesion-vq repository")
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout
    assert [line for line in status.splitlines() if "__pycache__" not in line] == [], status


# ----- 4. a copied run directory works on the copy ---------------------------------------------------------
@pytest.mark.slow
def test_copied_run_directory_is_run_where_its_config_lives(tmp_path: Path) -> None:
    base = tmp_path / "runs" / "base"
    tiny_config(base)
    assert _cli(*PIPELINE, "--config", str(base / "config.json"), "--only", "data").returncode == 0
    before = _tree(base)
    copy = tmp_path / "runs" / "copyA"
    shutil.copytree(base, copy, symlinks=True)
    result = _cli(*PIPELINE, "--config", str(copy / "config.json"), "--only", "data")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _tree(base) == before, "the run the copy came from was changed"
    assert json.loads((copy / "config.json").read_text())["run_dir"] == str(copy)
    assert list((copy / ".history").glob("data@*")), "the forced stage's old outputs must be kept in the copy"


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
        result = _cli(*PIPELINE, "--config", str(run_dir / "config.json"), "--only", stage)
        assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_forgotten_override_keeps_the_old_outputs_and_dry_run_says_what_happens(trained: Path) -> None:
    config = str(trained / "config.json")
    weights = (trained / "vqvae" / "final" / "model.safetensors").read_bytes()
    lr = json.loads((trained / "config.json").read_text())["vqvae_train"]["lr"]
    dry = _cli(*PIPELINE, "--config", config, f"vqvae_train.lr={lr * 2}", "--dry-run")
    real = _cli(*PIPELINE, "--config", config, f"vqvae_train.lr={lr * 2}")
    assert dry.returncode == 0 and real.returncode == 0, real.stderr[-3000:]
    planned, done = _actions(dry.stdout, dry=True), _actions(real.stderr, dry=False)
    assert planned == done, f"dry run {planned} != real run {done}"
    assert dict(done)["vqvae"] == "run" and dict(done)["encode"] == "run" and dict(done)["data"] == "skip"
    assert f"vqvae_train.lr: {lr} -> {lr * 2}" in real.stderr
    kept = list((trained / ".history").glob("vqvae@*"))
    assert len(kept) == 1 and (kept[0] / "final" / "model.safetensors").read_bytes() == weights

    # Back to the original settings: the kept outputs are renamed back, nothing is retrained.
    dry = _cli(*PIPELINE, "--config", config, f"vqvae_train.lr={lr}", "--dry-run")
    back = _cli(*PIPELINE, "--config", config, f"vqvae_train.lr={lr}")
    assert back.returncode == 0, back.stderr[-3000:]
    assert _actions(dry.stdout, dry=True) == _actions(back.stderr, dry=False)
    assert ("vqvae", "restore") in _actions(back.stderr, dry=False)
    assert (trained / "vqvae" / "final" / "model.safetensors").read_bytes() == weights


@pytest.mark.slow
def test_until_stops_after_a_stage_and_combines_with_from(trained: Path) -> None:
    """``--until STAGE``: what STAGE needs and STAGE, up-to-date stages skipped, nothing after it is made."""
    config = str(trained / "config.json")
    settings, samples = (trained / "config.json").read_bytes(), (trained / "samples" / "manifest.json").read_bytes()
    until = _cli(*PIPELINE, "--config", config, "--until", "prior", "sample.per_class=3")
    (trained / "config.json").write_bytes(settings)  # the module's run keeps its settings for the other tests
    assert until.returncode == 0, until.stderr[-3000:]
    assert _actions(until.stderr, dry=False) == [(s, "skip") for s in ("data", "vqvae", "encode", "prior")]
    assert (trained / "samples" / "manifest.json").read_bytes() == samples  # a changed sample setting: not run
    assert "report:" not in until.stdout
    # A changed VQ-VAE setting: re-made up to the codes, the prior left as it is.
    lr = json.loads((trained / "config.json").read_text())["vqvae_train"]["lr"]
    dry = _cli(*PIPELINE, "--config", config, f"vqvae_train.lr={lr * 3}", "--until", "encode", "--dry-run")
    assert _actions(dry.stdout, dry=True) == [("data", "skip"), ("vqvae", "run"), ("encode", "run")], dry.stdout
    dry = _cli(*PIPELINE, "--config", config, "--from", "encode", "--until", "prior", "--dry-run")
    assert _actions(dry.stdout, dry=True) == [("encode", "run"), ("prior", "run")], dry.stdout
    _refused(_cli(*PIPELINE, "--config", config, "--from", "sample", "--until", "prior", "--dry-run"),
             "--until prior stops before --from sample")
    _refused(_cli(*PIPELINE, "--config", config, "--only", "vqvae", "--until", "prior", "--dry-run"),
             "--until cannot be combined with --only")


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
        assert _cli(*PIPELINE, "--config", str(other / "config.json"), "--only", stage).returncode == 0
    shutil.rmtree(other / "codes")
    shutil.copytree(trained / "codes", other / "codes")  # codes of the other VQ-VAE, copied in
    result = _cli(sys.executable, "prior/train.py", "--config", str(other / "config.json"))
    _refused(result, "its inputs were made from vqvae", f"{other / 'vqvae'} holds vqvae")
    assert not (other / "prior").exists()


@pytest.mark.slow
def test_array_tasks_of_two_configs_never_complete_a_stage(trained: Path) -> None:
    config = str(trained / "config.json")
    shutil.rmtree(trained / "samples", ignore_errors=True)
    first = _cli(sys.executable, "prior/sample.py", "--config", config, "--shard-index", "0", "--num-shards", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    other = _cli(sys.executable, "prior/sample.py", "--config", config, "sample.temperature=0.5",
                 "--shard-index", "1", "--num-shards", "2")
    _refused(other, "holds sample outputs of another configuration")
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
    result = _cli(sys.executable, "vqvae/train.py", "--config", str(run_dir / "config.json"))
    _refused(result, "lacks identity", "older lesion-vq")
    assert not (run_dir / "vqvae").exists()


# ----- 5./6. processes die with their pipeline; Ctrl-C checkpoints; one trainer per folder ---------------
def _run_with_training(tmp_path: Path, tiny_data: Path, *extra: str) -> tuple[Path, subprocess.Popen]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "data").symlink_to(tiny_data, target_is_directory=True)
    tiny_config(run_dir, "vqvae_train.max_steps=400", "vqvae_train.checkpoint_every=2",
                "vqvae_train.eval_every=1000")
    proc = subprocess.Popen([*PIPELINE, "--config", str(run_dir / "config.json"), *extra], cwd=REPO,
                            env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = run_dir / "vqvae" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts.is_dir() and any(re.fullmatch(r"step-\d{8}", p.name) for p in ckpts.iterdir())):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training never checkpointed"
        time.sleep(0.1)
    return run_dir, proc


def _stage_processes(pipeline: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(pipeline.pid).children(recursive=True)


def _all_gone(procs: list[psutil.Process], limit: float = 30) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=limit)
    for proc in alive:
        proc.kill()
    return not alive


@pytest.mark.slow
def test_sigkill_of_the_pipeline_and_of_the_launcher_group_leaves_no_worker(tmp_path: Path, tiny_data: Path) -> None:
    run_dir, proc = _run_with_training(tmp_path, tiny_data, "--processes", "2")
    procs = _stage_processes(proc)
    launcher = next(p for p in procs if p.ppid() == proc.pid)
    assert len([p for p in procs if "vqvae/train.py" in " ".join(p.cmdline())]) >= 3  # launcher + 2 workers
    proc.kill()  # SIGKILL of the pipeline: nothing can be passed on by it ...
    psutil.Process(launcher.pid).wait(timeout=30)  # ... the kernel's parent-death signal stops the launcher
    assert _all_gone(procs), "a stage process outlived its killed pipeline"
    rerun = _cli(*PIPELINE, "--config", str(run_dir / "config.json"), "--only", "vqvae", "vqvae_train.max_steps=6",
                 timeout=400)
    # Another max_steps is another identity: the killed run's checkpoints are kept aside, not resumed or lost.
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert list((run_dir / ".history").glob("vqvae@*/checkpoints/step-*"))


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_130_with_one_line(tmp_path: Path, tiny_data: Path) -> None:
    run_dir, proc = _run_with_training(tmp_path, tiny_data)
    procs = _stage_processes(proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert re.search(r"stop requested \(SIGINT\): checkpoint at step (\d+) saved, exiting 130", err), err[-3000:]
    assert "pipeline: stage vqvae stopped on a signal" in err
    assert _all_gone(procs, limit=5)
    assert not (run_dir / "vqvae" / "manifest.json").exists()


@pytest.mark.slow
def test_sigterm_to_the_single_process_launcher_checkpoints_the_worker(tmp_path: Path, tiny_data: Path) -> None:
    _, proc = _run_with_training(tmp_path, tiny_data)
    procs = _stage_processes(proc)
    launcher = next(p for p in procs if p.ppid() == proc.pid)
    launcher.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert re.search(r"stop requested \(SIGTERM\): checkpoint at step \d+ saved, exiting 75", err), err[-3000:]
    assert _all_gone(procs, limit=5)


@pytest.mark.slow
def test_two_trainers_never_share_one_output_folder(tmp_path: Path, tiny_data: Path) -> None:
    run_dir, proc = _run_with_training(tmp_path, tiny_data)
    try:
        second = _cli(sys.executable, "vqvae/train.py", "--config", str(run_dir / "config.json"))
        # After the data check's progress line: the lock is taken once the inputs are known to be good.
        _refused(second, f"another vqvae training is writing to {run_dir / 'vqvae'}", "(pid ", alone=False)
    finally:
        procs = _stage_processes(proc)
        proc.kill()
        _all_gone(procs)
