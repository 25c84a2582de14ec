#!/usr/bin/env bash
# Install what Cairn needs on a Debian host, idempotently and without a terminal:
#   scripts/setup.sh run    host tools for the local backend, and the Python venv
#   scripts/setup.sh test   all of that, plus the dev dependencies and csi-sanity
set -euo pipefail

what=${1:-test}
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
tools=${TOOLS:-$root/.tools}
python=${PYTHON:-/usr/bin/python3}
csi_sanity_version=${CSI_SANITY_VERSION:-v5.6.0}
helm_version=${HELM_VERSION:-v3.22.0}

# Host tools of the local backend and the node plugin: loop devices, blkid, mount,
# mkfs and grow tools for ext4 and XFS, cp with reflink.
packages=(util-linux mount e2fsprogs xfsprogs coreutils python3 python3-venv)
if [ "$what" = test ]; then
  command -v go >/dev/null || packages+=(golang-go)
  # The vm tier: a stock Debian kernel booted by QEMU with a busybox initramfs; nftables
  # lets a guest reach the host's test cluster on its loopback addresses.
  packages+=(qemu-system-x86 linux-image-amd64 busybox-static cpio kmod nftables)
  # The rbd backend and its throw-away test cluster; its RADOS gateway is the S3 server of
  # the backup store's tests.
  packages+=(ceph-mon ceph-mgr ceph-osd ceph-common python3-rbd python3-rados rbd-fuse rbd-nbd fuse3 radosgw)
  # The cluster tier's images, built without a container engine: the driver's from the
  # Dockerfile by buildah (with runc) on a base made by mmdebstrap; the pod sandbox compiled
  # with `gcc -static`; test pods run busybox-static (above).
  packages+=(buildah runc mmdebstrap gcc libc6-dev)
  # The cluster tier's Kubernetes runs from Debian's etcd, containerd and runc; its PKI is
  # made with openssl. (The Kubernetes binaries and sidecars are built from the Go module
  # proxy by tests/cluster/build/binaries.sh into the cache.)
  packages+=(etcd-server containerd openssl iproute2)
  # The nfs backend: its test server (nfs-ganesha in user space), the controller's
  # user-space client (libnfs), the node's kernel client tools (used in the vm tier), and
  # the project quota tools for exports the controller reaches itself (exportRoot).
  packages+=(nfs-ganesha nfs-ganesha-vfs libnfs13 nfs-common quota)
  # The lvm backend: LVM's tools and the thin pools' checker (activation, thin pools and
  # snapshots run in the vm tier, whose guest runs the host's binaries).
  packages+=(lvm2 thin-provisioning-tools)
fi

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
# Debian builds the Ceph bindings for its own python3; expose just those two modules.
ceph_libs="$venv/ceph-bindings"
mkdir -p "$ceph_libs"
for module in rados rbd; do
  for so in /usr/lib/python3/dist-packages/$module.cpython-*.so; do
    [ -e "$so" ] && ln -sf "$so" "$ceph_libs/"
  done
done
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$ceph_libs" > "$site/ceph-bindings.pth"

extra=""; [ "$what" = test ] && extra="[dev]"
stamp="$venv/.installed$extra"
if [ ! -e "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check -e "$root$extra"
  touch "$stamp"
fi

if [ "$what" = test ] && [ ! -x "$tools/bin/csi-sanity" ]; then
  echo "installing csi-sanity $csi_sanity_version"
  GOBIN="$tools/bin" go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$csi_sanity_version"
fi

if [ "$what" = test ] && [ ! -x "$tools/bin/helm" ]; then
  echo "installing helm $helm_version"
  GOBIN="$tools/bin" go install "helm.sh/helm/v3/cmd/helm@$helm_version"
fi
