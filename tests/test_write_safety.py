"""Write only what we own (issue 28, principle 4 and the OS-error cases): a file written in place (locks, the
metrics log, a shard being written, a bench log) is never opened through a symbolic link or as a FIFO; a lock on a
file system without flock says what to do and LESION_VQ_LOCK=create works there; a .history that cannot take a
rename (another file system, a file, a dangling link) is refused in one line before anything moves."""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path

import pytest
from helpers import TINY

from runtime.files import InPlaceWriteError, open_in_place
from runtime.ownership import OwnershipError, move_aside, write_marker
from runtime.process import BusyError, exclusive_lock
from runtime.tracking import RunLogger

VICTIM = "the user's own file\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM)
    return path


@pytest.mark.parametrize("mode", ["ab", "rb+", "xb"])
def test_in_place_writes_never_follow_a_symlink(tmp_path: Path, victim: Path, mode: str) -> None:
    link = tmp_path / "file"
    link.symlink_to(victim)
    with pytest.raises(InPlaceWriteError, match="symbolic link"):
        open_in_place(link, mode)  # type: ignore[arg-type]
    assert victim.read_text() == VICTIM


@pytest.mark.parametrize("mode", ["ab", "rb+"])
def test_in_place_writes_refuse_a_fifo_without_blocking(tmp_path: Path, mode: str) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InPlaceWriteError, match="FIFO"):
        open_in_place(tmp_path / "fifo", mode)  # type: ignore[arg-type]


def test_pipeline_lock_symlink_is_refused_and_the_target_kept(tmp_path: Path, victim: Path) -> None:
    from launch.pipeline import main, parser

    run_dir = tmp_path / "run"
    write_marker(run_dir, "run")  # a run of ours (the issue: a finished run), its lock replaced by a link
    (run_dir / ".pipeline").mkdir(parents=True)
    (run_dir / ".pipeline" / "lock").symlink_to(victim)
    with pytest.raises(InPlaceWriteError, match="symbolic link"):
        main(parser().parse_args([*TINY, f"run_dir={run_dir}", "--until", "data"]))
    assert victim.read_text() == VICTIM
    assert not (run_dir / "data").exists()


def test_training_lock_symlink_is_refused(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "vqvae").mkdir()
    (tmp_path / "vqvae" / ".lock").symlink_to(victim)
    with pytest.raises(InPlaceWriteError), exclusive_lock(tmp_path / "vqvae" / ".lock", "busy"):
        pass
    assert victim.read_text() == VICTIM


@pytest.mark.parametrize("target", ["existing", "dangling"])
def test_metrics_log_symlink_is_never_appended_through(tmp_path: Path, victim: Path, target: str) -> None:
    out = tmp_path / "prior"
    out.mkdir()
    logger = RunLogger(out, "prior", {}, enabled=True, wandb_mode="disabled", resume_step=0)
    elsewhere = victim if target == "existing" else tmp_path / "created-elsewhere"
    (out / "metrics.jsonl").symlink_to(elsewhere)  # planted while the training runs
    with pytest.raises(InPlaceWriteError):
        logger.log(1, {"loss": 1.0})
    assert victim.read_text() == VICTIM and not (tmp_path / "created-elsewhere").exists()


def test_lock_without_flock_says_what_to_do_and_the_create_lock_works(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def no_flock(*_: object) -> None:  # what NFS mounted nolock / Lustre without flock answer
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = tmp_path / ".pipeline" / "lock"
    with pytest.raises(BusyError, match="LESION_VQ_LOCK=create") as err, exclusive_lock(lock, "busy"):
        pass
    assert "ENOLCK" in str(err.value) and "\n" not in str(err.value)

    monkeypatch.setenv("LESION_VQ_LOCK", "create")
    held = lock.with_name("lock.held")
    with exclusive_lock(lock, "another pipeline is running"):
        assert held.read_text() == f"pid {os.getpid()} on {os.uname().nodename}"
        with pytest.raises(BusyError, match=f"pid {os.getpid()}"), exclusive_lock(lock, "another pipeline is running"):
            pass
    assert not held.exists()
    held.write_text(f"pid 999999999 on {os.uname().nodename}")  # left by a killed run on this host
    with exclusive_lock(lock, "busy"):
        assert held.read_text().startswith(f"pid {os.getpid()}")
    monkeypatch.setenv("LESION_VQ_LOCK", "nfs")
    with pytest.raises(BusyError, match="allowed: flock"), exclusive_lock(lock, "busy"):
        pass


def _stage_folder(root: Path) -> Path:
    folder = root / "prior"
    write_marker(folder, "stage", stage="prior", identity="old")
    (folder / "weights.bin").write_bytes(b"kept")
    return folder


def _other_file_system() -> Path:
    for candidate in ("/dev/shm", "/run", "/var/tmp"):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK) \
                and os.stat(candidate).st_dev != os.stat(tempfile.gettempdir()).st_dev:
            return Path(tempfile.mkdtemp(dir=candidate))
    pytest.skip("no writable folder on another file system than the temporary folder")


def test_history_on_another_file_system_is_refused_before_anything_moves(tmp_path: Path) -> None:
    folder = _stage_folder(tmp_path)
    elsewhere = _other_file_system()
    (tmp_path / ".history").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OwnershipError, match="another file system") as err:
        move_aside(folder, "old")
    assert "mv " in str(err.value)
    assert (folder / "weights.bin").read_bytes() == b"kept" and not any(elsewhere.iterdir())
    os.rmdir(elsewhere)


@pytest.mark.parametrize("history", ["file", "dangling"])
def test_history_that_is_a_file_or_a_dangling_link_is_refused(tmp_path: Path, history: str) -> None:
    folder = _stage_folder(tmp_path)
    if history == "file":
        (tmp_path / ".history").write_text("notes")
    else:
        (tmp_path / ".history").symlink_to(tmp_path / "gone")
    with pytest.raises(OwnershipError, match=r"not a folder|does not exist"):
        move_aside(folder, "old")
    assert (folder / "weights.bin").read_bytes() == b"kept"


def test_pack_replace_checks_history_first(tmp_path: Path) -> None:
    from shards.config import DataConfig
    from shards.pack import pack_synthetic

    out = tmp_path / "shards"
    pack_synthetic(DataConfig(num_images=20, image_size=16, workers=1), out)
    (tmp_path / ".history").write_text("not a folder")
    with pytest.raises(OwnershipError, match="not a folder"):
        pack_synthetic(DataConfig(num_images=21, image_size=16, workers=1), out, replace=True)
    assert (out / "manifest.json").is_file()


@pytest.mark.parametrize("folder", [".pipeline", "slurm"])
def test_pipeline_bookkeeping_folder_symlink_is_refused(tmp_path: Path, victim: Path, folder: str) -> None:
    from launch.pipeline import PipelineError, main, parser

    run_dir = tmp_path / "run"
    write_marker(run_dir, "run")
    (run_dir / folder).symlink_to(tmp_path, target_is_directory=True)  # jobs.json, timings, job logs: elsewhere
    with pytest.raises(PipelineError, match="symbolic link"):
        main(parser().parse_args([*TINY, f"run_dir={run_dir}", "--until", "data"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "victim.txt"]
