#!/usr/bin/env bash
# Build what the cluster tier runs, from the Go module proxy only, into a cache outside
# the clone keyed on every version below (and on this script), so a second run builds
# nothing:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl
#   csi-provisioner, csi-attacher, csi-snapshotter, snapshot-controller (the chart's pins)
#
#   tests/cluster/build/binaries.sh        prints the directory that holds the binaries
#
# Kubernetes is used as a library: a wrapper module requires k8s.io/kubernetes and
# replaces each of its staging modules (local paths in its own go.mod) with the release
# of the same number. The sidecars' go.mod files carry replace lines, which `go install`
# refuses, so each is built from a wrapper module that copies them.
set -euo pipefail

k8s_version=${K8S_VERSION:-v1.37.2}
provisioner_version=${PROVISIONER_VERSION:-v6.4.0}
attacher_version=${ATTACHER_VERSION:-v4.13.0}
snapshotter_version=${SNAPSHOTTER_VERSION:-v8.7.0}
cache=${CAIRN_CACHE:-/var/cache/cairn}

here=$(cd "$(dirname "$0")" && pwd)
key=$( { echo "$k8s_version $provisioner_version $attacher_version $snapshotter_version"
         cat "$here/binaries.sh"; } | sha256sum | cut -c1-12)
out="$cache/cluster-bin-$k8s_version-$key"
if [ -e "$out/.complete" ]; then
  echo "$out"
  exit 0
fi
command -v go >/dev/null || { echo "building the cluster binaries needs Go (1.26 or newer)" >&2; exit 1; }

work="$cache/cluster-build"
mkdir -p "$work" "$out"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
log() { echo "$(date +%T) $*" >&2; }
gomod_of() { go mod download -json "$1@$2" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p'; }
go_line() { awk '/^go /{print $2; exit}' "$1"; }

# Kubernetes
mkdir -p "$work/kubernetes" && cd "$work/kubernetes"
modfile=$(gomod_of k8s.io/kubernetes "$k8s_version")
staging=v0.${k8s_version#v1.}
{
  printf 'module cairn.local/kubernetes\n\ngo %s\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' \
    "$(go_line "$modfile")" "$k8s_version"
  # sample-* modules are neither needed nor served by the proxy
  sed -n '/^replace (/,/^)/p' "$modfile" | awk '/=> \.\/staging/ {print $1}' |
    grep -v -e '^k8s.io/sample-cli-plugin$' -e '^k8s.io/sample-controller$' |
    while read -r module; do printf '\t%s => %s %s\n' "$module" "$module" "$staging"; done
  printf ')\n'
} > go.mod
commands=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
{
  printf '//go:build tools\n\npackage kubernetes\n\nimport (\n'
  for command in "${commands[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$command"; done
  printf ')\n'
} > tools.go
rm -f go.sum
go mod tidy
major=${k8s_version#v}; major=${major%%.*}; minor=${k8s_version#v*.}; minor=${minor%%.*}
flags="-s -w"
for package in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  flags+=" -X $package.gitVersion=$k8s_version -X $package.gitMajor=$major -X $package.gitMinor=$minor"
  flags+=" -X $package.gitTreeState=clean -X $package.buildDate=2000-01-01T00:00:00Z"
done
for command in "${commands[@]}"; do
  log "building $command $k8s_version"
  go build -ldflags "$flags" -o "$out/$command" "k8s.io/kubernetes/cmd/$command"
done

# CSI sidecars
sidecar() {  # name module version package...
  local name=$1 module=$2 version=$3; shift 3
  mkdir -p "$work/$name" && cd "$work/$name"
  local modfile; modfile=$(gomod_of "$module" "$version")
  {
    printf 'module cairn.local/%s\n\ngo %s\n\nrequire %s %s\n\n' "$name" "$(go_line "$modfile")" "$module" "$version"
    grep -E '^replace .*=> [^./]' "$modfile" || true
    sed -n '/^replace (/,/^)/p' "$modfile" | grep -v -e '=> \.' -e '=> /' || true
  } > go.mod
  {
    printf '//go:build tools\n\npackage wrap\n\nimport (\n'
    for package in "$@"; do printf '\t_ "%s"\n' "$package"; done
    printf ')\n'
  } > tools.go
  rm -f go.sum
  go mod tidy
  for package in "$@"; do
    log "building ${package##*/} $version"
    go build -ldflags "-s -w" -o "$out/${package##*/}" "$package"
  done
}
sidecar csi-provisioner github.com/kubernetes-csi/external-provisioner/v6 "$provisioner_version" \
  github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner
sidecar csi-attacher github.com/kubernetes-csi/external-attacher/v4 "$attacher_version" \
  github.com/kubernetes-csi/external-attacher/v4/cmd/csi-attacher
sidecar csi-snapshotter github.com/kubernetes-csi/external-snapshotter/v8 "$snapshotter_version" \
  github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter \
  github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller

touch "$out/.complete"
# Builds for other versions are of no further use.
for old in "$cache"/cluster-bin-*; do
  [ "$old" = "$out" ] || rm -rf "$old"
done
echo "$out"
