#!/usr/bin/env bash
# The main job: install what is needed, then train with every party in this
# process on the default dataset (fashion-mnist when installed, else digits).
# On fashion-mnist (60,000 training images) that is release once with the owner-light
# cnn-light preset at config.ONCE_TARGET_EPSILON; on digits every-epoch
# (config.RELEASE_BY_SIZE).
# Extra arguments go to `clicooper run` (e.g. --epochs 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/clicooper run --out runs/default --overwrite "$@"
