#!/usr/bin/env bash
# The main job: install what is needed, then train with every party in this
# process on the default dataset (fashion-mnist when installed, else digits).
# Extra arguments go to `clicooper run` (e.g. --epochs 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/clicooper run --out runs/default --overwrite "$@"
