#!/usr/bin/env bash
# Install lesion-vq with its test extras into ./.venv and run ruff and the tests.
#
#   scripts/test.sh           the whole suite on 2 pytest-xdist workers (LESION_VQ_TEST_WORKERS; 0 = in this
#                             process), a module's tests and all Slurm tests each on one worker; also brings up
#                             the local two-node Slurm (root only: apt-get + daemons, see slurm/local-cluster.sh)
#   scripts/test.sh --fast    the fast tier: in-process tests only (not slow, not slurm), no Slurm
#
# Further arguments go to pytest, e.g. `scripts/test.sh --fast -k loader`.
set -euo pipefail
cd "$(dirname "$0")/.."
fast=0
if [ "${1:-}" = "--fast" ]; then
    fast=1
    shift
fi
source scripts/_venv.sh
install_project '.[dev]'
.venv/bin/ruff check .
if [ "$fast" = 1 ]; then
    exec .venv/bin/python -m pytest -m "not slow and not slurm" "$@"
fi
if [ "$(id -u)" = 0 ]; then
    slurm/local-cluster.sh up --nodes 2
else
    echo "not root: Slurm tests will be skipped (set LESION_VQ_REQUIRE_SLURM=1 to make that an error)" >&2
fi
workers="${LESION_VQ_TEST_WORKERS:-2}"
if ! [[ "$workers" =~ ^[0-9]+$ ]]; then
    echo "error: LESION_VQ_TEST_WORKERS=$workers is not a whole number of pytest workers (0 = none)" >&2
    exit 2
fi
if [ "$workers" -gt 0 ]; then
    set -- -n "$workers" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest "$@"
