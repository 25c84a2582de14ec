#!/usr/bin/env bash
# A full volume lifecycle through the driver's socket, printing each step:
# create, publish, stage, mount, write a file, snapshot, restore into a new volume,
# mount the restored volume, verify the file, then clean everything up.
# Needs root (loop devices and mounts). Usage: scripts/demo.sh [PATH/TO/cairn-csi]
set -euo pipefail

cairn=${1:-cairn-csi}
work=$(mktemp -d /tmp/cairn-demo.XXXXXX)
sock="$work/csi.sock"
driver_pid=""

cleanup() {
  set +e
  for target in "$work/pod-a" "$work/pod-b"; do mountpoint -q "$target" && umount "$target"; done
  for staging in "$work/staging-a" "$work/staging-b"; do mountpoint -q "$staging" && umount "$staging"; done
  for image in "$work"/data/volumes/*.img; do
    [ -e "$image" ] && losetup -j "$image" -O NAME -n | xargs -r -n1 losetup -d
  done
  if [ -n "$driver_pid" ]; then kill "$driver_pid" 2>/dev/null; wait "$driver_pid" 2>/dev/null; fi
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
client() { "$cairn" client --endpoint "unix://$sock" "$@"; }
field() { sed -n "s/^$1 *//p"; }

step "start the driver on the embedded local backend"
"$cairn" --endpoint "unix://$sock" --node-id demo-node --data-dir "$work/data" --state-dir "$work/state" \
  --log-level warning &
driver_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
client info

step "create a 256 MiB volume"
out=$(client create demo-volume --size 256Mi); echo "$out"
vol=$(echo "$out" | field "volume id")

step "publish it to this node, stage it (format + mount) and mount it into a pod path"
client publish "$vol"
client stage "$vol" "$work/staging-a"
client mount "$vol" "$work/pod-a" --staging "$work/staging-a"

step "write a file"
echo "hello from cairn $(date -u +%FT%TZ)" > "$work/pod-a/hello.txt"
sync
cat "$work/pod-a/hello.txt"
client stats "$vol" "$work/pod-a"

step "snapshot the volume"
out=$(client snapshot demo-snapshot "$vol"); echo "$out"
snap=$(echo "$out" | field "snapshot id")

step "restore the snapshot into a new volume and mount it"
out=$(client create demo-restored --size 256Mi --from-snapshot "$snap"); echo "$out"
restored=$(echo "$out" | field "volume id")
client publish "$restored"
client stage "$restored" "$work/staging-b"
client mount "$restored" "$work/pod-b" --staging "$work/staging-b"

step "verify the file in the restored volume"
diff "$work/pod-a/hello.txt" "$work/pod-b/hello.txt"
echo "restored volume holds: $(cat "$work/pod-b/hello.txt")"

step "clean up: unmount, unstage, unpublish, delete"
for pair in "$vol a" "$restored b"; do
  set -- $pair
  client umount "$1" "$work/pod-$2"
  client unstage "$1" "$work/staging-$2"
  client unpublish "$1"
  client delete "$1"
done
client delete-snapshot "$snap"
client list
echo; echo "demo finished: every step succeeded"
