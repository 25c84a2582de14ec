#!/usr/bin/env bash
# Build the Cairn image from the repository's own, unchanged Dockerfile without a container
# engine, as a docker-archive that `ctr -n k8s.io images import` loads, tagged the way the
# chart names it (image.repository, and image.tag or else the chart's appVersion):
#
#   tests/cluster/build/image.sh [CONTEXT]   prints the archive's path as its last line
#
# CONTEXT (default: this clone) holds the Dockerfile and what it copies. The steps:
#   1. the Dockerfile's base, debian:bookworm-slim, made the way the official image is made:
#      mmdebstrap's minbase variant, /usr merged by symlinks as debootstrap does it (the
#      usrmerge package would bring perl along), without documentation, man pages and
#      locales, from Debian's mirror. The rootfs tar is cached, keyed on the suite and on
#      the function below that makes it, and imported into a private containers storage;
#   2. `buildah bud` of the Dockerfile with buildah's layer cache;
#   3. `buildah push` to a docker-archive.
# The archive is keyed on the content of the Dockerfile and of every file it copies, so an
# unchanged tree builds nothing, and a change under csi/ costs only the steps from its COPY on.
# Everything lives in the cache directory, outside the clone: the archives in images/ (the
# three newest stay), the base and the storage in image-build/. The build runs in a mount
# namespace of its own, so no mount outlives it, even when it is killed; a second build
# waits for the first.
#
# Environment:
#   CAIRN_CACHE            cache directory (default /var/cache/cairn)
#   CAIRN_BUILD_CA_BUNDLE  CA bundle that pip inside the build trusts, for build hosts behind
#                          a TLS-inspecting proxy (default: /etc/ssl/certs/ca-certificates.crt
#                          when the host has it; empty: pip keeps the image's own CAs)
#   CAIRN_DEBIAN_MIRROR    Debian mirror of the base (default http://deb.debian.org/debian)
#
# Needs root, buildah, runc and mmdebstrap.
set -euo pipefail

# The script runs itself again for the build, inside its mount namespace:
#   image.sh --in-namespace CONTEXT STAGED_CONTEXT ARCHIVE
in_namespace=""
if [ "${1:-}" = --in-namespace ]; then
  in_namespace=1
  shift
fi
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
context=$(cd "${1:-$root}" && pwd)
cache=${CAIRN_CACHE:-/var/cache/cairn}
work="$cache/image-build"
archives="$cache/images"
suite=bookworm
mirror=${CAIRN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
default_ca=/etc/ssl/certs/ca-certificates.crt
[ -r "$default_ca" ] || default_ca=""
ca_bundle=${CAIRN_BUILD_CA_BUNDLE-$default_ca}

log() { echo "image.sh: $(date +%T) $*" >&2; }

# The tag the chart asks for: charts/cairn-csi/templates/_helpers.tpl "cairn.image".
chart_reference() {
  local chart="$root/charts/cairn-csi" repository tag
  repository=$(awk '/^image:/ {inside = 1; next} /^[^ #]/ {inside = 0}
                    inside && $1 == "repository:" {print $2; exit}' "$chart/values.yaml")
  tag=$(awk '/^image:/ {inside = 1; next} /^[^ #]/ {inside = 0}
             inside && $1 == "tag:" {gsub(/"/, "", $2); print $2; exit}' "$chart/values.yaml")
  [ -n "$tag" ] || tag=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$chart/Chart.yaml")
  echo "$repository:$tag"
}

# The context paths the Dockerfile copies (COPY and ADD sources, one-line form; a copy from
# another stage names no context path).
copied_paths() {
  awk 'toupper($1) == "COPY" || toupper($1) == "ADD" {
         if ($0 ~ /--from=/) next
         for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i
       }' "$context/Dockerfile" | sort -u
}

# The build context exactly as the Dockerfile sees it, minus Python's bytecode caches (which
# a working tree has and the image must not). Modification times are kept: buildah's layer
# cache compares them for COPY.
stage_context() {  # $1: directory to fill
  local paths
  mapfile -t paths < <(copied_paths)
  tar -C "$context" -c --exclude=__pycache__ --exclude='*.pyc' Dockerfile "${paths[@]}" | tar -C "$1" -x
}

content_hash() {  # $1: directory; names, modes and bytes, not times or owners
  tar -C "$1" -c --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner . | sha256sum | cut -c1-16
}

# Step 1, kept in one function: its text is part of the base's cache key.
make_base_rootfs() {  # $1: output tar
  mmdebstrap --variant=minbase --mode=root --format=tar \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    "$suite" "$1" \
    "deb $mirror $suite main" "deb $mirror $suite-updates main" \
    "deb ${mirror%/debian}/debian-security $suite-security main" </dev/null >&2
}

base_key=$( { echo "$suite"; declare -f make_base_rootfs; } | sha256sum | cut -c1-16)
reference=$(chart_reference)

# ---- Inside a mount namespace of our own: the build.
build() {
  local stage="$1" archive="$2" key
  key=${archive##*-}
  key=${key%.tar}
  mkdir -p "$work/storage" "$work/run" "$archives"
  exec 9>"$work/lock"
  flock 9
  if [ -e "$archive" ]; then  # built meanwhile by another run
    return
  fi
  # The runroot holds mount counts; a tmpfs private to this namespace starts them at zero.
  mount -t tmpfs -o mode=0700 cairn-image-run "$work/run"
  printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n' \
    "$work/storage" "$work/run" >"$work/storage.conf"
  export CONTAINERS_STORAGE_CONF="$work/storage.conf"
  # buildah also writes to its defaults outside the private storage (a blob cache, run
  # state): remove those this run created.
  created=()
  for directory in /var/lib/containers /run/containers /run/libpod /run/buildah /run/runc; do
    [ -e "$directory" ] || created+=("$directory")
  done
  trap 'buildah rm --all >/dev/null 2>&1 || true; rm -rf "$work/home" "${created[@]}"' EXIT

  import_base
  build_image "$stage" "$key"

  local partial="$archive.partial"
  rm -f "$partial"
  log "writing $archive"
  buildah push --quiet "$reference" "docker-archive:$partial:$reference" >&2
  mv "$partial" "$archive"
  prune
}

# The three newest archives stay, and so do the builds they came from (tagged with their
# key), which keeps buildah's layer cache for them; the rest goes.
prune() {
  ls -t "$archives"/cairn-csi-*.tar | tail -n +4 | xargs -r rm -f
  local build_key
  for build_key in $(buildah images --format '{{.Name}}:{{.Tag}}' | sed -n 's|^localhost/cairn-build:||p'); do
    compgen -G "$archives/cairn-csi-*-$build_key.tar" >/dev/null ||
      buildah rmi "localhost/cairn-build:$build_key" >/dev/null 2>&1 || true
  done
  buildah rmi --prune >/dev/null 2>&1 || true
}

import_base() {
  # The imported image is keyed on this function too: how it is imported is part of it.
  local import_key base_image rootfs="$work/base-$suite-$base_key.tar"
  import_key=$( { echo "$base_key"; declare -f import_base; } | sha256sum | cut -c1-16)
  base_image="localhost/cairn-base:$import_key"
  if ! buildah inspect --type image "$base_image" >/dev/null 2>&1; then
    if [ ! -e "$rootfs" ]; then
      log "making the $suite-slim base with mmdebstrap"
      rm -f "$work"/base-*.tar "$work"/base-*.tar.partial
      make_base_rootfs "$rootfs.partial"
      mv "$rootfs.partial" "$rootfs"
    fi
    log "importing the base"
    local container
    container=$(buildah from scratch)
    buildah add --quiet "$container" "$rootfs" / >/dev/null  # a local tar is unpacked, as ADD does
    buildah config --cmd bash \
      --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$container"
    buildah commit --quiet --rm --identity-label=false "$container" "$base_image" >/dev/null
    # Older bases go once nothing refers to them (see the prune after the build).
    buildah images --format '{{.Name}}:{{.Tag}}' | grep '^localhost/cairn-base:' | grep -v ":$import_key\$" |
      xargs -r buildah rmi >/dev/null 2>&1 || true
  fi
  buildah tag "$base_image" "docker.io/library/debian:$suite-slim"
}

build_image() {  # $1: the staged context, $2: its key
  # pip inside a RUN step trusts only the image's CAs. Behind a TLS-inspecting proxy it
  # must trust the host's bundle: a home directory holding it and a pip.conf naming it is
  # mounted over /root for the build only. /root exists in the base, so no mount point is
  # left behind in a layer.
  local mounts=()
  if [ -n "$ca_bundle" ]; then
    rm -rf "$work/home"
    mkdir -p "$work/home/.config/pip"
    cp "$ca_bundle" "$work/home/build-ca.crt"
    printf '[global]\ncert = /root/build-ca.crt\n' >"$work/home/.config/pip/pip.conf"
    mounts=(--volume "$work/home:/root")
  fi
  log "building $reference from $context/Dockerfile"
  # runc, not crun: crun refuses hosts with hybrid cgroups (v1 controllers and v2). Its
  # state goes to the private runroot, not /run/runc.
  buildah bud --runtime "$(command -v runc)" --runtime-flag "root=$work/run/runc" \
    --network host --layers --force-rm --pull=never \
    --format docker --identity-label=false "${mounts[@]}" \
    --tag "$reference" --tag "localhost/cairn-build:$2" --file "$1/Dockerfile" "$1" >&2
}

# ---- Outside: the cache lookup, then the build in its own mount namespace.
main() {
  [ "$(id -u)" -eq 0 ] || { log "needs root"; exit 1; }
  mkdir -p "$work" "$archives"
  stage=$(mktemp -d "$work/context.XXXXXX")
  trap 'rm -rf "$stage"' EXIT
  stage_context "$stage"
  local key
  key=$( { echo "$reference $base_key"; sha256sum <"$0"; content_hash "$stage"; } | sha256sum | cut -c1-16)
  local archive="$archives/cairn-csi-${reference##*:}-$key.tar"
  if [ ! -e "$archive" ]; then
    local started=$SECONDS
    unshare --mount --propagation private "$0" --in-namespace "$context" "$stage" "$archive"
    log "built in $((SECONDS - started)) s"
  fi
  touch "$archive"  # the most recently used (see prune)
  log "$(du -m "$archive" | cut -f1) MB"
  echo "$archive"
}

if [ -n "$in_namespace" ]; then
  build "$2" "$3"
else
  main
fi
