"""Network mounts whose server died: found, probed and unmounted without ever blocking.

This host's kernel has no NFS client, so the dead server here is a FUSE filesystem
served by ``FuseServer`` (a few lines of the FUSE protocol in a thread of the test): it
answers until frozen, then reads requests and never answers them, as an NFS server that
went away leaves a ``hard`` mount. That is the harsher case: a process waiting on a
FUSE request the daemon has read cannot even be killed until the connection is aborted
(NFS waits are killable). Disconnecting the server is a daemon that died: every call
then fails at once (ENOTCONN), which mount.py treats like NFS's stale handle (ESTALE).
The vm tier proves the same on NFS itself (tests/backends/nfs/test_node.py).

Every call that could block runs under ``bounded``: a regression fails the test instead
of hanging the suite."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from csi import mount, proc
from csi.errors import CommandBusy, CommandTimeout, command_failed
from tests.support import require_root

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_IN_HEADER = struct.Struct("<IIQQIIIHH")  # fuse_in_header
_OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header
_LOOKUP, _FORGET, _GETATTR, _STATFS, _INIT, _INTERRUPT, _BATCH_FORGET = 1, 2, 3, 17, 26, 36, 42
_NO_REPLY = {_FORGET, _INTERRUPT, _BATCH_FORGET}
BLOCK = 4096
BLOCKS, FREE, AVAILABLE, FILES, FREE_FILES = 1000, 600, 500, 100, 40


def require_fuse() -> None:
    require_root()
    with open("/proc/filesystems", encoding="ascii") as listing:
        has_fuse = any(line.split()[-1] == "fuse" for line in listing)
    if not (has_fuse and os.path.exists("/dev/fuse")):
        # A kernel feature, not a package to install.
        pytest.skip("this kernel or container offers no FUSE")


class FuseServer:
    """An empty directory served over FUSE, mounted at ``mountpoint`` with the
    mountpoint as its source (so a bind of it names where it came from, as an NFS mount
    names its server). ``freeze`` stops answering; ``disconnect`` ends the connection."""

    def __init__(self, mountpoint: Path, fstype: str = "fuse.cairn-test") -> None:
        self.mountpoint = mountpoint
        self.fstype = fstype
        self.fd = -1
        self.answering = True
        self.stopping = False
        self.thread: threading.Thread | None = None

    def start(self) -> FuseServer:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        self.answering, self.stopping = True, False
        options = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0"
        path = str(self.mountpoint).encode()
        if _libc.mount(path, path, self.fstype.encode(), 0, options.encode()) != 0:
            code = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(code, os.strerror(code), str(self.mountpoint))
        self.thread = threading.Thread(target=self._serve, args=(self.fd,), daemon=True)
        self.thread.start()
        return self

    def freeze(self) -> None:
        self.answering = False

    def disconnect(self) -> None:
        """The daemon dies: whatever waits on it fails, and every later call too."""
        self.stopping = True
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _serve(self, fd: int) -> None:
        while not self.stopping:
            try:
                ready, _, _ = select.select([fd], [], [], 0.05)
                if not ready:
                    continue
                request = os.read(fd, 1 << 17)
            except OSError:
                return  # unmounted: the kernel ended the connection
            _, opcode, unique, *_ = _IN_HEADER.unpack_from(request)
            if not self.answering or opcode in _NO_REPLY:
                continue
            payload, error = self._answer(opcode)
            with contextlib.suppress(OSError):  # the caller was interrupted meanwhile
                os.write(fd, _OUT_HEADER.pack(_OUT_HEADER.size + len(payload), -error, unique) + payload)

    @staticmethod
    def _answer(opcode: int) -> tuple[bytes, int]:
        if opcode == _INIT:  # protocol 7.31, no optional features
            return struct.pack("<IIIIHHIIHHII6I", 7, 31, 0, 0, 12, 9, BLOCK, 1, 0, 0, 0, 0, *[0] * 6), 0
        if opcode == _GETATTR:  # the root directory; attributes valid for 0 s, so always asked
            now = int(time.time())
            attr = struct.pack("<6Q10I", 1, 0, 0, now, now, now, 0, 0, 0, 0o40755, 2, 0, 0, 0, BLOCK, 0)
            return struct.pack("<QII", 0, 0, 0) + attr, 0
        if opcode == _STATFS:
            return struct.pack("<5Q4I6I", BLOCKS, FREE, AVAILABLE, FILES, FREE_FILES, BLOCK, 255, BLOCK, 0, *[0] * 6), 0
        return b"", errno.ENOENT if opcode == _LOOKUP else errno.ENOSYS


def bind(source: Path, target: Path) -> None:
    """A bind mount made by the kernel alone (mount(8) would stat a dead source)."""
    target.mkdir(parents=True, exist_ok=True)
    if _libc.mount(str(source).encode(), str(target).encode(), None, 4096, None) != 0:  # MS_BIND
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(target))


def bounded(seconds: float, call: Callable[..., T], *args: Any) -> T:
    """``call(*args)``, failing the test if it has not returned within ``seconds``."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = call(*args)
        except BaseException as exc:  # handed to the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(call, '__name__', call)} still blocked after {seconds:g}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


@pytest.fixture
def servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FuseServer]]:
    """FUSE servers the test starts (it appends them); afterwards every one is
    disconnected (which wakes anything still waiting on it) and every mount under
    ``tmp_path`` is detached."""
    require_fuse()
    monkeypatch.setattr(mount, "PROBE_TIMEOUT", 1.0)
    started: list[FuseServer] = []
    yield started
    for server in started:
        server.disconnect()
    for entry in reversed(mount.mounts()):
        if entry.target.startswith(str(tmp_path)):
            proc.run(["umount", "--lazy", "--internal-only", "--no-canonicalize", entry.target])


def under(root: Path) -> list[str]:
    return [entry.target for entry in mount.mounts() if entry.target.startswith(str(root))]


# -- the probe's verdicts, from what stat says ------------------------------------------

NFS = mount.MountEntry("127.0.0.1:/export/vol", "/mnt/vol", "nfs4", ("rw",), "/", "0:99")


def fake_stat(monkeypatch: pytest.MonkeyPatch, outcome: str | Exception) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(argv: list[str], **kwargs: Any) -> Any:
        calls.append(list(argv))
        if isinstance(outcome, Exception):
            raise outcome
        return type("Result", (), {"stdout": outcome})()

    monkeypatch.setattr(proc, "run", run)
    return calls


@pytest.mark.unit
def test_a_stale_nfs_handle_is_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    message = "stat: cannot read file system information for '/mnt/vol': Stale file handle"
    calls = fake_stat(monkeypatch, command_failed(["stat"], 1, message))
    health = mount.probe("/mnt/vol", entry=NFS)
    assert health.condition is mount.Condition.STALE and health.stats is None
    assert health.message.startswith("NFS server 127.0.0.1:/export/vol (mounted at /mnt/vol) is stale")
    assert "Stale file handle" in health.message
    assert calls == [["stat", "--file-system", "--format=%S %b %f %a %c %d", "--", "/mnt/vol"]]


@pytest.mark.unit
def test_no_answer_in_time_is_hung_and_names_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_stat(monkeypatch, CommandTimeout(["stat"], 10))
    health = mount.probe("/mnt/vol", entry=NFS)
    assert health.condition is mount.Condition.HUNG
    assert (
        health.message
        == "NFS server 127.0.0.1:/export/vol (mounted at /mnt/vol) not responding (no answer within 10 s)"
    )


@pytest.mark.unit
def test_other_errors_and_good_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_stat(monkeypatch, command_failed(["stat"], 1, "stat: cannot read ...: Input/output error"))
    health = mount.probe("/mnt/vol", entry=NFS)
    assert health.condition is mount.Condition.ERROR and "Input/output error" in health.message
    fake_stat(monkeypatch, "4096 1000 600 500 100 40\n")
    health = mount.probe("/mnt/vol", entry=NFS)
    assert health.condition is mount.Condition.OK and health.stats is not None
    assert (health.stats.total_bytes, health.stats.available_bytes, health.stats.used_bytes) == (
        1000 * BLOCK,
        500 * BLOCK,
        400 * BLOCK,
    )
    assert (health.stats.total_inodes, health.stats.available_inodes, health.stats.used_inodes) == (100, 40, 60)


@pytest.mark.unit
def test_only_network_filesystems_are_probed() -> None:
    for fstype in ("nfs", "nfs4", "fuse", "fuse.rbd-fuse", "cifs"):
        assert mount.is_network(mount.MountEntry("s", "/t", fstype, (), "/", "0:1"))
    for fstype in ("ext4", "xfs", "tmpfs", "devtmpfs", "overlay", "fuseblk"):
        assert not mount.is_network(mount.MountEntry("s", "/t", fstype, (), "/", "0:1"))


@pytest.mark.unit
def test_an_unmount_that_runs_too_long_is_forced_then_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that answers the probe but then lets the unmount hang: forced, and when
    the forced unmount fails too, detached lazily; all three bounded."""
    calls: list[tuple[list[str], float]] = []
    mounted = [NFS]

    def run(argv: list[str], *, timeout: float = proc.DEFAULT_TIMEOUT, **kwargs: Any) -> Any:
        calls.append((list(argv), timeout))
        if argv[0] == "stat":
            return type("Result", (), {"stdout": "4096 1 1 1 1 1"})()
        if "--lazy" in argv:
            mounted.clear()
            return None
        if "--force" in argv:
            raise command_failed(argv, 32, "umount: /mnt/vol: target is busy.")
        raise CommandTimeout(argv, timeout)

    monkeypatch.setattr(proc, "run", run)
    monkeypatch.setattr(mount, "find_mount", lambda target: mounted[0] if mounted else None)
    mount.unmount("/mnt/vol")
    assert calls == [
        (["stat", "--file-system", "--format=%S %b %f %a %c %d", "--", "/mnt/vol"], mount.PROBE_TIMEOUT),
        (["umount", "--no-canonicalize", "/mnt/vol"], mount.UMOUNT_TIMEOUT),
        (["umount", "--force", "--internal-only", "--no-canonicalize", "/mnt/vol"], mount.FORCE_TIMEOUT),
        (["umount", "--lazy", "--internal-only", "--no-canonicalize", "/mnt/vol"], mount.FORCE_TIMEOUT),
    ]


@pytest.mark.unit
def test_a_command_past_its_timeout_dies_with_its_helpers(tmp_path: Path) -> None:
    """The timeout kills the command's whole process group (``mount`` runs
    ``mount.nfs``), and the caller gets its answer within moments of the timeout."""
    pid_file = tmp_path / "helper.pid"
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        proc.run(["sh", "-c", f'sleep 60 & echo $! > "{pid_file}"; wait'], timeout=0.5)
    assert time.monotonic() - started < 0.5 + proc.KILL_WAIT
    helper = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(helper), "the command's helper outlived the timeout"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


# -- for real, on a FUSE server that stops answering ------------------------------------


@pytest.mark.integration
def test_a_healthy_network_mount_is_read_in_a_child(
    tmp_path: Path, servers: list[FuseServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FuseServer(tmp_path / "server").start()
    servers.append(server)

    def in_process(path: str) -> None:
        raise AssertionError(f"statvfs of network mount {path} in the driver's process")

    monkeypatch.setattr(mount, "filesystem_stats", in_process)
    health = bounded(10, mount.health, str(server.mountpoint))
    assert health.condition is mount.Condition.OK and health.stats is not None
    assert health.stats.total_bytes == BLOCKS * BLOCK and health.stats.available_inodes == FREE_FILES
    # Busy (an O_PATH handle pins it) and answering: refused as for any mount, not forced.
    pin = os.open(server.mountpoint, os.O_PATH)
    try:
        with pytest.raises(CommandBusy):
            bounded(20, mount.unmount, str(server.mountpoint))
        assert mount.is_mounted(str(server.mountpoint))
    finally:
        os.close(pin)
    bounded(20, mount.unmount, str(server.mountpoint))
    assert under(tmp_path) == []


@pytest.mark.integration
def test_a_mount_whose_server_stopped_answering_never_blocks(tmp_path: Path, servers: list[FuseServer]) -> None:
    server = FuseServer(tmp_path / "server").start()
    servers.append(server)
    pod = tmp_path / "pod"
    bind(server.mountpoint, pod)
    server.freeze()
    # A stat of it would block now (os.path.realpath would): the mount table says it all.
    entry = bounded(5, mount.find_mount, str(pod))
    assert entry is not None and entry.source == str(server.mountpoint) and mount.is_network(entry)
    assert bounded(5, mount.is_mounted, str(pod))
    assert bounded(5, mount.canonical, str(pod)) == str(pod)
    started = time.monotonic()
    health = bounded(15, mount.probe, str(pod))
    assert health.condition is mount.Condition.HUNG, health
    assert health.message == (
        f"fuse.cairn-test filesystem {server.mountpoint} (mounted at {pod}) not responding (no answer within 1 s)"
    )
    # The probe's stat is stuck beyond SIGKILL (a FUSE request the daemon has read);
    # the probe gave up on it after KILL_WAIT rather than wait for it.
    assert time.monotonic() - started < 1 + proc.KILL_WAIT + 3
    # Unmounting forces (aborting what waits on the server); the stuck probes keep the
    # mount busy for a moment, so the bind is detached lazily at worst.
    bounded(60, mount.unmount, str(pod))
    bounded(60, mount.unmount, str(server.mountpoint))
    assert under(tmp_path) == []
    mount.remove_path(str(pod))
    assert not pod.exists()


@pytest.mark.integration
def test_a_mount_whose_daemon_died_is_stale_and_unmounted_at_once(tmp_path: Path, servers: list[FuseServer]) -> None:
    server = FuseServer(tmp_path / "server").start()
    servers.append(server)
    pod = tmp_path / "pod"
    bind(server.mountpoint, pod)
    server.disconnect()
    health = bounded(10, mount.probe, str(pod))
    assert health.condition is mount.Condition.STALE, health
    assert "Transport endpoint is not connected" in health.message
    started = time.monotonic()
    bounded(30, mount.unmount, str(pod))
    bounded(30, mount.unmount, str(server.mountpoint))
    assert time.monotonic() - started < 10
    assert under(tmp_path) == []
