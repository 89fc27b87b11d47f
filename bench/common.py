"""Shared pieces of the benchmarks: result rows, the device, the machine description, output files.

Every measurement is a :class:`Row` that names the row of the same benchmark it is compared with
(its ``baseline``; a baseline row names itself), so a table can always print ``value / baseline``
for numbers measured side by side in one run.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from runtime.files import atomic_write_json, atomic_write_text


@dataclass
class Row:
    bench: str
    name: str
    value: float
    unit: str
    baseline: str
    """``name`` of the row (same ``bench``) this one is divided by; a baseline names itself."""
    note: str = ""


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(dev: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (as the pipeline's encode/sample stages do), a no-op on CPU."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def channels_last(dev: torch.device) -> torch.memory_format:
    """channels_last helps convolutions on tensor-core GPUs; on CPU keep the default layout."""
    return torch.channels_last if dev.type == "cuda" else torch.contiguous_format


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextmanager
def timed(dev: torch.device) -> Iterator[list[float]]:
    """``with timed(dev) as t: ...`` then ``t[0]`` is the elapsed seconds (device work included)."""
    result: list[float] = []
    synchronize(dev)
    start = time.perf_counter()
    yield result
    synchronize(dev)
    result.append(time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    dev = device()
    return {
        "host": socket.gethostname(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def with_ratios(rows: list[Row]) -> list[dict[str, Any]]:
    by_name = {(r.bench, r.name): r.value for r in rows}
    out = []
    for r in rows:
        base = by_name[(r.bench, r.baseline)]
        out.append(asdict(r) | {"ratio": r.value / base if base else float("nan")})
    return out


QUICK_NOTE = ("**Quick run (`--quick`): the ratios below mean nothing.** Inputs are shrunk so that every "
              "benchmark takes seconds; start-up, warm-up and timer noise dominate at that size. It only checks "
              "that every benchmark runs; compare speeds with a full run (`python -m bench all`).")
"""Printed above the table of a quick run, so nobody quotes its ratios."""


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# lesion-vq benchmarks ({'quick' if meta.get('quick') else 'full'})", "",
             f"{meta['host']}: {meta['device']}, CPU {meta['cpu_model']} x {meta['cpu_cores']} cores, "
             f"torch {meta['torch']}, Python {meta['python']}, {meta['date']}", ""]
    if meta.get("quick"):
        lines += [QUICK_NOTE, ""]
    lines += ["| bench | measurement | value | unit | baseline | ratio | notes |", "|---|---|---:|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['bench']} | {r['name']} | {r['value']:.4g} | {r['unit']} | {r['baseline']} | "
                     f"{r['ratio']:.2f} | {r['note']} |")
    return "\n".join(lines) + "\n"


def default_out() -> Path:
    dev = device()
    name = torch.cuda.get_device_name(dev).replace(" ", "_") if dev.type == "cuda" else "cpu"
    return Path(__file__).resolve().parent / "results" / f"{socket.gethostname()}-{name}"


def write_results(rows: list[Row], out_dir: Path | None, quick: bool) -> tuple[Path, Path]:
    """``<out>/<host>-<device>.{md,json}`` (default ``bench/results/``); returns both paths."""
    stem = default_out().name
    base = (out_dir / stem) if out_dir else default_out()
    meta = machine() | {"quick": quick}
    table = with_ratios(rows)
    md, js = base.with_suffix(".md"), base.with_suffix(".json")
    atomic_write_text(md, markdown(table, meta))
    atomic_write_json(js, {"meta": meta, "rows": table})
    return md, js


def read_rows(path: Path) -> list[Row]:
    fields = Row.__dataclass_fields__
    return [Row(**{k: v for k, v in r.items() if k in fields}) for r in json.loads(path.read_text())["rows"]]
