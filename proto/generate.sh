#!/usr/bin/env bash
# Produce the Python stubs in csi/generated/ from the official CSI spec release.
#
# The spec is fetched as the Go module github.com/container-storage-interface/spec at a
# pinned version: the Go toolchain verifies the module against the public checksum
# database, and this script checks csi.proto against a pinned SHA-256 as well, so the
# input is the exact file the CSI community released. The stubs are generated with the
# pinned grpcio-tools from the project's dev dependencies; generation is reproducible and
# tests/test_generated.py proves that the committed stubs match.
#
# Usage: proto/generate.sh [OUTPUT_ROOT]   (default: the repository root)
set -euo pipefail

SPEC_MODULE=github.com/container-storage-interface/spec
SPEC_VERSION=v1.12.0
SPEC_SHA256=5b81236a3809f3ff0b877ff9b82215d0b74a8e291d7f3ec6ee1a44f537c0f86a

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out=${1:-$root}
python=${PYTHON:-python3}

spec_dir=$(cd "$(mktemp -d)" && GOFLAGS=-mod=mod go mod download -json "$SPEC_MODULE@$SPEC_VERSION" \
  | "$python" -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
echo "$SPEC_SHA256  $spec_dir/csi.proto" | sha256sum --check --quiet

# The proto is placed at csi/generated/csi.proto so that the generated modules import
# each other as `csi.generated.csi_pb2`, inside this package.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/csi/generated" "$out/csi/generated"
cp "$spec_dir/csi.proto" "$work/csi/generated/csi.proto"
"$python" -m grpc_tools.protoc -I "$work" \
  --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  "$work/csi/generated/csi.proto"
echo "$SPEC_VERSION" > "$out/csi/generated/SPEC_VERSION"
