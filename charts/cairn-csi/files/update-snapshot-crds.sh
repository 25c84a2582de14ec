#!/usr/bin/env bash
# Fetch the CRDs of the pinned external-snapshotter release into DIR (default: the chart's
# crds/ directory, which Helm installs before the templates): the VolumeSnapshot ones, and
# the VolumeGroupSnapshot ones its snapshot-controller looks for at start-up (without them it
# waits 30 s before it serves). They come from the Go module proxy, whose checksum database
# verifies them; tests/charts/test_chart.py checks the copies match.
set -euo pipefail
version=v8.7.0
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$(dirname "$here")/crds}
scratch=$(mktemp -d)  # outside any Go module, removed at the end
trap 'rm -rf "$scratch"' EXIT
dir=$(cd "$scratch" && GOFLAGS=-mod=mod go mod download -json "github.com/kubernetes-csi/external-snapshotter/client/v8@$version" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
mkdir -p "$out"
cp "$dir"/config/crd/snapshot.storage.k8s.io_*.yaml "$dir"/config/crd/groupsnapshot.storage.k8s.io_*.yaml "$out/"
chmod 644 "$out"/*.yaml
