#!/usr/bin/env bash
# Install lesion-vq into ./.venv and run the whole pipeline on built-in synthetic data (smoke preset).
# Extra arguments go to launch/pipeline.py, e.g. `scripts/demo.sh --processes 2`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
install_project .
exec .venv/bin/python launch/pipeline.py "$@"
