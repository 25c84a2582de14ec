#!/usr/bin/env bash
# Render deploy/cairn-csi.yaml from the chart with its default values (namespace
# kube-system, oldest supported Kubernetes). --stdout prints instead of writing; the
# chart tests compare the two so deploy/ never drifts from the chart.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
helm=${HELM:-$(command -v helm || echo "$root/.tools/bin/helm")}
rendered=$({
  echo "# Rendered from charts/cairn-csi with default values by deploy/render.sh; do not edit."
  echo "# Install: kubectl apply -f charts/cairn-csi/crds/ (the snapshot CRDs, unless the cluster has them),"
  echo "# then kubectl apply -f deploy/cairn-csi.yaml."
  "$helm" template cairn "$root/charts/cairn-csi" --namespace kube-system --kube-version 1.30.0
})
if [ "${1:-}" = "--stdout" ]; then
  printf '%s\n' "$rendered"
else
  printf '%s\n' "$rendered" > "$root/deploy/cairn-csi.yaml"
fi
