"""A throw-away guest with a stock Debian kernel, for the node paths a host kernel or
sandbox cannot run (online ext4 growth without CAP_SYS_RESOURCE here; krbd, rbd-nbd and
device-mapper for the backends to come).

QEMU boots the distribution kernel under software emulation on the ``microvm`` machine
with a tiny busybox initramfs. The guest sees the host's root filesystem read-only over
9p, with writable overlays on /etc, /var and /root, a fresh tmpfs on /tmp, and the
repository shared at its own path, so the test suite and its virtualenv run unchanged.
One shell command runs as root inside; its exit status and output come back through a
shared control directory, and the guest powers itself off.
"""

from __future__ import annotations

import glob
import hashlib
import lzma
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The unpacked kernel and the initramfs, outside the clone when a build cache is named.
CACHE = Path(
    os.environ.get("CAIRN_VM_CACHE")
    or (Path(os.environ["CAIRN_CACHE"]) / "vm" if os.environ.get("CAIRN_CACHE") else REPO / ".tools" / "vm")
)
GUEST_MODULES = ("virtio_mmio", "9pnet_virtio", "9p", "overlay")
TOOLS = ("qemu-system-x86_64", "busybox", "cpio", "modprobe", "nft")
GUEST_NICENESS = -5
"""The guest's scheduling priority (nice(1)): ahead of the host's tests, which run beside it."""

INIT = r"""#!/bin/busybox sh
# Guest init: assemble a root from the host's, then hand over to the run script.
bb=/bin/busybox
fail() { echo "cairn-vm init: $*"; echo o > /proc/sysrq-trigger; $bb sleep 10; }
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
while read -r module; do $bb insmod "/modules/$module" || echo "cairn-vm init: insmod $module failed"; done < /modules/order
nine="trans=virtio,version=9p2000.L,msize=512000"
root=/newroot
$bb mount -t 9p -o "ro,cache=loose,$nine" hostroot $root || fail "cannot mount the host root"
$bb mount -t tmpfs -o mode=0755 run $root/run
$bb mount -t tmpfs -o mode=1777 tmp $root/tmp
for dir in etc var root; do
  $bb mkdir -p $root/run/overlay/$dir/upper $root/run/overlay/$dir/work
  $bb mount -t overlay -o "lowerdir=$root/$dir,upperdir=$root/run/overlay/$dir/upper,workdir=$root/run/overlay/$dir/work" overlay $root/$dir
done
$bb mkdir -p $root/run/cairn-vm
$bb mount -t 9p -o "cache=none,$nine" control $root/run/cairn-vm || fail "cannot mount the control share"
repo="$root$($bb cat $root/run/cairn-vm/repo)"
$bb mkdir -p "$repo"  # the repository may sit under /tmp, fresh in the guest
# The host leaves the repository (and the virtualenv in it) alone while the guest runs:
# cached reads make imports twice as fast as uncached 9p round trips.
$bb mount -t 9p -o "cache=loose,$nine" repo "$repo" || fail "cannot mount the repository"
$bb mount --move /dev $root/dev
$bb mkdir -p $root/dev/pts $root/dev/shm
$bb mount -t devpts devpts $root/dev/pts
$bb mount -t tmpfs shm $root/dev/shm
$bb ip link set lo up
$bb hostname cairn-vm  # Ceph names the OSD's CRUSH host after it
$bb mount --move /proc $root/proc
$bb mount --move /sys $root/sys
exec $bb switch_root $root /bin/bash /run/cairn-vm/run.sh
"""

RUN = r"""#!/bin/bash
set -a; . /run/cairn-vm/env; set +a
cd "$CAIRN_VM_CWD"
while read -r tag path; do
  mkdir -p "$path" && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none "$tag" "$path"
done < /run/cairn-vm/shares
[ -f /run/cairn-vm/network.sh ] && bash /run/cairn-vm/network.sh > /run/cairn-vm/network.log 2>&1
bash /run/cairn-vm/command > /run/cairn-vm/stdout 2> /run/cairn-vm/stderr < /dev/null
echo $? > /run/cairn-vm/status
sync
echo o > /proc/sysrq-trigger
sleep 30
"""


# QEMU's user-mode network: the guest is 10.0.2.15 and reaches the host's loopback at
# 10.0.2.2. Connections the guest makes to chosen ports of its own 127.0.0.1 are rewritten
# to the host's, so a service that advertises 127.0.0.1 addresses (a test Ceph cluster's
# monitor and OSDs) is reachable from the guest unchanged, addresses included. Nothing
# else leaves the guest: no IPv6, and IPv4 only towards the host.
NETWORK = r"""#!/bin/bash
set -e
modprobe virtio_net
modprobe nft_chain_nat
sysctl -qw net.ipv6.conf.all.disable_ipv6=1
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.eth0.route_localnet=1
nft -f - <<RULES
table ip cairn_vm {
  chain output {
    type nat hook output priority -100;
    ip daddr 127.0.0.1 tcp dport { $PORTS } dnat to 10.0.2.2
  }
  chain postrouting {
    type nat hook postrouting priority 100;
    oifname "eth0" ip saddr 127.0.0.0/8 masquerade
  }
  chain only_to_the_host {
    type filter hook output priority 0;
    oifname "eth0" ip daddr != 10.0.2.2 drop
  }
}
RULES
"""


@dataclass(frozen=True)
class GuestResult:
    status: int | None
    stdout: str
    stderr: str
    console: str
    seconds: float


def missing_prerequisites() -> list[str]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not glob.glob("/boot/vmlinuz-*"):
        missing.append("a kernel in /boot (linux-image-amd64)")
    return missing


def kernel_version() -> str:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"), key=os.path.getmtime)
    return kernels[-1].removeprefix("/boot/vmlinuz-")


def _vmlinux(version: str) -> Path:
    """The uncompressed kernel: QEMU boots it directly (PVH), skipping a decompression
    that is slow under emulation."""
    target = CACHE / f"vmlinux-{version}"
    if not target.exists():
        packed = Path(f"/boot/vmlinuz-{version}").read_bytes()
        start = packed.find(b"\xfd7zXZ\x00")
        if start < 0:
            raise RuntimeError(f"/boot/vmlinuz-{version} is not xz-compressed; cannot unpack it")
        temp = target.with_suffix(".tmp")
        temp.write_bytes(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(packed[start:]))
        temp.rename(target)
    return target


def _initramfs(version: str) -> Path:
    # Keyed on what goes in besides the kernel's modules: a changed init is a new archive.
    recipe = hashlib.sha256(f"{INIT}\n{GUEST_MODULES}".encode()).hexdigest()[:12]
    target = CACHE / f"initramfs-{version}-{recipe}.cpio.gz"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as build:
        tree = Path(build)
        for folder in ("bin", "dev", "proc", "sys", "newroot", "modules"):
            (tree / folder).mkdir()
        shutil.copy(shutil.which("busybox") or "busybox", tree / "bin" / "busybox")
        plan = subprocess.run(
            ["modprobe", "-S", version, "--show-depends", "-a", *GUEST_MODULES],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        order = []
        for line in plan.splitlines():
            fields = line.split()
            if fields[:1] == ["insmod"] and Path(fields[1]).name not in order:
                shutil.copy(fields[1], tree / "modules")
                order.append(Path(fields[1]).name)
        (tree / "modules" / "order").write_text("\n".join(order) + "\n")
        (tree / "init").write_text(INIT)
        (tree / "init").chmod(0o755)
        files = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
        archive = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree, input=files, capture_output=True, check=True
        )
        temp = target.with_suffix(".tmp")
        with open(temp, "wb") as out:
            out.write(subprocess.run(["gzip", "-1"], input=archive.stdout, capture_output=True, check=True).stdout)
        temp.rename(target)
    return target


def _tsc_khz() -> int:
    # microvm has no HPET or PM timer; under emulation the guest must be told the TSC rate.
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 2_000_000


def run(
    command: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 1200,
    memory: str = "2G",
    host_ports: Sequence[int] = (),
    shares: Sequence[Path] = (),
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> GuestResult:
    """Run ``command`` (bash) as root in a fresh guest, from the repository directory.
    With ``host_ports``, the guest's connections to those ports of 127.0.0.1 reach the
    host's loopback instead of its own; ``shares`` are host directories the guest sees,
    writable, at the same paths (the guest's /tmp is otherwise its own)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    version = kernel_version()
    kernel, initramfs = _vmlinux(version), _initramfs(version)
    with tempfile.TemporaryDirectory(prefix="cairn-vm-") as control_dir:
        control = Path(control_dir)
        variables = {**os.environ, **(env or {}), "CAIRN_VM_CWD": str(REPO)}
        (control / "env").write_text(
            "".join(
                f"{k}={shlex.quote(v)}\n"
                for k, v in variables.items()
                if k.isidentifier() and k not in ("PWD", "OLDPWD", "SHLVL")
            )
        )
        (control / "command").write_text(command + "\n")
        (control / "run.sh").write_text(RUN)
        (control / "repo").write_text(str(REPO))
        extra: list[str] = []
        (control / "shares").write_text("".join(f"share{i} {path}\n" for i, path in enumerate(shares)))
        for i, path in enumerate(shares):
            extra += ["-fsdev", f"local,id=share{i},path={path},security_model=none,multidevs=remap"]
            extra += ["-device", f"virtio-9p-device,fsdev=share{i},mount_tag=share{i}"]
        if host_ports:
            ports = ", ".join(str(port) for port in sorted(set(host_ports)))
            (control / "network.sh").write_text(NETWORK.replace("$PORTS", ports))
            extra += ["-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"]
        append = f"console=ttyS0 quiet loglevel=1 panic=-1 tsc_early_khz={_tsc_khz()} tsc=reliable no_timer_check"
        share = "security_model=none"
        # Ahead of the host's tests for the CPU: the emulated guest is the session's longest
        # path, and the host's tests spend much of their time waiting on their servers.
        argv = [
            "nice", "-n", str(GUEST_NICENESS),
            "qemu-system-x86_64", "-M", "microvm,pit=on,pic=on,rtc=on,isa-serial=on",
            "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", memory,
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initramfs), "-append", append,
            "-serial", f"file:{control}/console.log",
            "-fsdev", f"local,id=hostroot,path=/,{share},readonly=on,multidevs=remap",
            "-device", "virtio-9p-device,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=control,path={control},{share}",
            "-device", "virtio-9p-device,fsdev=control,mount_tag=control",
            "-fsdev", f"local,id=repo,path={REPO},{share},multidevs=remap",
            "-device", "virtio-9p-device,fsdev=repo,mount_tag=repo",
            *extra,
        ]  # fmt: skip
        started = time.monotonic()
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if on_start is not None:
            on_start(qemu)  # so that a caller on another thread can stop it
        try:
            qemu.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # a missing status reports it
            qemu.kill()
            qemu.wait()
        seconds = time.monotonic() - started

        def read(name: str) -> str:
            path = control / name
            return path.read_text(errors="replace") if path.exists() else ""

        status_text = read("status").strip()
        return GuestResult(
            int(status_text) if status_text else None,
            read("stdout"),
            read("stderr") + read("network.log"),
            read("console.log"),
            seconds,
        )
