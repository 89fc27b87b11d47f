"""A run does what its config says, whatever the user's tool defaults (issue 28, medium): ACCELERATE_* variables,
accelerate's default config file, WANDB_* run settings and PYTHONHASHSEED never reach a stage, the launcher's
own settings win and one line names what was ignored; wandb online without network falls back to offline within
a bounded wait, saying so in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from runtime import launcher
from runtime.launcher import ACCELERATE_CONFIG, accelerate_command, ignored_settings, say_ignored, stage_environment

HOSTILE = {"ACCELERATE_MIXED_PRECISION": "fp16", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
           "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEBUG_MODE": "1", "PYTHONHASHSEED": "123",
           "WANDB_RUN_ID": "someone-elses-run", "WANDB_RESUME": "must", "WANDB_DIR": "/tmp/elsewhere"}


@pytest.fixture
def user_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The hostile environment, plus a default accelerate config asking for DeepSpeed on GPU 3."""
    for key, value in HOSTILE.items():
        monkeypatch.setenv(key, value)
    default = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    default.parent.mkdir(parents=True)
    default.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ngpu_ids: '3'\n"
                       "mixed_precision: fp16\nnum_processes: 4\ndebug: true\n")
    import accelerate.commands.config as accelerate_config

    monkeypatch.setattr(accelerate_config, "default_config_file", str(default))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # what a child's accelerate reads
    return default


def test_stage_environment_drops_user_settings_and_keeps_the_launchers(user_defaults: Path) -> None:
    env = stage_environment({"ACCELERATE_USE_CPU": "1"})
    assert not [k for k in HOSTILE if k in env and env[k] == HOSTILE[k]]
    assert env["ACCELERATE_USE_CPU"] == "1" and env["PYTHONHASHSEED"] == "0"
    assert env["PATH"] == os.environ["PATH"]  # everything else is the user's


def test_one_line_names_what_was_ignored(user_defaults: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ignored = ignored_settings()
    assert str(user_defaults) in ignored and "ACCELERATE_MIXED_PRECISION=fp16" in ignored
    say_ignored("pipeline")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeline: ignoring per-user settings")
    assert "WANDB_RUN_ID=someone-elses-run" in lines[0] and "PYTHONHASHSEED=123" in lines[0]


def test_nothing_said_when_nothing_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    for key in [k for k in os.environ if launcher._user_setting(k)]:
        monkeypatch.delenv(key)
    import accelerate.commands.config as accelerate_config

    monkeypatch.setattr(accelerate_config, "default_config_file", str(tmp_path / "none.yaml"))
    say_ignored("pipeline")
    assert capsys.readouterr().err == ""


def test_every_launch_reads_our_accelerate_config() -> None:
    from accelerate.commands.config import load_config_from_file

    argv, _ = accelerate_command("vqvae/train.py", [], processes=2)
    assert argv[argv.index("--config_file") + 1] == ACCELERATE_CONFIG
    config = load_config_from_file(ACCELERATE_CONFIG)
    assert str(config.distributed_type) in ("NO", "DistributedType.NO") and not config.debug


PROBE = """
import json, os, sys
from accelerate import Accelerator
a = Accelerator()
print(json.dumps({"rank": a.process_index, "world": a.num_processes, "type": str(a.distributed_type),
                  "precision": a.mixed_precision, "accumulation": a.gradient_accumulation_steps,
                  "hashseed": os.environ.get("PYTHONHASHSEED"), "wandb_run_id": os.environ.get("WANDB_RUN_ID")}))
"""


@pytest.mark.slow
def test_a_real_launch_ignores_the_users_accelerate_defaults(user_defaults: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    argv, extra = accelerate_command("vqvae/train.py", [], processes=2)
    argv[argv.index(str(REPO / "vqvae" / "train.py"))] = str(probe)
    out = subprocess.run(argv, env=stage_environment(extra), capture_output=True, text=True, timeout=300,
                         cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    ranks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["world"] == 2 and r["type"].endswith("MULTI_CPU") and r["precision"] == "no", r
        assert r["accumulation"] == 1 and r["hashseed"] == "0" and r["wandb_run_id"] is None, r


@pytest.mark.slow
def test_wandb_online_without_network_falls_back_to_offline_in_bounded_time(tmp_path: Path) -> None:
    """A real wandb, pointed at a port where nothing listens (as a node without network)."""
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
              "from pathlib import Path\nfrom runtime.tracking import RunLogger\n"
              f"logger = RunLogger(Path({str(tmp_path / 'vqvae')!r}), 'vqvae', {{'run_dir': 'x'}}, enabled=True, "
              "wandb_mode='online', resume_step=0)\n"
              "logger.log(1, {'loss': 1.0})\nprint('tracking', type(logger._wandb).__name__)\nlogger.close()\n")
    env = {**os.environ, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "0" * 40}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    fallback = [line for line in out.stderr.splitlines() if "fell back to offline" in line]
    assert len(fallback) == 1 and "127.0.0.1:9" in fallback[0], out.stderr[-2000:]
    assert "tracking Run" in out.stdout
    assert list((tmp_path / "vqvae" / "wandb").glob("offline-run-*"))
