"""Shared command-line behaviour: config arguments, and expected failures as one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from runtime.config import add_config_args
from runtime.errors import NonFiniteLossError, UserError

EXIT_USAGE = 2
EXIT_NONFINITE = 3


def stage_parser(description: str, *, training: bool = False, array_task: bool = False) -> argparse.ArgumentParser:
    """Config arguments, plus ``--resume`` for training stages or the task slot for array stages."""
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser)
    if training:
        parser.add_argument("--resume", default="auto",
                            help="auto (newest good checkpoint), none, or a checkpoint directory")
    if array_task:
        from runtime.array_task import add_task_args

        add_task_args(parser)
    return parser


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser) -> NoReturn:
    """Parse, run, and turn the errors a user can fix into a message and a status, not a traceback.
    A process started by one of our launchers dies with it (runtime/process.py)."""
    from runtime.process import honour_parent_watch
    from runtime.signals import EXIT_INTERRUPTED

    honour_parent_watch()
    args = parser.parse_args()
    try:
        sys.exit(main(args))
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which checkpoints and exits 130 itself)
        print(f"interrupted: {parser.prog} stopped; rerun the same command to continue", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
