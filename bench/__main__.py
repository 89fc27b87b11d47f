"""Benchmarks of the lesion-vq pipeline against their baselines, measured side by side in one run.

    python -m bench all [--quick] [--out DIR]      # every benchmark, one table
    python -m bench {data,scaling,train,ddp,encode,sample,memory} [--quick] [--out DIR]
    python -m bench gpu [--minutes 8] [--out DIR]     # the GPU path proven and measured (docs/gpu.md)

Writes ``<host>-<device>.md`` (table) and ``.json`` (rows + machine) to DIR (default
``bench/results/``); every row has a ratio to its baseline row. ``all`` runs each benchmark in its
own subprocess, so thread settings and allocator state never leak from one into the next.
``--quick`` shrinks every input so the whole run takes about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.common import Row, read_rows, write_results
from runtime.launcher import REPO_ROOT


def _data(quick: bool) -> list[Row]:
    from bench import data_loading

    images, size, batch = (32, 64, 8) if quick else (512, 256, 32)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        return data_loading.rows(data_loading.run(images, size, batch, Path(tmp)))


def _train(quick: bool) -> list[Row]:
    from bench import training

    return training.run(quick)


def _ddp(quick: bool) -> list[Row]:
    from bench import ddp

    return ddp.run(quick)


def _encode(quick: bool) -> list[Row]:
    from bench import inference

    return inference.run_encode(quick)


def _sample(quick: bool) -> list[Row]:
    from bench import inference

    return inference.run_sample(quick)


def _scaling(quick: bool) -> list[Row]:
    from bench import scaling

    return scaling.run(quick)


def _memory(quick: bool) -> list[Row]:
    from bench import memory

    return memory.run(quick)


BENCHMARKS: dict[str, Callable[[bool], list[Row]]] = {
    "data": _data, "scaling": _scaling, "train": _train, "ddp": _ddp, "encode": _encode, "sample": _sample,
    "memory": _memory,
}


def _all(quick: bool) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        for name in BENCHMARKS:
            out = Path(tmp) / name
            argv = [sys.executable, "-m", "bench", name, "--out", str(out), *(["--quick"] if quick else [])]
            print(f"== bench {name}", file=sys.stderr, flush=True)
            subprocess.run(argv, cwd=REPO_ROOT, env=os.environ | {"WANDB_MODE": "disabled"}, check=True,
                           stdout=subprocess.DEVNULL)  # its table is part of ours
            rows += read_rows(next(out.glob("*.json")))
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["quality"]:  # real data, its own options and tens of minutes: not part of `all`
        from bench.quality import main as quality

        return quality(argv[1:])
    if argv[:1] == ["gpu"]:  # every GPU fact in one command, each group of rows in its own process: not in `all`
        from bench.gpu import main as gpu

        raise SystemExit(gpu(argv[1:]))
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--quick", action="store_true", help="tiny inputs: seconds per benchmark (smoke test)")
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    rows = _all(args.quick) if args.benchmark == "all" else BENCHMARKS[args.benchmark](args.quick)
    md, js = write_results(rows, args.out, args.quick)
    print(md.read_text())
    print(f"written: {md} and {js}")
    if args.quick:  # again below the table, where a long table leaves the reader
        print("note: quick run: inputs too small for the ratios to mean anything; compare full runs only")


if __name__ == "__main__":
    main()
