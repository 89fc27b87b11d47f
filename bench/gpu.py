"""Every GPU fact the project claims, measured by one command in minutes: ``python -m bench gpu`` (docs/gpu.md).

    python -m bench gpu [--minutes 8] [--out DIR]

Rows (every row of a section has the same fields on every machine, :data:`FIELDS`):

* ``smoke``: the smoke pipeline end to end (exit status, seconds per stage), its VQ-VAE decoding on the device.
* ``decode``: the same shards decoded by the loader workers and by the device (nvJPEG on a GPU): pixel
  difference in levels of 255 (max, mean) and images/s of each.
* ``report``: the report's own training loop (bench/report_baseline.py) per batch size.
* ``train``: ``seed`` and ``improved`` at 256 px, batch 16 and 64, 8 loader workers, bf16 and fp32, decoding in
  the workers and on the device: ours (the trainer on shards) against the ceiling (the same step with
  its inputs resident on the device) and the report's loop, as ratios; GPU busy % (NVML) over our timed steps
  and peak GPU memory; bf16 against fp32.
* ``sample``: samples/s of the ``improved`` and ``ham128`` priors (prior and decoder, bf16 on CUDA).

Without CUDA the same rows run on the CPU path at a tiny size, with ``gpu_path=always`` so the GPU path's
branches run: the first line says that no GPU was found, and none of the numbers is a GPU measurement. Each group
of rows runs in a process of its own (a CUDA error, or accelerate's process-wide precision, cannot leak into the
next group); a failure is recorded in its row (error and traceback) and the run goes on. Exit status 1 when any
row failed, 2 for bad options, else 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import default_out, device, machine, synchronize
from runtime.files import atomic_write_json, atomic_write_text, open_in_place
from runtime.launcher import REPO_ROOT

COMMON = ("section", "name", "status", "error", "traceback", "seconds")
FIELDS: dict[str, tuple[str, ...]] = {
    "smoke": ("rc", "until", "stages", "log_tail"),
    "decode": ("images", "batch", "workers", "max_abs_diff", "mean_abs_diff", "differing_fraction",
               "worker_images_per_s", "device_images_per_s", "device_vs_worker"),
    "report": ("size", "batch", "workers", "steps", "report_images_per_s"),
    "train": ("preset", "size", "batch", "workers", "precision", "decode", "steps", "ours_images_per_s",
              "ceiling_images_per_s", "report_images_per_s", "ours_vs_ceiling", "ours_vs_report", "bf16_vs_fp32",
              "gpu_busy_pct", "busy_samples", "busy_source", "peak_gpu_mib"),
    "sample": ("preset", "batch", "grid", "precision", "samples_per_s"),
}
"""Fields of each section's rows besides :data:`COMMON`; a value not measured is null."""

JOBS = ("data", "train-bf16", "train-fp32")
"""Row groups, each run in a child process (``--job``) after the smoke pipeline."""
SMOKE_SHARE = 0.4
"""Of the budget, the most the smoke pipeline may take: the rows after it still get their turn."""


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: :data:`GPU_PLAN` on CUDA, :data:`CPU_PLAN` (tiny) elsewhere."""

    size: int
    batches: tuple[int, ...]
    workers: int
    images: int
    """synthetic lesions packed into the shards every row reads (and written as 600x450 JPEGs for the report)"""
    timed_images: int
    """images per timed window (training, ceiling): steps = timed_images / batch, a quarter as many to warm up"""
    smoke_until: str
    """the smoke pipeline's last stage"""
    smoke: tuple[str, ...]
    """config overrides of the smoke pipeline besides run_dir"""
    sample_batch: int | None
    """None: the preset's sample.batch_size"""
    shrink: tuple[str, ...] = ()
    """overrides on every preset: the tiny size"""

    def steps(self, batch: int) -> tuple[int, int]:
        """(warm-up steps, timed steps) for ``batch``; the warm-up is also the trainer's log interval, so the
        timed steps are whole log intervals."""
        steps = max(2, self.timed_images // batch)
        warmup = max(1, steps // 4)
        return warmup, steps // warmup * warmup


# The smoke pipeline's VQ-VAE decodes on the device: the path `decode_on=auto` is waiting to be proven on.
_ON_THE_GPU_PATH = ("vqvae_train.decode_on=device", "vqvae_train.gpu_path=always", "prior_train.gpu_path=always")
GPU_PLAN = Plan(size=256, batches=(16, 64), workers=8, images=1536, timed_images=2560, smoke_until="report",
                smoke=_ON_THE_GPU_PATH, sample_batch=None)
_TINY_SMOKE = (
    "data.num_images=48", "data.image_size=32", "data.shard_max_count=20", "data.workers=1",
    "vqvae.channels=[16,32]", "vqvae.res_blocks=1", "vqvae.quantizer.codebook_size=32", "vqvae.code_dim=16",
    "vqvae_train.batch_size=8", "vqvae_train.max_steps=4", "vqvae_train.checkpoint_every=4",
    "vqvae_train.eval_every=4", "vqvae_train.eval_batches=1", "vqvae_train.log_every=2", "vqvae_train.num_workers=0",
    "vqvae_train.warmup_steps=0",
)
CPU_PLAN = Plan(size=32, batches=(2, 4), workers=1, images=48, timed_images=8, smoke_until="vqvae",
                smoke=(*_TINY_SMOKE, *_ON_THE_GPU_PATH), sample_batch=4, shrink=("data.image_size=32",))


def plan_for(dev: torch.device) -> Plan:
    return GPU_PLAN if dev.type == "cuda" else CPU_PLAN


def new_row(section: str, name: str, **values: Any) -> dict[str, Any]:
    """A row with every field of its section, unmeasured ones null."""
    row: dict[str, Any] = dict.fromkeys(COMMON + FIELDS[section])
    row.update(section=section, name=name, status="pending", error="", traceback="", **values)
    return row


def _train_rows(plan: Plan, precision: str) -> list[dict[str, Any]]:
    return [new_row("train", f"{preset}, batch {batch}, {precision}, decode on {decode}", preset=preset,
                    size=plan.size, batch=batch, workers=plan.workers, precision=precision, decode=decode,
                    steps=plan.steps(batch)[1])
            for preset in ("seed", "improved") for batch in plan.batches for decode in ("workers", "device")]


def job_rows(plan: Plan, job: str) -> list[dict[str, Any]]:
    """The rows a job measures, in order (the parent fills in those a crashed job never reported)."""
    if job == "data":
        batch = max(plan.batches)
        return [new_row("decode", "worker vs device decode", batch=batch, workers=plan.workers),
                *(new_row("report", f"report loop, batch {b}", size=plan.size, batch=b, workers=plan.workers)
                  for b in plan.batches),
                *(new_row("sample", f"{preset} prior", preset=preset) for preset in ("improved", "ham128"))]
    return _train_rows(plan, job.removeprefix("train-"))


# ----- measurements (in the job processes) -----------------------------------------------------------------------

@dataclass
class Work:
    """What a job reads and writes: the prepared inputs, run folders, the deadline."""

    root: Path
    deadline: float
    dev: torch.device = field(default_factory=device)

    @property
    def inputs(self) -> Any:
        from bench.data_loading import Inputs

        return Inputs([], [], self.root / "inputs" / "folder", self.root / "inputs" / "shards")


def _decode_row(plan: Plan, work: Work, row: dict[str, Any]) -> None:
    """One epoch of the train split through the trainer's own data path (ShardTrainData: loader, to_device), once
    decoded in the workers and once on the device; the first batches of each are compared pixel by pixel."""
    from runtime.config import OptimConfig
    from shards.loader import ShardTrainData

    split = work.inputs.data_dir
    rates, kept = {}, {}
    for decode in ("workers", "device"):
        optim = OptimConfig(batch_size=row["batch"], num_workers=plan.workers, decode_on=decode, gpu_path="always",
                            seed=0)
        data = ShardTrainData(split / "train", split / "val", optim)
        batches = data.steps_per_epoch(1)
        compared = max(1, min(4, batches // 2))
        if batches <= compared:
            raise ValueError(f"{batches} batches of {row['batch']} in one epoch; the plan needs more images")
        pixels: dict[str, torch.Tensor] = {}
        images, start = 0, 0.0
        for i, batch in zip(range(batches), data.loader(epoch=0, position=0, rank=0, world_size=1), strict=False):
            out = data.to_device(batch, work.dev)
            if i < compared:  # kept as 8-bit levels; timing starts after them (and after the workers started)
                levels = out["image"].mul(255).round().to(torch.uint8).cpu()
                pixels.update(zip(out["key"], levels, strict=True))
                if i == compared - 1:
                    synchronize(work.dev)
                    start = time.perf_counter()
            else:
                images += len(out["key"])
        synchronize(work.dev)
        rates[decode] = images / (time.perf_counter() - start)
        kept[decode] = pixels
    keys = sorted(kept["workers"].keys() & kept["device"].keys())
    if not keys:
        raise ValueError("the two paths decoded no common sample")
    diff = torch.stack([(kept["workers"][k].int() - kept["device"][k].int()).abs() for k in keys])
    row.update(images=len(keys), max_abs_diff=int(diff.max()), mean_abs_diff=float(diff.float().mean()),
               differing_fraction=float((diff > 0).float().mean()), worker_images_per_s=rates["workers"],
               device_images_per_s=rates["device"], device_vs_worker=rates["device"] / rates["workers"])


def _report_row(plan: Plan, work: Work, row: dict[str, Any]) -> None:
    from bench.report_baseline import train_images_per_s

    warmup, steps = plan.steps(row["batch"])
    steps = min(steps, plan.images // row["batch"] - warmup)  # its DataLoader runs one epoch of the folder
    row.update(steps=steps, report_images_per_s=train_images_per_s(
        work.inputs.folder, size=plan.size, batch=row["batch"], warmup=warmup, steps=steps, workers=plan.workers,
        device=work.dev))


def _sample_row(plan: Plan, work: Work, row: dict[str, Any]) -> None:
    from bench.inference import sample_per_s
    from runtime.config import build_config
    from vqvae.models import build_vqvae

    source = ("data.source=synthetic",) if row["preset"] == "ham128" else ()  # no image paths needed to sample
    cfg = build_config(row["preset"], ["wandb=disabled", *source, *plan.shrink])
    batch = plan.sample_batch or cfg.sample.batch_size
    grid = build_vqvae(cfg.vqvae).code_grid(cfg.data.image_size)
    row.update(batch=batch, grid="x".join(map(str, grid)), precision="bf16" if work.dev.type == "cuda" else "fp32",
               samples_per_s=sample_per_s(cfg, batch, work.dev))


class BusySampler:
    """GPU busy % (NVML's utilization.gpu: the share of time a kernel ran) read every 50 ms in a thread and kept
    while ``counting()`` says so; ``read`` None (no GPU, no reader): no samples."""

    def __init__(self, source: str, read: Callable[[], float] | None, counting: Callable[[], bool]) -> None:
        self.source, self._read = source, read
        self._counting, self.samples = counting, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            if self._read is not None and self._counting():
                self.samples.append(self._read())

    def __enter__(self) -> BusySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def busy_pct(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def utilization_reader(dev: torch.device) -> tuple[str, Callable[[], float] | None]:
    """(where the numbers come from, a reader of the GPU's busy %): NVML through nvidia-ml-py, else nvidia-smi."""
    if dev.type != "cuda":
        return "none: no GPU", None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    index = int(visible) if visible.isdigit() else 0
    try:
        import pynvml  # the nvidia-ml-py package

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return "nvml (nvidia-ml-py)", lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception as err:  # not installed, or NVML not usable: nvidia-smi reads the same counter
        why = f"{type(err).__name__}: {err}"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return f"none: nvidia-ml-py unusable ({why}) and no nvidia-smi", None
    command = [smi, f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
    return "nvidia-smi", lambda: float(subprocess.run(command, capture_output=True, text=True, timeout=10,
                                                      check=True).stdout.strip())


def logged_step(metrics: Path) -> int:
    """The last step the trainer has logged so far (0 before its first row)."""
    try:
        lines = metrics.read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError):  # not written yet, or a line being written
        return 0


def _train_row(plan: Plan, work: Work, row: dict[str, Any], ceilings: dict[tuple[str, int], float],
               problems: list[str]) -> None:
    """Ours (the trainer, busy % sampled over its timed steps, peak memory) and the ceiling of the same config
    (measured once per preset and batch of this precision); a failure of one leaves the other's numbers."""
    from bench.training import Setup, ceiling_images_per_s, ours_images_per_s, train_config
    from runtime.stages import RunLayout
    from vqvae.train import VQVAETask

    warmup, steps = plan.steps(row["batch"])
    setup = Setup(size=plan.size, batch=row["batch"], warmup=warmup, steps=steps, workers=plan.workers, repeats=1,
                  log_every=warmup, num_images=plan.images)
    extra = (*plan.shrink, f"vqvae_train.mixed_precision={'bf16' if row['precision'] == 'bf16' else 'no'}",
             "vqvae_train.gpu_path=always", f"vqvae_train.decode_on={row['decode']}")
    run_dir = work.root / "runs" / row["name"].replace(", ", "-").replace(" ", "_")
    with attempt("config", problems):
        cfg = train_config(setup, run_dir, work.dev, row["preset"], extra)
    if problems:
        return
    with attempt("ours", problems):
        metrics = RunLayout.of(cfg).stage_dir("vqvae") / "metrics.jsonl"
        if work.dev.type == "cuda":
            torch.empty(0, device=work.dev)  # CUDA initialised before its peak memory counter is reset
            torch.cuda.reset_peak_memory_stats(work.dev)

        def in_timed_steps() -> bool:  # after the log row ending the warm-up, before the last one
            return warmup <= logged_step(metrics) < warmup + steps

        with BusySampler(*utilization_reader(work.dev), in_timed_steps) as busy:
            row["ours_images_per_s"] = ours_images_per_s(work.inputs, setup, run_dir, work.dev, row["preset"], extra)
        row.update(gpu_busy_pct=busy.busy_pct, busy_samples=len(busy.samples), busy_source=busy.source)
        if work.dev.type == "cuda":
            row["peak_gpu_mib"] = torch.cuda.max_memory_allocated(work.dev) / 2**20
    with attempt("ceiling", problems):
        key = (row["preset"], row["batch"])
        if key not in ceilings:
            ceilings[key] = ceiling_images_per_s(VQVAETask(cfg, work.inputs.data_dir / "val"), setup, work.dev)
        row["ceiling_images_per_s"] = ceilings[key]
    if row["ours_images_per_s"] and row["ceiling_images_per_s"]:
        row["ours_vs_ceiling"] = row["ours_images_per_s"] / row["ceiling_images_per_s"]


@contextmanager
def attempt(what: str, problems: list[str]) -> Iterator[None]:
    """Run one measurement of a row; its failure is noted (one line, then the traceback) and the row goes on."""
    try:
        yield
    except Exception as err:
        problems.append(f"{what}: {type(err).__name__}: {err}\n{traceback.format_exc()}")


def run_job(job: str, work: Work, rows_file: Path) -> None:
    """Measure ``job``'s rows in order, appending each to ``rows_file`` (JSON lines) as soon as it is done."""
    plan = plan_for(work.dev)
    ceilings: dict[tuple[str, int], float] = {}
    measure = {"decode": _decode_row, "report": _report_row, "sample": _sample_row}
    for row in job_rows(plan, job):
        problems: list[str] = []
        start = time.perf_counter()
        if time.time() > work.deadline:
            row.update(status="skipped", error="not run: the --minutes budget was spent")
        elif row["section"] == "train":
            _train_row(plan, work, row, ceilings, problems)
        else:
            with attempt(row["section"], problems):
                measure[row["section"]](plan, work, row)
        finish(row, problems, time.perf_counter() - start)
        with open_in_place(rows_file, "ab") as fh:
            fh.write((json.dumps(row) + "\n").encode())


def finish(row: dict[str, Any], problems: list[str], seconds: float) -> None:
    """The row's status from its measurements' problems (error: their first lines), printed as one line."""
    row["seconds"] = seconds
    if problems:
        row.update(status="failed", error="; ".join(p.splitlines()[0] for p in problems)[:2000],
                   traceback="\n".join(problems)[-8000:])
    elif row["status"] == "pending":
        row["status"] = "ok"
    print(f"  {row['section']} {row['name']}: {row['status']} ({row['seconds']:.1f} s)"
          + (f": {row['error'][:300]}" if row["error"] else ""), flush=True)


# ----- the parent: smoke pipeline, inputs, jobs, results ---------------------------------------------------------

def _child_env() -> dict[str, str]:
    # This checkout's code in every child, whatever copy of lesion-vq an environment has installed (or none, as on
    # a bare GPU machine given only the wheels).
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def smoke_row(plan: Plan, root: Path, timeout: float) -> dict[str, Any]:
    """The smoke pipeline in a process of its own: exit status, seconds per stage (from its log), its log's end."""
    row = new_row("smoke", "smoke pipeline", until=plan.smoke_until)
    problems: list[str] = []
    start = time.perf_counter()
    with attempt("smoke", problems):
        _run_smoke(plan, root, timeout, row)
    finish(row, problems, time.perf_counter() - start)
    return row


_STAGE_DONE = re.compile(r"INFO pipeline: stage (\w+): done in ([\d.]+) s")
"""launch/pipeline.py's line for each stage it finished."""


def _run_smoke(plan: Plan, root: Path, timeout: float, row: dict[str, Any]) -> None:
    log = root / "logs" / "smoke.log"
    command = [sys.executable, "launch/pipeline.py", "--preset", "smoke", "--until", plan.smoke_until,
               f"run_dir={root / 'smoke'}", "wandb=disabled", *plan.smoke]
    try:
        with open_in_place(log, "ab") as out:
            row["rc"] = subprocess.run(command, cwd=REPO_ROOT, env=_child_env(), stdout=out, stderr=subprocess.STDOUT,
                                       timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"stopped after {timeout:.0f} s (the smoke pipeline gets {SMOKE_SHARE:.0%} of "
                           "--minutes)") from None
    finally:
        text = _tail(log, 10**6)
        row["stages"] = {m[1]: float(m[2]) for m in _STAGE_DONE.finditer(text)}
        row["log_tail"] = text[-3000:]
    if row["rc"] != 0:
        raise RuntimeError(f"launch/pipeline.py exited {row['rc']}: {(text.strip().splitlines() or [''])[-1][:500]}")


def prepare(plan: Plan, root: Path) -> float:
    """The shards and the report's 600x450 JPEG folder every job reads; returns the seconds it took."""
    from bench.data_loading import make_inputs
    from bench.training import VAL_FRACTION

    start = time.perf_counter()
    make_inputs(plan.images, plan.size, root / "inputs", val_fraction=VAL_FRACTION)
    return time.perf_counter() - start


def run_jobs(plan: Plan, root: Path, deadline: float, prepared: str) -> list[dict[str, Any]]:
    """Each job in a child process; rows a job did not report (it crashed or ran out of time) are failed rows."""
    rows: list[dict[str, Any]] = []
    for job in JOBS:
        expected = job_rows(plan, job)
        if prepared:
            rows += [r | {"status": "failed", "error": f"not run: preparing the inputs failed: {prepared}"}
                     for r in expected]
            continue
        if time.time() > deadline:
            rows += [r | {"status": "skipped", "error": "not run: the --minutes budget was spent"} for r in expected]
            continue
        rows_file, log = root / f"{job}.jsonl", root / "logs" / f"{job}.log"
        command = [sys.executable, "-m", "bench", "gpu", "--job", job, "--work", str(root), "--deadline", str(deadline)]
        why = ""
        with open_in_place(log, "ab") as err:
            try:
                rc = subprocess.run(command, cwd=REPO_ROOT, env=_child_env(), stderr=err, check=False,
                                    timeout=max(60.0, deadline - time.time() + 60)).returncode
                why = f"the job process exited {rc} before this row"
            except subprocess.TimeoutExpired:
                why = "the job process ran past the --minutes budget and was stopped before this row"
        done = _reported(rows_file)
        for row in expected:
            rows.append(done.get(row["name"]) or row | {"status": "failed", "error": why,
                                                          "traceback": _tail(log)})
    return rows


def _reported(rows_file: Path) -> dict[str, dict[str, Any]]:
    """The rows a job wrote, by name (a line cut short by a job killed mid-write is none)."""
    done = {}
    for line in rows_file.read_text().splitlines() if rows_file.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[row["name"]] = row
    return done


def link_rows(rows: list[dict[str, Any]]) -> None:
    """Ratios across jobs: ours against the report's loop at the same batch, bf16 against fp32."""
    report = {r["batch"]: r["report_images_per_s"] for r in rows if r["section"] == "report"}
    fp32 = {(r["preset"], r["batch"], r["decode"]): r["ours_images_per_s"]
            for r in rows if r["section"] == "train" and r["precision"] == "fp32"}
    for r in rows:
        if r["section"] != "train":
            continue
        r["report_images_per_s"] = report.get(r["batch"])
        if r["ours_images_per_s"] and r["report_images_per_s"]:
            r["ours_vs_report"] = r["ours_images_per_s"] / r["report_images_per_s"]
        base = fp32.get((r["preset"], r["batch"], r["decode"]))
        if r["precision"] == "bf16" and r["ours_images_per_s"] and base:
            r["bf16_vs_fp32"] = r["ours_images_per_s"] / base


def first_line(dev: torch.device) -> str:
    if dev.type != "cuda":
        return ("bench gpu: no GPU found (torch.cuda.is_available() is False): every row runs on the CPU path at a "
                "tiny size; none of these numbers is a GPU measurement")
    return (f"bench gpu: GPU {torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}, torch {torch.__version__}); "
            "rows at 256 px")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return str(value).replace("|", "/").replace("\n", " ")[:200]


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# lesion-vq: bench gpu ({meta['device']})", "", meta["first_line"], "",
             f"{meta['host']}: CPU {meta['cpu_model']} x {meta['cpu_cores']} cores, torch {meta['torch']}, "
             f"Python {meta['python']}, {meta['date']}; {meta['seconds']:.0f} s of a {meta['minutes']:g}-minute "
             f"budget; inputs prepared in {_cell(meta['prepare_s'])} s", ""]
    for section, fields in FIELDS.items():
        shown = [f for f in fields if f != "log_tail"]
        lines += [f"## {section}", "", "| " + " | ".join(["row", "status", *shown, "error"]) + " |",
                  "|" + "---|" * (len(shown) + 3)]
        lines += ["| " + " | ".join([r["name"], r["status"], *(_cell(r[f]) for f in shown), _cell(r["error"])]) + " |"
                  for r in rows if r["section"] == section]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="time budget; rows not started by then are "
                        "recorded as skipped (default 8)")
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/)")
    parser.add_argument("--job", choices=JOBS, help=argparse.SUPPRESS)  # a child process: one group of rows
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (math.isfinite(args.minutes) and args.minutes > 0):
        parser.error(f"--minutes must be a positive number of minutes, got {args.minutes}")
    if args.job:
        run_job(args.job, Work(args.work, args.deadline), args.work / f"{args.job}.jsonl")
        return 0

    dev = device()
    line = first_line(dev)
    print(line, flush=True)
    plan, started = plan_for(dev), time.time()
    deadline = started + args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        root = Path(tmp)
        (root / "logs").mkdir()
        print(f"  smoke pipeline (at most {SMOKE_SHARE * args.minutes:.1f} min) ...", flush=True)
        rows = [smoke_row(plan, root, max(30.0, SMOKE_SHARE * args.minutes * 60))]
        prepared, prepare_s = "", None
        try:
            prepare_s = prepare(plan, root)
        except Exception as err:
            prepared = f"{type(err).__name__}: {err}"
        rows += run_jobs(plan, root, deadline, prepared)
        link_rows(rows)
        meta = machine() | {"first_line": line, "gpu": dev.type == "cuda", "minutes": args.minutes,
                            "seconds": time.time() - started, "prepare_s": prepare_s, "plan": asdict(plan)}
        out = args.out or default_out().parent
        stem = f"gpu-{default_out().name}"
        md, js = out / f"{stem}.md", out / f"{stem}.json"
        atomic_write_json(js, {"meta": meta, "rows": rows})
        atomic_write_text(md, markdown(rows, meta))
        for log in sorted((root / "logs").glob("*.log")):  # what a GPU run printed, for the one who reads it later
            atomic_write_text(out / f"{stem}-{log.name}", log.read_text(errors="replace"))
    print(md.read_text())
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    print(f"written: {md} and {js}; rows: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped")
    return 1 if counts["failed"] else 0
