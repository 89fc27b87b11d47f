"""OS errors (disk full, read-only, not a folder, name too long, a folder where a file goes) end a command with
exit 2 and one ``error: <path>: <cause>`` line, no traceback, and no ``*.tmp-*`` file left.

Disk-full and read-only cases use a real tmpfs (``mount`` needs root, as in CI); they skip with the reason
where it cannot be mounted."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import assert_ok, assert_one_line_error, copy_run, run_cli, temp_files, tiny_config

# ----- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``tmpfs(name, size)``: a fresh tmpfs of ``size`` (e.g. "512k") mounted at tmp_path/name, unmounted after."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip() or done.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def _read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)


def _fill(where: Path, leave: int) -> None:
    """Occupy all but ``leave`` bytes of the file system of ``where``."""
    stat = os.statvfs(where)
    with open(where / "filler", "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, max(0, stat.f_bavail * stat.f_frsize - leave))


def test_os_error_lines_name_path_and_cause_and_leave_real_bugs_alone() -> None:
    """Old code had no such translation: torch's 'unexpected pos' never said the disk was full."""
    from runtime.cli import os_error_line
    from runtime.files import naming

    full = os_error_line(OSError(errno.ENOSPC, "No space left on device", "/r/x.pt.tmp-abc12"))
    assert full is not None and full.startswith("/r/x.pt: No space left on device [ENOSPC]")
    torch_full = os_error_line(RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 576 vs 534"))
    assert torch_full is not None and "is the disk full?" in torch_full
    safetensors_full = os_error_line(RuntimeError("Error while serializing: I/O error: No space left on device "
                                                  "(os error 28)"))
    assert safetensors_full is not None and "No space left on device [ENOSPC]" in safetensors_full
    renamed = os_error_line(IsADirectoryError(errno.EISDIR, "Is a directory", "/r/c.json.tmp-x1", "/r/c.json"))
    assert renamed is not None and renamed.startswith("/r/c.json: Is a directory [EISDIR]")
    # Bugs keep their traceback: not an OS error about the user's files, or an errno that means a bug.
    assert os_error_line(RuntimeError("shape mismatch")) is None and os_error_line(KeyError("x")) is None
    assert os_error_line(OSError(errno.EBADF, "Bad file descriptor")) is None
    with pytest.raises(OSError) as caught, naming(Path("/r/out.tar")):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.filename == "/r/out.tar"


def _pack_on_full_disk(tmpfs) -> tuple[Path, subprocess.CompletedProcess[str]]:
    mnt = tmpfs("disk", "256k")
    return mnt, run_cli("-m", "shards", "synth", "--out", str(mnt / "data"), "data.num_images=300",
                     "data.image_size=64", "data.workers=1")


@pytest.mark.slow
def test_disk_full_while_packing_exits_2_naming_the_folder_and_leaves_no_temporary_file(tmpfs) -> None:
    """Old code: an OSError traceback and a ``shard-000000.tar.tmp-writing`` left behind."""
    mnt, result = _pack_on_full_disk(tmpfs)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {mnt / 'data' / 'train' / 'shard-000000.tar'}: No space left on device [ENOSPC]; "
                      "free some space or choose "
                      "another run_dir, then rerun (finished work is kept)"], result.stderr[-3000:]
    assert "Traceback (most recent call last):\n  File" not in result.stderr.split("error:")[0]
    assert not temp_files(mnt) and not (mnt / "data" / "manifest.json").exists()


@pytest.mark.slow
def test_disk_full_while_packing_is_one_line_without_any_traceback(tmpfs) -> None:
    mnt, result = _pack_on_full_disk(tmpfs)
    assert_one_line_error(result, str(mnt / "data"), "No space left on device [ENOSPC]")


def test_save_checkpoint_on_a_full_disk_raises_enospc_naming_the_file_and_cleans_up(tmpfs) -> None:
    """Old code: SafetensorError / torch's 'unexpected pos N vs M' RuntimeError, no errno, no path."""
    from runtime.checkpoint import TrainState, save_checkpoint

    mnt = tmpfs("disk", "64k")
    model = torch.nn.Linear(200, 200)  # 160 kB of weights
    with pytest.raises(OSError) as caught:
        save_checkpoint(mnt / "checkpoints", model, torch.optim.Adam(model.parameters()), TrainState(step=3))
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(mnt / "checkpoints" / "step-00000003" / "model.safetensors")
    assert not temp_files(mnt) and not list((mnt / "checkpoints").iterdir())


def _tmpfs_run(mnt: Path, tiny_data: Path, *extra: str) -> str:
    run_dir = mnt / "run"
    run_dir.mkdir()
    tiny_config(run_dir, *extra)
    (run_dir / "data").symlink_to(tiny_data, target_is_directory=True)
    return str(run_dir / "config.json")


@pytest.mark.slow
def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_temporary_checkpoint(tmpfs, tiny_data) -> None:
    """Old code: 'RuntimeError: [enforce fail at inline_container.cc:671] . unexpected pos ...' traceback."""
    mnt = tmpfs("disk", "512k")  # a tiny checkpoint is about 950 kB
    result = run_cli("vqvae/train.py", "--config", _tmpfs_run(mnt, tiny_data))
    assert_one_line_error(result, str(mnt / "run" / "vqvae" / "checkpoints" / "step-00000005"),
                    "No space left on device [ENOSPC]", "free some space")
    assert not temp_files(mnt)
    assert not [p for p in (mnt / "run" / "vqvae" / "checkpoints").iterdir()]


@pytest.mark.slow
def test_disk_full_while_encoding_is_one_line_and_leaves_no_temporary_shard(tmpfs, tiny_data) -> None:
    mnt = tmpfs("disk", "8m")
    config = _tmpfs_run(mnt, tiny_data, "vqvae_train.max_steps=5", "vqvae_train.eval_every=100", "encode.num_tasks=1")
    assert_ok(run_cli("vqvae/train.py", "--config", config))
    _fill(mnt, leave=16 * 1024)
    result = run_cli("vqvae/encode.py", "--config", config)
    assert_one_line_error(result, str(mnt / "run" / "codes"), ".tar: No space left on device [ENOSPC]")
    assert not temp_files(mnt) and not (mnt / "run" / "codes" / "manifest.json").exists()


@pytest.mark.slow
def test_read_only_run_dir_is_one_line_for_training_and_the_report(tmpfs, tiny_data, finished_run) -> None:
    mnt = tmpfs("ro", "32m")
    fresh = _tmpfs_run(mnt, tiny_data)
    copy_run(finished_run.run_dir, mnt / "done")
    _read_only(mnt)
    assert_one_line_error(run_cli("vqvae/train.py", "--config", fresh), str(mnt / "run"),
                          "Read-only file system [EROFS]")
    assert_one_line_error(run_cli("-m", "launch.report", str(mnt / "done")), str(mnt / "done" / "report"),
                          "Read-only file system [EROFS]")


@pytest.mark.parametrize("case", ["under_a_file", "name_too_long", "config_is_a_folder"])
@pytest.mark.slow
def test_unusable_run_dir_paths_are_one_line(tmp_path: Path, case: str) -> None:
    """Old code: NotADirectoryError / 'File name too long' / IsADirectoryError tracebacks from the pipeline."""
    (tmp_path / "afile").write_text("not a folder")
    run_dir = {"under_a_file": tmp_path / "afile" / "run", "name_too_long": tmp_path / ("x" * 300),
               "config_is_a_folder": tmp_path / "run"}[case]
    if case == "config_is_a_folder":
        (run_dir / "config.json").mkdir(parents=True)
    result = run_cli("launch/pipeline.py", "wandb=disabled", f"run_dir={run_dir}", "--only", "data")
    cause = {"under_a_file": "Not a directory [ENOTDIR]", "name_too_long": "File name too long [ENAMETOOLONG]",
             "config_is_a_folder": "Is a directory [EISDIR]"}[case]
    shown = run_dir / "config.json" if case == "config_is_a_folder" else run_dir
    assert_one_line_error(result, f"{shown}: {cause}")
    assert not temp_files(tmp_path)


@pytest.mark.slow
def test_report_on_a_missing_or_empty_dir_says_what_is_wrong(tmp_path: Path) -> None:
    missing = run_cli("-m", "launch.report", str(tmp_path / "nope"))
    assert_one_line_error(missing, f"run directory {tmp_path / 'nope'} does not exist")
    (tmp_path / "empty").mkdir()
    empty = run_cli("-m", "launch.report", str(tmp_path / "empty"))
    assert_one_line_error(empty, f"{tmp_path / 'empty'} is not a lesion-vq run directory: it has no config.json")
    assert not any((tmp_path / "empty").iterdir())
