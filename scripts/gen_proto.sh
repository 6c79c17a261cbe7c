#!/usr/bin/env bash
# Regenerate the gRPC/protobuf code in astraea/v1/ from proto/astraea/v1/*.proto.
# The generated files are committed; tests/test_proto.py fails when they are stale.
# Needs the pinned grpcio-tools of the `test` extra: pip install -e '.[test]'.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. proto/astraea/v1/*.proto
