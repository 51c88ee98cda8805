#!/usr/bin/env bash
# Regenerate the committed protobuf/gRPC modules from src/clicooper/proto/clicooper.proto.
# The generated files are committed so that users need grpcio and protobuf but not
# grpcio-tools; run this after editing the .proto (needs the dev extra: grpcio-tools).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
cd "$ROOT/src"
"$PYTHON" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  clicooper/proto/clicooper.proto
# The .pyi stub is linted like hand-written code (pyproject only excludes *_pb2*.py),
# so normalise it with ruff.
RUFF="${RUFF:-$ROOT/.venv/bin/ruff}"
"$RUFF" check --quiet --fix-only clicooper/proto/clicooper_pb2.pyi
"$RUFF" format --quiet clicooper/proto/clicooper_pb2.pyi
echo "regenerated src/clicooper/proto/clicooper_pb2.py, clicooper_pb2.pyi, clicooper_pb2_grpc.py"
