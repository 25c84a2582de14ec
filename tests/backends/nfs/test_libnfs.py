"""``libnfs.Client`` against a real NFSv4 server (nfs-ganesha on loopback), each result
checked on the exported directory itself: file I/O past the server's transfer size,
directory and link calls, attributes (on files, directories and links: libnfs 4.0's own
calls fail on directories), errors as errno-bearing ``OSError``s, many threads on one
client, a server that is not there, restarts and stops, and root squashing."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.backends.nfs import libnfs
from csi.backends.nfs.fs import Tree, opened
from csi.backends.nfs.libnfs import Client
from tests.ceph import free_port
from tests.nfs import EXPORT, RUNNING_SERVER, SQUASHED, NfsServer

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture
def client(nfs_server: NfsServer) -> Iterator[Client]:
    tree = Client("127.0.0.1", EXPORT, port=nfs_server.port, timeout=10)
    yield tree
    tree.close()


@pytest.fixture
def work(client: Client, nfs_server: NfsServer) -> Iterator[str]:
    """A directory of this test's own under the export, removed afterwards."""
    name = f"libnfs-{uuid.uuid4().hex[:12]}"
    client.mkdir(name, 0o755)
    yield name
    shutil.rmtree(nfs_server.export_dir / name)


def own_server(server: NfsServer) -> None:
    if os.environ.get(RUNNING_SERVER) or not server.pid:
        pytest.skip("the NFS server was started by another process: not ours to stop")


def test_describe_and_protocol(client: Client, nfs_server: NfsServer) -> None:
    tree: Tree = client
    assert tree.describe() == f"nfs://127.0.0.1:{nfs_server.port}{EXPORT}"


def test_file_io_beyond_the_transfer_size(client: Client, work: str, nfs_server: NfsServer) -> None:
    data = os.urandom(3 * MiB)
    assert len(data) > client._writemax and len(data) > client._readmax  # several calls each way
    on_disk = nfs_server.export_dir / work / "data"
    handle = client.open(f"{work}/data", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
    try:
        handle.pwrite(data, 0)
        handle.fsync()
        assert handle.fstat().size == len(data)
        assert on_disk.read_bytes() == data
        assert stat.S_IMODE(on_disk.stat().st_mode) == 0o640  # libnfs alone creates 0600
        assert handle.pread(len(data) + 4096, 0) == data  # stops at the end
        for offset, size in ((0, 1), (1, 4095), (MiB - 7, 2 * MiB), (len(data) - 10, 100)):
            assert handle.pread(size, offset) == data[offset : offset + size]
        assert handle.pread(10, len(data)) == b""
        handle.pwrite(b"patch", MiB + 3)
        handle.fsync()
        assert on_disk.read_bytes()[MiB : MiB + 10] == data[MiB : MiB + 3] + b"patch" + data[MiB + 8 : MiB + 10]
        handle.truncate(1000)
        assert handle.fstat().size == 1000
        assert on_disk.stat().st_size == 1000
    finally:
        handle.close()
    handle.close()  # idempotent
    with pytest.raises(OSError) as closed:
        handle.pread(1, 0)
    assert closed.value.errno == errno.EBADF


def test_open_flags(client: Client, work: str, nfs_server: NfsServer) -> None:
    on_disk = nfs_server.export_dir / work / "file"
    handle = client.open(f"{work}/file", os.O_CREAT | os.O_WRONLY, 0o604)
    handle.pwrite(b"content", 0)
    handle.close()
    assert stat.S_IMODE(on_disk.stat().st_mode) == 0o604
    again = client.open(f"{work}/file", os.O_CREAT | os.O_RDWR, 0o777)  # exists: neither mode nor content change
    assert again.pread(100, 0) == b"content"
    again.close()
    assert stat.S_IMODE(on_disk.stat().st_mode) == 0o604
    truncated = client.open(f"{work}/file", os.O_RDWR | os.O_TRUNC)
    assert truncated.fstat().size == 0
    truncated.close()
    assert on_disk.stat().st_size == 0
    with pytest.raises(FileExistsError):
        client.open(f"{work}/file", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with pytest.raises(FileNotFoundError):
        client.open(f"{work}/absent", os.O_RDONLY)


def test_directories_and_links(client: Client, work: str, nfs_server: NfsServer) -> None:
    local = nfs_server.export_dir / work
    client.mkdir(f"{work}/shared", 0o2770)
    assert stat.S_IMODE((local / "shared").stat().st_mode) == 0o2770  # the server's mkdir alone drops setgid
    assert client.stat(f"{work}/shared").is_dir
    (local / "shared" / "a").write_bytes(b"a")
    client.mkdir(f"{work}/shared/sub", 0o700)
    assert sorted(client.listdir(f"{work}/shared")) == ["a", "sub"]
    assert client.listdir(f"{work}/shared/sub") == []
    assert work in client.listdir("")

    client.rename(f"{work}/shared/a", f"{work}/shared/b")
    assert sorted(os.listdir(local / "shared")) == ["b", "sub"]
    client.link(f"{work}/shared/b", f"{work}/hard")
    linked = client.stat(f"{work}/hard")
    assert linked.nlink == 2 and linked.ino == client.stat(f"{work}/shared/b").ino
    assert (local / "hard").stat().st_ino == (local / "shared" / "b").stat().st_ino

    client.symlink("shared/b", f"{work}/soft")
    assert client.readlink(f"{work}/soft") == "shared/b"
    assert os.readlink(local / "soft") == "shared/b"
    assert client.lstat(f"{work}/soft").is_symlink
    assert client.stat(f"{work}/soft").is_file

    client.unlink(f"{work}/soft")
    client.unlink(f"{work}/hard")
    client.rmdir(f"{work}/shared/sub")
    assert sorted(os.listdir(local)) == ["shared"]


def test_attributes_on_files_directories_and_links(client: Client, work: str, nfs_server: NfsServer) -> None:
    local = nfs_server.export_dir / work
    (local / "file").write_bytes(b"x")
    (local / "dir").mkdir()
    os.symlink("file", local / "link")
    for name in ("file", "dir"):
        client.chmod(f"{work}/{name}", 0o1751)
        assert stat.S_IMODE((local / name).stat().st_mode) == 0o1751
        client.lchown(f"{work}/{name}", 1234, 5678)
        assert ((local / name).stat().st_uid, (local / name).stat().st_gid) == (1234, 5678)
        assert (client.stat(f"{work}/{name}").uid, client.stat(f"{work}/{name}").gid) == (1234, 5678)
        atime, mtime = 1_000_000_000_123_456_000, 1_500_000_000_987_654_000
        client.lutimes(f"{work}/{name}", atime, mtime)
        seen = (local / name).stat()
        assert (seen.st_atime_ns, seen.st_mtime_ns) == (atime, mtime)  # at least to the microsecond
        assert client.stat(f"{work}/{name}").mtime_ns == mtime

    client.lchown(f"{work}/link", 4321, 8765)  # the link itself, not its target
    assert (os.lstat(local / "link").st_uid, (local / "file").stat().st_uid) == (4321, 1234)
    client.chmod(f"{work}/link", 0o640)  # chmod follows the link, like chmod(2)
    assert stat.S_IMODE((local / "file").stat().st_mode) == 0o640
    with pytest.raises(FileNotFoundError):
        client.chmod(f"{work}/absent", 0o600)
    with pytest.raises(FileNotFoundError):
        client.lchown(f"{work}/absent/deeper", 1, 1)


def test_truncate_extends_sparsely(client: Client, work: str, nfs_server: NfsServer) -> None:
    (nfs_server.export_dir / work / "sparse").write_bytes(b"head")
    client.truncate(f"{work}/sparse", 1 << 30)
    on_disk = (nfs_server.export_dir / work / "sparse").stat()
    assert on_disk.st_size == client.stat(f"{work}/sparse").size == 1 << 30
    assert on_disk.st_blocks * 512 < MiB
    assert client.stat(f"{work}/sparse").used < MiB


def test_errors_carry_their_errno(client: Client, work: str) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        client.stat(f"{work}/absent")
    assert missing.value.filename == f"{work}/absent"
    with pytest.raises(FileNotFoundError):
        client.lstat(f"{work}/absent")
    with pytest.raises(FileExistsError):
        client.mkdir(work, 0o755)
    client.mkdir(f"{work}/full", 0o755)
    client.mkdir(f"{work}/full/inner", 0o755)
    with pytest.raises(OSError) as not_empty:
        client.rmdir(f"{work}/full")
    assert not_empty.value.errno == errno.ENOTEMPTY
    handle = client.open(f"{work}/file", os.O_CREAT | os.O_WRONLY)
    handle.close()
    with pytest.raises(FileExistsError):
        client.open(f"{work}/file", os.O_CREAT | os.O_EXCL | os.O_RDWR)
    with pytest.raises(NotADirectoryError):
        client.listdir(f"{work}/file")


def test_fsstat(client: Client, work: str) -> None:
    usage = client.fsstat(work)
    assert usage.total_bytes > 0
    assert 0 < usage.available_bytes <= usage.total_bytes


def test_threads_share_one_client(client: Client, work: str, nfs_server: NfsServer) -> None:
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for step in range(50):
                path = f"{work}/t{index}-{step}"
                client.mkdir(path, 0o750)
                assert client.stat(path).is_dir
                client.rmdir(path)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert os.listdir(nfs_server.export_dir / work) == []


def test_nothing_listening_fails_instead_of_hanging() -> None:
    with pytest.raises(OSError) as refused:
        Client("127.0.0.1", EXPORT, port=free_port(), timeout=2.0)
    assert "127.0.0.1" in str(refused.value)


def test_without_libnfs(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: object, **kwargs: object) -> None:
        raise OSError("libnfs.so.13: cannot open shared object file")

    monkeypatch.setattr(libnfs, "_lib", None)
    monkeypatch.setattr(ctypes, "CDLL", missing)
    with pytest.raises(OSError) as absent:
        Client("127.0.0.1", EXPORT)
    assert absent.value.errno == errno.ENOSYS
    assert "libnfs13" in str(absent.value)


def test_unknown_export(nfs_server: NfsServer) -> None:
    with pytest.raises(FileNotFoundError):
        Client("127.0.0.1", "/no-such-export", port=nfs_server.port, timeout=2.0)


def test_close_is_idempotent(nfs_server: NfsServer) -> None:
    tree = Client("127.0.0.1", EXPORT, port=nfs_server.port)
    name = f"libnfs-close-{uuid.uuid4().hex[:12]}"
    handle = tree.open(name, os.O_CREAT | os.O_RDWR)
    tree.close()  # closes the file too
    tree.close()
    handle.close()
    with pytest.raises(OSError) as closed:
        tree.stat("")
    assert closed.value.errno == errno.EBADF
    (nfs_server.export_dir / name).unlink()


def wait_stopped(pid: int) -> None:
    """Until every thread of ``pid`` is stopped: SIGSTOP takes effect per thread, and a
    thread still running may answer a call sent at once."""
    for _ in range(1000):
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat", encoding="ascii") as handle:
                states.append(handle.read().rsplit(")", 1)[1].split()[0])
        if all(state in ("T", "t") for state in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"server {pid} did not stop: thread states {states}")


def test_a_stopped_server_times_out_then_recovers(client: Client, work: str, nfs_server: NfsServer) -> None:
    own_server(nfs_server)
    quick = Client("127.0.0.1", EXPORT, port=nfs_server.port, timeout=2.0)
    try:
        os.kill(nfs_server.pid, signal.SIGSTOP)
        try:
            wait_stopped(nfs_server.pid)
            with pytest.raises(TimeoutError):
                quick.stat(work)
            with pytest.raises(TimeoutError):
                quick.chmod(work, 0o700)  # our own compound times out too
        finally:
            os.kill(nfs_server.pid, signal.SIGCONT)
        assert quick.stat(work).is_dir
    finally:
        quick.close()


def test_reconnects_after_a_server_restart(client: Client, work: str, nfs_server: NfsServer) -> None:
    own_server(nfs_server)
    handle = client.open(f"{work}/open", os.O_CREAT | os.O_RDWR)
    nfs_server.restart()
    assert client.stat(work).is_dir  # mounted again, transparently
    with pytest.raises(OSError) as stale:
        handle.pread(1, 0)
    assert stale.value.errno == errno.ESTALE
    handle.close()
    nfs_server.stop()
    try:
        with pytest.raises(OSError):
            client.stat(work)
    finally:
        nfs_server.resume()
    assert client.stat(work).is_dir


def test_root_squash(nfs_server: NfsServer) -> None:
    squashed = Client("127.0.0.1", SQUASHED, port=nfs_server.port, uid=0, gid=0)
    name = f"libnfs-{uuid.uuid4().hex[:12]}"
    try:
        squashed.mkdir(name, 0o755)
        handle = squashed.open(f"{name}/file", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        handle.pwrite(b"squashed", 0)
        handle.close()
        on_disk = (nfs_server.squashed_dir / name / "file").stat()
        assert (on_disk.st_uid, on_disk.st_gid) == (65534, 65534)
        assert stat.S_IMODE(on_disk.st_mode) == 0o644
        assert squashed.stat(f"{name}/file").uid == 65534
        squashed.unlink(f"{name}/file")
        squashed.rmdir(name)
    finally:
        squashed.close()
        shutil.rmtree(Path(nfs_server.squashed_dir) / name, ignore_errors=True)


def test_a_client_idle_past_its_lease_works_on(client: Client, work: str, nfs_server: NfsServer) -> None:
    """The test server grants 10 s leases and libnfs 4.0 never renews one by itself: after
    an idle spell the server has forgotten the client, and the client makes itself known
    again instead of failing the call (what a long copy elsewhere, or a quiet controller,
    would otherwise meet)."""
    path = f"{work}/after-the-lease"
    with opened(client, f"{work}/before", os.O_CREAT | os.O_WRONLY, 0o644) as handle:
        handle.pwrite(b"x", 0)
    time.sleep(25)
    with opened(client, path, os.O_CREAT | os.O_WRONLY, 0o644) as handle:
        handle.pwrite(b"written after the lease ran out", 0)
    assert (nfs_server.export_dir / path).read_bytes() == b"written after the lease ran out"


def test_one_file_opened_twice_at_once_leaves_the_client_working(client: Client, work: str) -> None:
    """libnfs 4.0 loses its open-state sequence when one context opens a file twice at
    once (a second CLOSE fails, then every open): the client lets one opener at a time
    hold a file, so concurrent readers of one record (listings in parallel) wait their
    turn instead of breaking the client."""
    path = f"{work}/record.json"
    with opened(client, path, os.O_CREAT | os.O_WRONLY, 0o644) as handle:
        handle.pwrite(b'{"x": 1}', 0)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(30):
                with opened(client, path, os.O_RDONLY) as handle:
                    assert handle.pread(64, 0) == b'{"x": 1}'
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with opened(client, path, os.O_RDONLY) as handle:
        assert handle.pread(64, 0) == b'{"x": 1}'
