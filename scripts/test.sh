#!/usr/bin/env bash
# The test suite: install what is needed, then lint and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
# Two workers, one per core; a test file stays on one worker, so its module fixtures
# (a whole quick evaluation, a trained run) are built once. Files are handed out in the
# order tests/conftest.py sets (slowest first), not the one xdist picks since 3.5 (most
# tests first; the flag needs xdist 3.8).
# --durations: the slowest tests of every run are in its log (the suite's time budget).
.venv/bin/pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=20 "$@"
