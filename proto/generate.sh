#!/usr/bin/env bash
# Produce the Python stubs in csi/generated/ from the official releases of the two APIs the
# driver serves:
#   - the CSI spec (csi.proto), from the Go module github.com/container-storage-interface/spec;
#   - the kubelet's plugin-registration API (pkg/apis/pluginregistration/v1/api.proto), from
#     the Go module k8s.io/kubelet of the Kubernetes release the driver is tested with; the
#     node plugin serves it itself when it registers with the kubelet without the
#     node-driver-registrar sidecar (csi/registration.py).
#
# Each is fetched as a Go module at a pinned version: the Go toolchain verifies the module
# against the public checksum database, and this script checks each .proto against a pinned
# SHA-256 as well, so the input is the exact file its community released. The stubs are
# generated with the pinned grpcio-tools from the project's dev dependencies; generation is
# reproducible and tests/test_generated.py proves that the committed stubs match.
#
# Usage: proto/generate.sh [OUTPUT_ROOT]   (default: the repository root)
set -euo pipefail

SPEC_MODULE=github.com/container-storage-interface/spec
SPEC_VERSION=v1.12.0
SPEC_SHA256=5b81236a3809f3ff0b877ff9b82215d0b74a8e291d7f3ec6ee1a44f537c0f86a

KUBELET_MODULE=k8s.io/kubelet
KUBELET_VERSION=v0.37.2   # Kubernetes v1.37.2
REGISTRATION_PROTO=pkg/apis/pluginregistration/v1/api.proto
REGISTRATION_SHA256=7a67a0000a1a167c155286834bc9ccb489f8bcdb394e006daba270189c272afa

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out=${1:-$root}
python=${PYTHON:-python3}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The directory of a Go module, downloaded (and verified) into the module cache. Run
# from the scratch directory: outside any Go module, and removed at the end.
module_dir() {
  (cd "$work" && GOFLAGS=-mod=mod go mod download -json "$1" \
    | "$python" -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
}

spec_dir=$(module_dir "$SPEC_MODULE@$SPEC_VERSION")
echo "$SPEC_SHA256  $spec_dir/csi.proto" | sha256sum --check --quiet
kubelet_dir=$(module_dir "$KUBELET_MODULE@$KUBELET_VERSION")
echo "$REGISTRATION_SHA256  $kubelet_dir/$REGISTRATION_PROTO" | sha256sum --check --quiet

# Each proto is placed under csi/generated/ so that the generated modules import each other
# as `csi.generated.<name>_pb2`, inside this package. The registration proto is used as
# released: it imports nothing, and its package (`pluginregistration`) is the wire name
# the kubelet calls.
mkdir -p "$work/csi/generated" "$out/csi/generated"
cp "$spec_dir/csi.proto" "$work/csi/generated/csi.proto"
cp "$kubelet_dir/$REGISTRATION_PROTO" "$work/csi/generated/pluginregistration.proto"
for proto in csi pluginregistration; do
  "$python" -m grpc_tools.protoc -I "$work" \
    --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
    "$work/csi/generated/$proto.proto"
done
echo "$SPEC_VERSION" > "$out/csi/generated/SPEC_VERSION"
echo "$KUBELET_VERSION" > "$out/csi/generated/KUBELET_VERSION"
