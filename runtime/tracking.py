"""Metrics go to one local JSONL per stage (read by the report and tests) and to wandb (offline by default)."""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from runtime.files import atomic_write_text, naming, open_in_place
from runtime.log import get_logger

log = get_logger(__name__)


class RunLogger:
    """Main-process metric sink. Construct on every rank; only ``enabled`` ranks write."""

    def __init__(self, out_dir: Path, stage: str, config: dict[str, Any], *, enabled: bool,
                 wandb_mode: str, resume_step: int) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self._wandb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._drop_rows_after(resume_step)
        if wandb_mode != "disabled":
            self._wandb = _start_wandb(out_dir, stage, config, wandb_mode)

    def _drop_rows_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint; drop their old rows so none appear twice."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float], images: dict[str, Path] | None = None) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with naming(self.path), open_in_place(self.path, "ab") as fh:  # appended: never through a symlink
            fh.write((json.dumps(row) + "\n").encode())
        if self._wandb is not None:
            import wandb

            payload: dict[str, Any] = dict(metrics)
            for key, path in (images or {}).items():
                payload[key] = wandb.Image(str(path))
            self._wandb.log(payload, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _plain(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


ONLINE_WAIT_S = 10
"""How long an online wandb run may take to reach its server before tracking falls back to offline (wandb itself
waited 90 s and more in silence per training stage, on every node without network)."""


def _unreachable(url: str) -> str | None:
    """None when ``url`` answers (any HTTP status) within ONLINE_WAIT_S, else why not."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=ONLINE_WAIT_S).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as err:
        return f"{url}: {getattr(err, 'reason', None) or err}"
    return None


def _start_wandb(out_dir: Path, stage: str, config: dict[str, Any], mode: str):
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    id_file = out_dir / "wandb-id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
    atomic_write_text(id_file, run_id)

    def start(how: str) -> Any:
        # resume="allow" with a stored id: a requeued job continues the same wandb run.
        return wandb.init(project="lesion-vq", dir=str(out_dir), mode=how, id=run_id, resume="allow",
                          name=f"{stage}-{Path(config.get('run_dir', 'run')).name}", job_type=stage,
                          config=config, settings=wandb.Settings(init_timeout=ONLINE_WAIT_S))

    server = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
    reason = _unreachable(server) if mode == "online" else None
    if reason is None:
        try:
            return start(mode)
        except Exception as err:  # wandb is never required: tracking falls back, training goes on
            reason = " ".join(str(err).split())[:160] or type(err).__name__
    if mode == "online":
        log.warning("wandb online unreachable within %d s (%s); tracking fell back to offline in %s (upload later "
                    "with `wandb sync %s/wandb/offline-run-*`)", ONLINE_WAIT_S, reason, out_dir, out_dir)
        try:
            return start("offline")
        except Exception as err:
            reason = " ".join(str(err).split())[:160] or type(err).__name__
    log.warning("wandb %s disabled: %s", mode, reason)
    return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
