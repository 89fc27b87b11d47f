"""Shared pytest fixtures.

* ``shared_data``: the read-only real data folder ``<repo>/../shared/data`` (HAM10000 / ISIC
  metadata CSVs and two sample images). Skips the test when absent, or fails instead when the
  environment sets ``LESION_VQ_REQUIRE_SHARED=1`` (CI machines that must have it).
* ``pack_synth``: factory ``pack_synth(out_dir, **data_overrides) -> Path`` that packs a small
  synthetic data set (real tar shards) with ``shards.pack.pack_synthetic``.
* ``synth_shards``: one such data set per session (100 images at 32 px, 13 per shard so shard
  sizes are uneven), for tests that only read shards.
* ``finished_run`` (gated PixelCNN prior) and ``finished_transformer_run``: ONE tiny run each through every
  stage by ``launch/pipeline.py`` per session, for the tests that only read a finished run (read-only: a test
  that changes a run works on ``copy_run(...)``).

Tiers: tests marked ``slow`` (they start processes, train past a few steps, or use DDP) or ``slurm`` run in
the full suite only; the rest are the fast tier (``scripts/test.sh --fast``). A fast-tier test that starts
a Python process, accelerate, Slurm or a multiprocessing worker fails, naming the marker it needs, so the
fast tier stays in-process however the suite grows.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing.process
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock
from helpers import FINISHED_RUN, TINY_TRANSFORMER, FinishedRun, assert_ok, run_pipeline, tiny_config

from shards.config import DataConfig

# ../shared/data beside the repository, or wherever LESION_VQ_SHARED_DATA points.
SHARED_DATA = Path(os.environ.get("LESION_VQ_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    reason = f"real test data not found at {SHARED_DATA} (the shared/ folder beside the repository)"
    if os.environ.get("LESION_VQ_REQUIRE_SHARED") == "1":
        pytest.fail(f"{reason}; LESION_VQ_REQUIRE_SHARED=1 requires it")
    pytest.skip(reason)


_PROCESS_LAUNCHERS = {"accelerate", "torchrun", "sbatch", "srun", "salloc", "bash", "sh"}
"""Programs a fast-tier test may not start (besides Python itself): each runs the project's code in
another process, which is what the slow tier is for."""


def _starts_project_code(args: object) -> bool:
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)  # type: ignore[call-overload]
    program = os.path.basename(os.fsdecode(argv[0])) if argv else ""
    return program.startswith("python") or os.fsdecode(argv[0]) == sys.executable or program in _PROCESS_LAUNCHERS


@contextlib.contextmanager
def _no_processes(nodeid: str) -> Iterator[None]:
    message = f"{nodeid} starts a process (in the test or a fixture it needs): mark it @pytest.mark.slow (or slurm)"
    popen_init, process_start = subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start

    def popen(self: subprocess.Popen, args: object, *rest: object, **kw: object) -> None:
        if _starts_project_code(args):
            raise AssertionError(message)
        popen_init(self, args, *rest, **kw)  # type: ignore[arg-type]

    def start(self: multiprocessing.process.BaseProcess) -> None:
        raise AssertionError(message)

    subprocess.Popen.__init__ = popen  # type: ignore[method-assign]
    multiprocessing.process.BaseProcess.start = start  # type: ignore[method-assign]
    try:
        yield
    finally:
        subprocess.Popen.__init__ = popen_init  # type: ignore[method-assign]
        multiprocessing.process.BaseProcess.start = process_start  # type: ignore[method-assign]


def _fast(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is None and item.get_closest_marker("slurm") is None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    # Around setup too: a module or session fixture that trains in a subprocess makes its tests slow.
    with _no_processes(item.nodeid) if _fast(item) else contextlib.nullcontext():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _no_processes(item.nodeid) if _fast(item) else contextlib.nullcontext():
        return (yield)


def _pack_synth(out_dir: Path, **overrides: Any) -> Path:
    from shards.pack import pack_synthetic

    options = {"num_images": 100, "image_size": 32, "shard_max_count": 13, "workers": 1, **overrides}
    pack_synthetic(DataConfig(**options), out_dir)
    return out_dir


@pytest.fixture(scope="session")
def pack_synth() -> Callable[..., Path]:
    return _pack_synth


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pack_synth(tmp_path_factory.mktemp("synth-shards"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Image shards for the tiny config, packed once per session (read-only for tests)."""
    from shards.pack import pack_synthetic

    cfg = tiny_config(tmp_path_factory.mktemp("tiny-config"))
    out = tmp_path_factory.mktemp("tiny-data")
    pack_synthetic(cfg.data, out)
    return out


@pytest.fixture
def tiny_run(tmp_path: Path, tiny_data: Path) -> Callable[..., Any]:
    """Factory ``tiny_run(*overrides) -> (cfg, config_path)``: a run dir whose data stage is done."""

    def make(*extra: str, name: str = "run") -> tuple[Any, Path]:
        run_dir = tmp_path / name
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = tiny_config(run_dir, *extra)
        (run_dir / "data").symlink_to(tiny_data, target_is_directory=True)
        return cfg, run_dir / "config.json"

    return make


def _finished(tmp_path_factory: pytest.TempPathFactory, name: str, overrides: list[str]) -> FinishedRun:
    """The tiny config plus ``overrides``, taken through every stage by the pipeline once per session, and once for
    all pytest-xdist workers of a session (they share the folder above their own, under a file lock)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / name
    run_dir, record = folder / "run", folder / "pipeline.json"
    with FileLock(str(root / f"{name}.lock")):
        if record.is_file():
            result = subprocess.CompletedProcess(**json.loads(record.read_text()))
        else:
            tiny_config(run_dir, *overrides)
            result = assert_ok(run_pipeline(run_dir / "config.json"))
            record.write_text(json.dumps({"args": result.args, "returncode": result.returncode,
                                          "stdout": result.stdout, "stderr": result.stderr}))
    return FinishedRun(run_dir, run_dir / "config.json", result)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """TINY + FINISHED_RUN (a gated PixelCNN prior) through every stage, once per session."""
    return _finished(tmp_path_factory, "finished-run", FINISHED_RUN)


@pytest.fixture(scope="session")
def finished_transformer_run(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """TINY + TINY_TRANSFORMER (the transformer prior the improved and ham128 presets use) through every stage,
    once per session."""
    return _finished(tmp_path_factory, "finished-transformer-run", TINY_TRANSFORMER)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    # A report travels from an xdist worker as UTF-8; a failure naming a non-UTF-8 path (hostile-input tests make
    # them) would otherwise crash the whole run instead of failing one test.
    report = yield
    if report.failed and report.longrepr is not None:  # a skip's longrepr must stay a (path, line, reason) tuple
        text = str(report.longrepr)
        report.longrepr = text.encode("utf-8", "backslashreplace").decode("utf-8")
    report.sections = [(key, value.encode("utf-8", "backslashreplace").decode("utf-8"))
                       for key, value in report.sections]
    return report


SLURM_MODULES = frozenset({"tests/test_cluster.py", "tests/test_job_scripts.py", "tests/test_local_cluster.py",
                           "tests/test_multinode.py"})
"""The modules with tests marked ``slurm``: under pytest-xdist their tests are one scope (one worker at a time), so
two never compete for the cluster's two nodes. A ``slurm`` test elsewhere fails collection."""


def scope_of(nodeid: str) -> str:
    """The xdist scope of a test: its module, or ``slurm`` for every module of :data:`SLURM_MODULES`."""
    module = nodeid.split("::")[0]
    return "slurm" if module in SLURM_MODULES else module


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    strays = sorted({item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slurm")} - SLURM_MODULES)
    if strays:
        raise pytest.UsageError(f"tests marked slurm in {', '.join(strays)}: add the module to SLURM_MODULES in "
                                "tests/conftest.py (its Slurm tests must not run beside the others)")
    # The Slurm tests first (a stable sort: every module stays in one piece, in its order): under xdist they are
    # the longest scope, and it should not be the last to start.
    items.sort(key=lambda item: scope_of(item.nodeid) != "slurm")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``-n N --dist loadfile`` (scripts/test.sh): a module's tests on one worker, so its module fixtures are made
    once, and the modules of :data:`SLURM_MODULES` as one scope (:func:`scope_of`). (pytest-xdist's ``loadgroup``
    no longer reads its groups under pytest 9.2, which keeps node ids elsewhere.)"""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # scopes in collection order (Slurm first), not by their test counts

    class ModuleScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return ModuleScheduling(config, log)
