"""Test support: a real driver process on a temporary socket, host checks, and the
leak check every integration test ends with."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from csi import loopdev, mount
from csi.cli import STOP_DEADLINE
from csi.generated import csi_pb2 as pb
from csi.generated import csi_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from csi.backends.routed import Objects

STRICT = os.environ.get("CAIRN_REQUIRE_ALL") == "1"
"""Set by `make test`, which installs every prerequisite: a missing one is then a
failure of the set-up, not a reason to skip."""

NODE_ID = "test-node"


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` unless ``condition``; under `make test` fail instead."""
    if condition:
        return
    if STRICT:
        pytest.fail(f"prerequisite missing although `make test` installs it: {reason}")
    pytest.skip(reason)


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    require(not missing, f"tools not installed: {', '.join(missing)}")


def require_root() -> None:
    require(os.geteuid() == 0, "needs root for loop devices and mounts")


def has_capability(bit: int) -> bool:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


CAP_SYS_RESOURCE = 24
SERVING = "serving until SIGTERM or SIGINT"
"""What a driver logs once it serves and its signal handlers are in place."""


class Stubs:
    """The CSI services' stubs on ``channel``."""

    channel: grpc.Channel | None

    @property
    def identity(self) -> pb_grpc.IdentityStub:
        return pb_grpc.IdentityStub(self.channel)

    @property
    def controller(self) -> pb_grpc.ControllerStub:
        return pb_grpc.ControllerStub(self.channel)

    @property
    def node(self) -> pb_grpc.NodeStub:
        return pb_grpc.NodeStub(self.channel)

    @property
    def snapshot_metadata(self) -> pb_grpc.SnapshotMetadataStub:
        return pb_grpc.SnapshotMetadataStub(self.channel)


class Driver(Stubs):
    """A cairn-csi process serving every service on a unix socket under ``root``."""

    def __init__(self, root: Path, extra_args: Sequence[str] = ()) -> None:
        self.root = root
        self.socket = root / "csi.sock"
        self.data = root / "data"
        self.state = root / "state"
        self.log = root / "driver.log"
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> Driver:
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "csi",
            "--endpoint", f"unix://{self.socket}",
            "--node-id", NODE_ID,
            "--data-dir", str(self.data),
            "--state-dir", str(self.state),
            "--log-level", "debug",
            *self.extra_args,
        ]  # fmt: skip
        # A test run inside a pod must not check nodes against that pod's cluster.
        env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
        served = self._served()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"driver exited with {self.process.returncode}:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"driver did not create its socket:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=30)
        # Ready for a stop too: the socket serves before the signal handlers are in place.
        while self._served() == served:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"driver did not say it serves:\n{self.log.read_text()}")
            time.sleep(0.05)
        return self

    def _served(self) -> int:
        """How many times the log says a driver started serving (it is kept across restarts)."""
        return self.log.read_text(errors="replace").count(SERVING) if self.log.exists() else 0

    def thread_stacks(self, wait: float = 5.0) -> str:
        """Every thread's stack, as the running driver writes them to its log at SIGUSR1
        (for the message of a test that found a call held); what the log gained."""
        if self.process is None:
            return "(the driver is not running)"
        start = self.log.stat().st_size
        self.process.send_signal(signal.SIGUSR1)
        deadline, seen, text = time.monotonic() + wait, "", ""
        while time.monotonic() < deadline:
            time.sleep(0.2)
            with open(self.log, "rb") as handle:
                handle.seek(start)
                text = handle.read().decode(errors="replace")
            if "most recent call first" in text and text == seen:
                break  # written, and nothing added since the last look
            seen = text
        return text

    def stop(self) -> int:
        """SIGTERM the driver and return its exit code. The driver ends within
        STOP_DEADLINE of the signal, however its stop goes; past that (and a margin for a
        busy host), it is killed, and the exit code says so (-9)."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_DEADLINE + 5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code

    def kill(self, children: bool = True) -> None:
        """SIGKILL the driver at once, with every process it started when ``children``
        (as a container restart would), or alone (as the kernel's OOM killer might)."""
        assert self.process is not None
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        victims = [self.process.pid, *(descendants(self.process.pid) if children else [])]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        self.process = None
        # A killed server cannot remove its socket; the next start replaces it.

    def restart(self) -> None:
        assert self.stop() == 0
        self.start()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in parents.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def command_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def wait_for_child(
    parent: int, name: str, done: Callable[[], bool] = lambda: False, timeout: float = 60.0
) -> int | None:
    """The pid of the first process called ``name`` below ``parent``, polled until it
    appears, ``done()`` turns true, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done():
        for pid in descendants(parent):
            if command_name(pid) == name:
                return pid
        time.sleep(0.001)
    return None


def mount_capability(fs_type: str = "", mode: str = "SINGLE_NODE_WRITER") -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),
    )


def block_capability(mode: str = "SINGLE_NODE_WRITER") -> pb.VolumeCapability:
    return pb.VolumeCapability(
        block=pb.VolumeCapability.BlockVolume(),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),
    )


def leftovers(root: Path) -> list[str]:
    """Loop devices and mounts that still point into ``root``."""
    prefix = str(root.resolve())
    found = [f"mount {m.target}" for m in mount.mounts() if m.target.startswith(prefix)]
    if shutil.which("losetup"):
        found += [f"loop {dev} -> {back}" for dev, back in loopdev.attached().items() if back.startswith(prefix)]
    return found


def scrub(root: Path) -> None:
    """Remove what a failed test left under ``root`` so the host stays clean; the test
    has already been failed for it. FUSE daemons serving mounts there go first: one whose
    cluster is gone would hang whatever touches its mount, later runs included."""
    prefix = str(root.resolve())
    _kill_fuse_daemons(prefix)
    for entry in reversed(mount.mounts()):
        if entry.target.startswith(prefix):
            subprocess.run(["umount", "-l", entry.target], check=False)
    if shutil.which("losetup"):
        for dev, back in loopdev.attached().items():
            if back.startswith(prefix):
                subprocess.run(["losetup", "-d", dev], check=False)


def _kill_fuse_daemons(prefix: str) -> None:
    """SIGKILL the rbd-fuse daemons whose command line names a path under ``prefix``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"rbd-fuse" and any(arg.startswith(prefix.encode()) for arg in argv):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)


def forget_routed_objects(objects: Objects, selector: str) -> None:
    """Remove every NodeVolume and NodeStorage ``selector`` picks, finalizers and all,
    whatever any agent would make of them: a test's clean-up of the API server."""
    from csi.backends.routed import STORAGES, VOLUMES

    for plural in (VOLUMES, STORAGES):
        for item in objects.list(plural, selector)[0]:
            if item["metadata"].get("finalizers"):
                item["metadata"]["finalizers"] = []
                objects.replace(plural, item)
            objects.delete(plural, item["metadata"]["name"])
