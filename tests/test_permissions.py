"""Written files honour the umask: colleagues on a shared cluster can read reports, shards and weights.

``tempfile.mkstemp`` / ``mkdtemp`` create 0o600 / 0o700 entries that a rename would keep. The umask is
read once when ``runtime.files`` is imported, so each case runs in a fresh interpreter that sets its
umask first (and the test process's own umask is never touched).
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

_WRITER = """
import os, sys
os.umask(int(sys.argv[1], 8))
from pathlib import Path
import torch
from runtime.checkpoint import TrainState, save_checkpoint, save_weights
from runtime.files import atomic_path, atomic_write_json
out = Path(sys.argv[2])
atomic_write_json(out / "report" / "metrics.json", {"psnr": 25.0})
with atomic_path(out / "data" / "shard-000000.tar") as tmp:
    tmp.write_bytes(b"shard")
model = torch.nn.Linear(2, 2)
save_weights(model, out / "final" / "model.safetensors")
save_checkpoint(out / "checkpoints", model, torch.optim.SGD(model.parameters(), lr=0.1), TrainState(step=1))
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [
    (0o022, 0o644, 0o755),
    (0o002, 0o664, 0o775),  # a group-shared project folder
    (0o077, 0o600, 0o700),
])
@pytest.mark.slow
def test_outputs_get_the_modes_the_umask_allows(tmp_path: Path, umask: int, file_mode: int, dir_mode: int) -> None:
    result = subprocess.run([sys.executable, "-c", _WRITER, f"{umask:o}", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for written in ("report/metrics.json", "data/shard-000000.tar", "final/model.safetensors"):
        assert oct(_mode(tmp_path / written)) == oct(file_mode), written
    checkpoint = tmp_path / "checkpoints" / "step-00000001"
    assert oct(_mode(checkpoint)) == oct(dir_mode)
    files = sorted(checkpoint.iterdir())
    assert [p.name for p in files] == ["model.safetensors", "optimizer.pt", "rng.pt", "state.json"]
    for path in files:
        assert oct(_mode(path)) == oct(file_mode), path.name
    assert not list(tmp_path.rglob("*.tmp-*"))  # nothing left behind by the writers
