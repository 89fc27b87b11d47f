"""Helpers shared by test modules (import as ``from helpers import ...``; fixtures live in conftest.py)."""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds

from runtime.config import CLASSES, RunConfig, build_config, save_config

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "wandb=disabled",
    "data.num_images=96", "data.image_size=32", "data.shard_max_count=20", "data.workers=1",
    "vqvae.channels=[16,32]", "vqvae.res_blocks=1", "vqvae.quantizer.codebook_size=32", "vqvae.code_dim=16",
    "vqvae_train.batch_size=8", "vqvae_train.max_steps=20", "vqvae_train.checkpoint_every=5",
    "vqvae_train.eval_every=10", "vqvae_train.eval_batches=2", "vqvae_train.log_every=5",
    "vqvae_train.num_workers=0", "vqvae_train.warmup_steps=0",
    "prior.filters=16", "prior.layers=2", "prior.kernel_size=3", "prior.embed_dim=8",
    "prior_train.batch_size=8", "prior_train.max_steps=20", "prior_train.checkpoint_every=5",
    "prior_train.eval_every=10", "prior_train.eval_batches=2", "prior_train.log_every=5",
    "prior_train.num_workers=0", "prior_train.warmup_steps=0",
    "sample.per_class=1", "sample.num_tasks=2", "encode.num_tasks=2",
    "classifier.width=8", "classifier_train.batch_size=8", "classifier_train.max_steps=10",
    "classifier_train.checkpoint_every=5", "classifier_train.eval_every=10", "classifier_train.eval_batches=2",
    "classifier_train.log_every=5", "classifier_train.num_workers=0", "classifier_train.warmup_steps=0",
    "evaluate.max_images=32", "evaluate.batch_size=16",
]
"""Overrides (on the smoke preset) for runs whose stages each take seconds."""

FINISHED_RUN = ["prior_train.max_steps=150", "prior_train.eval_every=50", "prior_train.checkpoint_every=50",
                "sample.class_mix=data", "sample.per_class=2", "sample.min_per_class=1"]
"""Added to TINY for the session's one finished run (conftest ``finished_run``): a prior trained long enough
to learn (tests compare its bits per code with uniform: 2.15 of 5 bits after 150 steps; 60 steps, with the cosine
schedule of a 60-step run, gave 3.04), samples in the data's class mix, every class drawn."""

TINY_TRANSFORMER = ["prior.arch=transformer", "prior.d_model=16", "prior.heads=2", "prior.layers=1"]
"""Added to TINY for the session's finished run with a transformer prior (conftest ``finished_transformer_run``)."""


@dataclass(frozen=True)
class FinishedRun:
    """The session's finished run (conftest ``finished_run``)."""

    run_dir: Path
    config: Path
    result: subprocess.CompletedProcess[str]
    """What ``launch/pipeline.py`` printed making it."""


def tiny_config(run_dir: Path, *extra: str) -> RunConfig:
    """A validated tiny config for ``run_dir``, saved as ``run_dir/config.json``."""
    cfg = build_config("smoke", [*TINY, f"run_dir={run_dir}", *extra])
    save_config(cfg, Path(run_dir) / "config.json")
    return cfg



def stage_env(**extra: str) -> dict[str, str]:
    """Environment for stage subprocesses: quiet, single-threaded math so 2 processes share 2 cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}


def write_class_coded_shards(out: Path, codebook: int, grid: int, per_class: int, cfg: RunConfig) -> None:
    """Synthetic code shards whose code distribution depends on the class: class c uses code c at
    ~70% of positions, other codes uniformly elsewhere (a signal only a conditional prior can use).
    Their manifest is that of an encode stage of ``cfg`` with no recorded upstream."""
    from runtime.files import atomic_write_json
    from runtime.lineage import identity
    from shards.manifest import CODE_FORMAT, describe_shard

    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", per_class), ("val", 4)):
        (out / split).mkdir(parents=True)
        path = out / split / "shard-000000.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(n * len(CLASSES)):
                label = i % len(CLASSES)
                codes = np.where(rng.random((grid, grid)) < 0.7, label, rng.integers(0, codebook, (grid, grid)))
                buf = io.BytesIO()
                np.save(buf, codes.astype(np.int16), allow_pickle=False)
                sink.write({"__key__": f"img_{split}_{i:05d}", "codes.npy": buf.getvalue(),
                            "cls": str(label).encode(), "json": b"{}"})
        count = n * len(CLASSES)
        atomic_write_json(out / split / "manifest.json", {
            "format": CODE_FORMAT, "split": split, "num_samples": count, "codebook_size": codebook,
            "grid": [grid, grid], "shards": [describe_shard(path, count)]})
        splits[split] = {"num_samples": count}
    atomic_write_json(out / "manifest.json", {"format": CODE_FORMAT, "codebook_size": codebook,
                                               "grid": [grid, grid], "splits": splits, "upstream": {},
                                               "identity": identity(cfg, "encode", {}), "content": "test",
                                               "settings": {}, "lineage": {}})


# ----- hand-made shards and files ----------------------------------------------------------------------
def write_split(folder: Path, samples: list[dict[str, bytes | str]], **declared: Any) -> Path:
    """A hand-made split (one shard, manifest consistent with it) of raw samples."""
    from runtime.files import atomic_write_json
    from shards.manifest import FORMAT, describe_shard

    folder.mkdir(parents=True)
    path = folder / "shard-000000.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    atomic_write_json(folder / "manifest.json", {"format": declared.pop("format", FORMAT), "split": folder.name,
                                                 "shards": [describe_shard(path, len(samples))],
                                                 "num_samples": len(samples), **declared})
    return folder


def lesion_jpeg(size: int = 32, label: int = 1) -> bytes:
    """JPEG bytes of a synthetic lesion of class ``label``."""
    from shards.images import array_to_jpeg
    from shards.synth import render_lesion

    return array_to_jpeg(render_lesion(3, label, size), 90)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def code_manifest(codebook_size: int, grid: int) -> dict[str, Any]:
    """The code-shard fields of a split manifest (codebook size, square grid)."""
    from shards.manifest import CODE_FORMAT

    return {"format": CODE_FORMAT, "codebook_size": codebook_size, "grid": [grid, grid]}


def temp_files(*roots: Path) -> list[Path]:
    """Temporary files (``*.tmp-*``) left anywhere under ``roots``."""
    return [p for root in roots for p in root.rglob("*") if ".tmp-" in p.name]


# ----- running the project's command-line entry points ----------------------------------------------
def run_cli(*argv: str | os.PathLike[str], timeout: float = 300, env: dict[str, str] | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``python ARGV...`` from the repository root (a script path, or ``-m module``), with stage_env(); never
    raises on a non-zero exit: check the result with assert_ok / assert_one_line_error."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=env or stage_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def run_pipeline(config: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python launch/pipeline.py --config CONFIG ARGS...`` (see run_cli)."""
    return run_cli("launch/pipeline.py", "--config", config, *args, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str, alone: bool = False) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line, the last one, holding every needle (``alone``: and
    nothing else on stderr). Returns that line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line.split("\r")[-1] for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    assert len(lines) == 1 or not alone, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of a finished run directory to change freely (symbolic links, e.g. a shared data/, stay links)."""
    shutil.copytree(run_dir, dest, symlinks=True)
    return dest


# ----- the local Slurm (slurm/local-cluster.sh up) --------------------------------------------------
REQUIRE_SLURM = os.environ.get("LESION_VQ_REQUIRE_SLURM") == "1"
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE")


def run_quiet(cmd: list[str], timeout: float = 20, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


@functools.cache
def _cluster_problem() -> str | None:
    """None when the local Slurm is usable, else a human-readable reason."""
    for tool in ("sinfo", "sbatch", "sacct", "scancel", "scontrol"):
        if shutil.which(tool) is None:
            return f"`{tool}` not on PATH"
    try:
        info = run_quiet(["sinfo", "-h", "-o", "%T"])
        if info.returncode != 0:
            return f"`sinfo` failed: {(info.stderr or info.stdout).strip()[-300:]}"
        states = info.stdout.split()
        if not any(s in USABLE_NODE_STATES for s in states):  # "idle*" = not responding
            return f"no usable node (sinfo states: {states or 'none'})"
        acct = run_quiet(["sacct", "-n", "-X", "-S", "now-1minutes"])
        if acct.returncode != 0:
            return f"`sacct` failed: {(acct.stderr or acct.stdout).strip()[:300]}"
    except subprocess.TimeoutExpired as exc:
        return f"`{' '.join(exc.cmd)}` timed out"
    return None


def need_slurm() -> None:
    """Skip (with the reason) without a usable local Slurm; fail instead under LESION_VQ_REQUIRE_SLURM=1."""
    problem = _cluster_problem()
    if problem is None:
        return
    msg = f"local Slurm cluster not usable: {problem} (start it: slurm/local-cluster.sh up)"
    if REQUIRE_SLURM:
        pytest.fail(f"{msg} [LESION_VQ_REQUIRE_SLURM=1]", pytrace=False)
    pytest.skip(msg)


def usable_slurm_nodes() -> list[str]:
    """Names of the nodes that can run jobs now (each once, though sinfo lists a node per partition)."""
    out = run_quiet(["sinfo", "-h", "-N", "-o", "%N %T"])
    rows = [line.split() for line in out.stdout.splitlines() if len(line.split()) == 2]
    return sorted({name for name, state in rows if state in USABLE_NODE_STATES})


def need_slurm_nodes(count: int) -> list[str]:
    """need_slurm(), plus at least ``count`` usable nodes (``slurm/local-cluster.sh up --nodes 2``); returns
    their names. Skips with the reason, or fails under LESION_VQ_REQUIRE_SLURM=1: a 1-node cluster in CI
    must not pass the multi-node tests by skipping them."""
    need_slurm()
    nodes = usable_slurm_nodes()
    if len(nodes) >= count:
        return nodes
    msg = (f"needs {count} usable Slurm nodes, found {len(nodes)} ({', '.join(nodes) or 'none'}); "
           f"start them: slurm/local-cluster.sh up --nodes {count}")
    if REQUIRE_SLURM:
        pytest.fail(f"{msg} [LESION_VQ_REQUIRE_SLURM=1]", pytrace=False)
    pytest.skip(msg)
