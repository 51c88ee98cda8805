#!/usr/bin/env bash
# Idempotent set-up into a project-local virtual environment (.venv):
# the CPU build of torch 2.13.0 first (a looser pin may pull a multi-GB CUDA
# build), then the package with its dev extras; Fashion-MNIST from Debian's
# package where root can install it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.clicooper-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
if [[ ! -d /usr/share/datasets/fashion-mnist ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) ||
      echo "note: could not install dataset-fashion-mnist; the digits dataset will be used instead" >&2
  else
    echo "note: not root, so dataset-fashion-mnist is not installed; the digits dataset will be used instead" >&2
  fi
fi
