#!/usr/bin/env bash
# Install lesion-vq with its test extras into ./.venv, bring up the local single-node Slurm
# (root only: apt-get + daemons, see slurm/local-cluster.sh) and run the whole test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k loader`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
install_project '.[dev]'
if [ "$(id -u)" = 0 ]; then
    slurm/local-cluster.sh up --nodes 2
else
    echo "not root: Slurm tests will be skipped (set LESION_VQ_REQUIRE_SLURM=1 to make that an error)" >&2
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
