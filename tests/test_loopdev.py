"""Loop devices are found again from their backing file, whoever attached them and
through whichever mount; they are set up, resized and detached through the kernel's
loop ioctls as losetup would, and losetup sees them as its own."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from csi import loopdev
from csi.errors import CommandNotFound, FailedPrecondition, ResourceExhausted
from tests.support import leftovers, require_root, require_tools, scrub

pytestmark = pytest.mark.integration

MiB = 1 << 20
BLKROGET = 0x125E  # linux/fs.h: _IO(0x12, 94)
BLKGETSIZE64 = 0x80081272  # linux/fs.h: _IOR(0x12, 114, size_t)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def root_and_no_leftovers(tmp_path: Path) -> Iterator[None]:
    """Each test runs as root and leaves no loop device on its files (any it left is
    detached, and the test fails)."""
    require_root()
    yield
    left = leftovers(tmp_path)
    scrub(tmp_path)
    assert not left, f"test left behind: {left}"


def image(directory: Path, name: str = "vol.img", size: int = 16 * MiB) -> Path:
    path = directory / name
    with path.open("wb") as handle:
        handle.truncate(size)
    return path


def read_only(device: str) -> bool:
    fd = os.open(device, os.O_RDONLY)
    try:
        return bool(struct.unpack("i", fcntl.ioctl(fd, BLKROGET, bytes(4)))[0])
    finally:
        os.close(fd)


def writes(device: str) -> bool:
    """Whether a block written to ``device`` is taken."""
    try:
        fd = os.open(device, os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, b"x" * 4096)
        os.fsync(fd)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        return int(struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0])
    finally:
        os.close(fd)


def losetup_shows(device: str) -> dict[str, Any]:
    """What ``losetup --list`` shows of ``device``."""
    listed = subprocess.run(
        ["losetup", "--list", "--json", "--output", "NAME,BACK-FILE,RO,AUTOCLEAR,DIO,PARTSCAN,OFFSET", device],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (shown,) = json.loads(listed)["loopdevices"]
    return dict(shown)


def test_a_device_attached_through_a_mount_that_is_gone_is_found_and_detached(tmp_path: Path) -> None:
    """A node plugin container attaches an image through its own mount of the backend's
    directory; once that container is replaced (an upgrade), the kernel shows the backing
    file relative to the vanished mount. The new plugin must still find the device, or
    unstaging leaves it attached, holding a deleted image's space."""
    require_tools("losetup", "unshare", "mount")
    data, view = tmp_path / "data", tmp_path / "view"
    data.mkdir()
    view.mkdir()
    image(data)
    attached = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount --bind {data} {view} && losetup --find --show {view}/vol.img"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        shown = loopdev.attached()[attached]
        assert shown != str(data / "vol.img"), f"the kernel shows {shown}: the namespace's mount should be gone"
        assert loopdev.find(str(data / "vol.img")) == [attached]
        loopdev.detach(str(data / "vol.img"))
        assert attached not in loopdev.attached()
    finally:
        subprocess.run(["losetup", "--detach", attached], capture_output=True, check=False)


def test_attach_sets_a_device_up_as_losetup_does_and_finds_it_again(tmp_path: Path) -> None:
    require_tools("losetup")
    path = image(tmp_path)
    device = loopdev.attach(str(path))
    assert losetup_shows(device) == {
        "name": device, "back-file": str(path), "ro": False, "autoclear": False, "dio": False,
        "partscan": False, "offset": 0,
    }  # fmt: skip
    assert loopdev.attached()[device] == str(path)
    assert loopdev.find(str(path)) == [device]
    assert loopdev.attach(str(path)) == device, "attaching again made a second device"
    assert not read_only(device)
    with open(device, "r+b", buffering=0) as handle:
        handle.write(b"through the device")
        os.fsync(handle.fileno())
    assert path.read_bytes()[:18] == b"through the device"
    loopdev.detach(str(path))
    assert loopdev.find(str(path)) == [] and device not in loopdev.attached()


def test_a_read_only_device_cannot_be_written(tmp_path: Path) -> None:
    require_tools("losetup")
    path = image(tmp_path)
    device = loopdev.attach(str(path), read_only=True)
    try:
        assert read_only(device)
        assert losetup_shows(device)["ro"] is True
        assert not writes(device)
        assert path.read_bytes() == bytes(16 * MiB)
    finally:
        loopdev.detach(str(path))


def test_a_file_that_cannot_be_written_is_attached_read_only(tmp_path: Path) -> None:
    """As losetup does: asked for a writable device over a file on a read-only mount,
    attach gives a read-only one rather than failing."""
    require_tools("mount", "umount")
    directory = tmp_path / "ro"
    directory.mkdir()
    path = image(directory)
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        device = loopdev.attach(str(path))
        try:
            assert read_only(device)
        finally:
            loopdev.detach(str(path))
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_refresh_size_shows_a_grown_file(tmp_path: Path) -> None:
    path = image(tmp_path, size=16 * MiB)
    device = loopdev.attach(str(path))
    try:
        os.truncate(path, 48 * MiB)
        assert size(device) == 16 * MiB, "the device followed the file by itself"
        loopdev.refresh_size(device)
        assert size(device) == 48 * MiB
    finally:
        loopdev.detach(str(path))


def test_refresh_size_of_a_detached_device_is_not_found(tmp_path: Path) -> None:
    path = image(tmp_path)
    device = loopdev.attach(str(path))
    loopdev.detach(str(path))
    with pytest.raises(CommandNotFound, match=f"{device}.*No such device"):
        loopdev.refresh_size(device)


def test_a_device_is_found_by_its_file_under_another_name(tmp_path: Path) -> None:
    """The kernel shows the name the file was attached by; a hard link is the same file,
    found by its inode and device."""
    path = image(tmp_path)
    other = tmp_path / "link.img"
    os.link(path, other)
    device = loopdev.attach(str(path))
    assert loopdev.attached()[device] == str(path)
    assert loopdev.find(str(other)) == [device]
    assert loopdev.attach(str(other)) == device
    loopdev.detach(str(other))
    assert loopdev.find(str(path)) == []


def test_a_device_of_a_deleted_file_is_found_by_its_path(tmp_path: Path) -> None:
    path = image(tmp_path)
    device = loopdev.attach(str(path))
    path.unlink()
    assert loopdev.attached()[device] == str(path), "the kernel's ' (deleted)' was kept"
    assert loopdev.find(str(path)) == [device]
    loopdev.detach(str(path))
    assert device not in loopdev.attached()


def test_a_missing_file_is_not_found_and_detaching_nothing_is_fine(tmp_path: Path) -> None:
    with pytest.raises(CommandNotFound, match=r"missing\.img: No such file"):
        loopdev.attach(str(tmp_path / "missing.img"))
    loopdev.detach(str(tmp_path / "missing.img"))
    assert loopdev.find(str(tmp_path / "missing.img")) == []


def test_detaching_a_device_held_open_waits_then_fails_and_it_detaches_at_its_last_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel only marks a device in use to detach at its last close; detach waits
    for that and otherwise fails, without itself opening the device it waits for."""
    path = image(tmp_path)
    device = loopdev.attach(str(path))
    holder = os.open(device, os.O_RDONLY)
    try:

        def opened(opened: str) -> None:
            assert opened != device, f"{device} shows the file's path: it need not be opened"

        with monkeypatch.context() as patched:
            patched.setattr(loopdev, "_backing_identity", opened)
            with pytest.raises(FailedPrecondition, match=f"loop device {device} of {path} is still in use"):
                loopdev.detach(str(path), wait=0.2)
        assert loopdev.find(str(path)) == [device]
        assert Path(f"/sys/block/{os.path.basename(device)}/loop/autoclear").read_text().strip() == "1"
    finally:
        os.close(holder)
    assert loopdev.find(str(path)) == [], "the device did not detach at its last close"


def test_detaching_waits_for_a_holder_that_lets_go(tmp_path: Path) -> None:
    path = image(tmp_path)
    device = loopdev.attach(str(path))
    holder = os.open(device, os.O_RDONLY)
    release = threading.Timer(0.3, os.close, [holder])
    release.start()
    try:
        loopdev.detach(str(path), wait=10)
    finally:
        release.join()
    assert device not in loopdev.attached()


def test_a_device_taken_by_another_process_first_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the kernel offering a free device and attach binding it, another process
    may bind it: attach asks for another, and the other process's device is untouched."""
    theirs, ours = image(tmp_path, "theirs.img"), image(tmp_path, "ours.img")
    taken = loopdev.attach(str(theirs))
    number = int(taken.removeprefix("/dev/loop"))
    free = loopdev._free_number
    offers = [number]

    def offer(path: str) -> int:
        return offers.pop() if offers else free(path)

    monkeypatch.setattr(loopdev, "_free_number", offer)
    device = loopdev.attach(str(ours))
    assert device != taken
    assert loopdev.attached()[taken] == str(theirs) and loopdev.attached()[device] == str(ours)
    loopdev.detach(str(ours))
    loopdev.detach(str(theirs))


def test_attach_gives_up_when_every_device_offered_is_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs, ours = image(tmp_path, "theirs.img"), image(tmp_path, "ours.img")
    taken = loopdev.attach(str(theirs))
    monkeypatch.setattr(loopdev, "ATTACH_TRIES", 3)
    monkeypatch.setattr(loopdev, "_free_number", lambda path: int(taken.removeprefix("/dev/loop")))
    with pytest.raises(ResourceExhausted, match=f"cannot attach {ours}"):
        loopdev.attach(str(ours))
    assert loopdev.find(str(ours)) == [] and loopdev.attached()[taken] == str(theirs)
    loopdev.detach(str(theirs))


def test_concurrent_attaches_each_get_a_device_of_their_own(tmp_path: Path) -> None:
    paths = [str(image(tmp_path, f"vol-{n}.img")) for n in range(4)]
    with ThreadPoolExecutor(len(paths)) as pool:
        for _ in range(3):
            devices = list(pool.map(loopdev.attach, paths))
            assert len(set(devices)) == len(paths), devices
            shown = loopdev.attached()
            assert [shown[device] for device in devices] == paths
            list(pool.map(loopdev.detach, paths))
            assert not set(devices) & set(loopdev.attached())


def test_concurrent_attaches_of_one_file_leave_nothing_once_it_is_detached(tmp_path: Path) -> None:
    """attach finds before it attaches and is meant to run under the volume's lock; two
    callers racing without it may each attach a device, and detach removes all of them."""
    path = str(image(tmp_path))
    start = threading.Barrier(2)

    def attach() -> str:
        start.wait()
        return loopdev.attach(path)

    with ThreadPoolExecutor(2) as pool:
        devices = set(pool.map(lambda _: attach(), range(2)))
    assert devices <= set(loopdev.find(path)) and loopdev.find(path)
    loopdev.detach(path)
    assert loopdev.find(path) == [] and not devices & set(loopdev.attached())


def test_without_loop_configure_the_device_is_set_up_in_two_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel before 5.8 answers LOOP_CONFIGURE with EINVAL: LOOP_SET_FD, then
    LOOP_SET_STATUS64, give the same device."""
    require_tools("losetup")

    def unsupported(fd: int, backing: int, info: tuple[int | bytes, ...]) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(loopdev, "_configure", unsupported)
    writable, readable = image(tmp_path, "rw.img"), image(tmp_path, "ro.img")
    rw, ro = loopdev.attach(str(writable)), loopdev.attach(str(readable), read_only=True)
    try:
        assert losetup_shows(rw)["back-file"] == str(writable) and not read_only(rw)
        assert losetup_shows(ro)["back-file"] == str(readable) and read_only(ro)
        fd = os.open(rw, os.O_RDONLY)
        try:
            status = loopdev.LOOP_INFO64.unpack(fcntl.ioctl(fd, loopdev.LOOP_GET_STATUS64, bytes(232)))
        finally:
            os.close(fd)
        assert status[9].rstrip(b"\0") == str(writable).encode()[: loopdev.LO_NAME_SIZE - 1]
    finally:
        loopdev.detach(str(writable))
        loopdev.detach(str(readable))


def test_a_device_node_missing_from_dev_is_made(tmp_path: Path) -> None:
    """In a container whose /dev has no node for the device the kernel offers, attach
    makes the node (its numbers from sysfs) instead of failing."""
    require_tools("unshare", "mount")
    path = image(tmp_path)
    control = os.stat("/dev/loop-control").st_rdev
    script = (
        "import os, stat; from csi import loopdev\n"
        f"device = loopdev.attach({str(path)!r})\n"
        "print(device, stat.S_ISBLK(os.stat(device).st_mode), os.major(os.stat(device).st_rdev))\n"
    )
    shell = (
        "mount -t tmpfs none /dev && "
        f"mknod /dev/loop-control c {os.major(control)} {os.minor(control)} && "
        f'exec {sys.executable} -c "$0"'
    )
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, script],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert out.returncode == 0, out.stderr
        device, block, major = out.stdout.split()
        assert (block, major) == ("True", "7")
        assert loopdev.find(str(path)) == [device]
    finally:
        loopdev.detach(str(path))
