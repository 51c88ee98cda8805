#!/usr/bin/env bash
# The test suite: install what is needed, then lint and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/pytest "$@"
