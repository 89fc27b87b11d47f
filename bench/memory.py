"""Peak memory per stage: each workload runs alone in a fresh subprocess.

Peak RSS is the probe process's own high-water mark, ``VmHWM`` from ``/proc/self/status``, read
when its workload is done (DataLoader workers are separate processes and not included). Not
``getrusage``/``wait4``: ``ru_maxrss`` survives ``exec``, so a child spawned by this (already large)
process reports at least the parent's peak. On CUDA the probe also reports
``torch.cuda.max_memory_allocated``. Workloads are the benchmarks' own functions with a few steps;
the baseline is a probe that only imports torch and this package (the floor every stage pays).

    python -m bench.memory probe NAME WORKDIR [--quick]   # one probe (used by ``python -m bench memory``)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from bench import inference, training
from bench.common import Row, device
from bench.data_loading import Inputs
from bench.report_baseline import train_images_per_s
from runtime.launcher import REPO_ROOT
from shards.loader import make_train_loader

FLOOR = "python + torch + bench imports"


def _setup(quick: bool) -> training.Setup:
    return replace(training.QUICK if quick else training.FULL, warmup=1, steps=2, repeats=1)


def _probes(quick: bool, workdir: Path) -> dict[str, Callable[[], object]]:
    setup, dev = _setup(quick), device()
    inputs = Inputs([], [], workdir / "folder", workdir / "shards")
    sweeps = inference.QUICK if quick else inference.FULL
    encode, sample = sweeps[-1], sweeps[0]  # the largest encoder; the prior that samples in seconds
    encode_batch, sample_batch = max(encode.encode_batches), max(sample.sample_batches)

    def loader() -> int:
        batches = make_train_loader(inputs.split, batch_size=setup.batch, rank=0, world_size=1, epoch=0, seed=0,
                                    num_workers=1)
        return sum(len(b["key"]) for b in batches)

    return {
        FLOOR: lambda: None,
        f"data: shard loader, 1 worker, {setup.size} px": loader,
        "train: ours (runtime.trainer)": lambda: training.ours_images_per_s(inputs, setup, workdir / "ours", dev),
        "train: report loop": lambda: train_images_per_s(inputs.folder, size=setup.size, batch=setup.batch,
                                                         warmup=setup.warmup, steps=setup.steps,
                                                         workers=setup.workers, device=dev),
        f"encode: {encode.label}, batch {encode_batch}":
            lambda: inference.encode_images_per_s(encode.config(), encode_batch, encode.encode_images, dev),
        f"sample: {sample.label}, batch {sample_batch}":
            lambda: inference.sample_per_s(sample.config(), sample_batch, dev),
    }


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: may include the parent's


def probe(name: str, workdir: Path, quick: bool) -> None:
    _probes(quick, workdir)[name]()
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    print(json.dumps({"rss_mib": _peak_rss_mib(), "cuda_mib": cuda}))


def _measure(name: str, workdir: Path, quick: bool) -> tuple[float, float]:
    """(peak RSS MiB, peak CUDA MiB) of one probe in its own process."""
    argv = [sys.executable, "-m", "bench.memory", "probe", name, str(workdir), *(["--quick"] if quick else [])]
    done = subprocess.run(argv, cwd=REPO_ROOT, env=os.environ | {"WANDB_MODE": "disabled"}, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {name!r} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["rss_mib"], result["cuda_mib"]


def run(quick: bool) -> list[Row]:
    rows = []
    setup = _setup(quick)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        workdir = Path(tmp)
        training.prepare(setup, workdir)
        for name in _probes(quick, workdir):
            rss, cuda = _measure(name, workdir, quick)
            rows.append(Row("memory", name, rss, "MiB peak RSS", FLOOR,
                            "main process VmHWM, loader workers excluded" if name == FLOOR else ""))
            if torch.cuda.is_available() and name != FLOOR:
                gpu_base = "train: report loop (GPU)"
                rows.append(Row("memory", f"{name} (GPU)", cuda, "MiB peak CUDA allocated", gpu_base))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe"]:
        probe(sys.argv[2], Path(sys.argv[3]), "--quick" in sys.argv)
    else:
        print(*run("--quick" in sys.argv), sep="\n")
