"""Turn Slurm's pre-emption / time-limit warning, SIGTERM and Ctrl-C into "checkpoint at the next step, then exit".

Slurm sends a configurable signal (``--signal=USR2@120``; USR2 is also submitit's default, USR1 can
clash with NCCL) some seconds before it kills a job, and SIGTERM on ``scancel``/pre-emption. The
handler only records the request; the training loop acts on it at a step boundary, after agreeing
across ranks (one rank may receive the signal earlier than another). Ctrl-C (SIGINT) behaves the
same but exits 130, as a shell reports an interrupted command; every other stop exits 75 (requeue).
"""

from __future__ import annotations

import signal
from types import FrameType

EXIT_REQUEUE = 75
"""Exit status meaning "checkpoint saved, please requeue me" (EX_TEMPFAIL); slurm/*.sh and the
pipeline's submitit jobs requeue on it."""
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT): checkpoint saved, not to be requeued."""
STOP_STATUSES = (EXIT_REQUEUE, EXIT_INTERRUPTED)


class StopRequest:
    def __init__(self, signal_names: tuple[str, ...] = ("USR2", "TERM")) -> None:
        self.received: str | None = None
        for name in dict.fromkeys(signal_names):
            signal.signal(getattr(signal, f"SIG{name}"), self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def exit_status(self) -> int:
        return EXIT_INTERRUPTED if self.received == "SIGINT" else EXIT_REQUEUE

    @property
    def meaning(self) -> str:
        return "interrupted; rerun to resume" if self.received == "SIGINT" else "to be requeued or rerun"
