"""Loop devices: expose a file as a block device. Used by the local backend, and by any
connector that reaches an image as a file (rbd-fuse). The device is found again from its
backing file, so no state needs recording and a restarted driver finds what it attached.

The kernel is asked directly, through the ioctls of linux/loop.h, with no losetup
process: what is attached is read from sysfs (``/sys/block/loopN/loop/``, present only
while the device is attached), a device is picked with LOOP_CTL_GET_FREE and set up with
LOOP_CONFIGURE (LOOP_SET_FD and LOOP_SET_STATUS64 on kernels before 5.8), detached with
LOOP_CLR_FD and resized with LOOP_SET_CAPACITY, as losetup does by default (no direct
I/O, no partition scan, no autoclear). A request the kernel refuses raises what
``errors.refused`` makes of the errno's text, as losetup's failures did: no space
is RESOURCE_EXHAUSTED, busy or refused FAILED_PRECONDITION, missing NOT_FOUND."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import struct
import time
from collections.abc import Callable, Collection

from csi import mount
from csi.errors import FailedPrecondition, ResourceExhausted, refused
from csi.waiting import Backoff

log = logging.getLogger(__name__)

DETACH_WAIT = 5.0
"""How long ``detach`` waits for the kernel to let go of a device that was still open."""

# Requests and flags of linux/loop.h.
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_CONFIGURE = 0x4C0A  # Linux 5.8 and later
LOOP_CTL_GET_FREE = 0x4C82  # on /dev/loop-control
LO_FLAGS_READ_ONLY = 1
LO_NAME_SIZE = 64
LOOP_MAJOR = 7  # linux/major.h

# struct loop_info64 (linux/loop.h): lo_device, lo_inode, lo_rdevice, lo_offset,
# lo_sizelimit (__u64); lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (__u32);
# lo_file_name[LO_NAME_SIZE], lo_crypt_name[LO_NAME_SIZE], lo_encrypt_key[32] (__u8);
# lo_init[2] (__u64). 232 bytes, no padding.
_INFO64 = "5Q4I64s64s32s2Q"
LOOP_INFO64 = struct.Struct("=" + _INFO64)
# struct loop_config (linux/loop.h): fd, block_size (__u32), info (struct loop_info64),
# __reserved[8] (__u64). 304 bytes.
LOOP_CONFIG = struct.Struct("=2I" + _INFO64 + "8Q")

CONTROL = "/dev/loop-control"
SYS_BLOCK = "/sys/block"
_DEVICE_NAME = re.compile(r"loop[0-9]+")

ATTACH_TRIES = 16
"""How many free devices ``attach`` tries when other processes keep taking the one the
kernel offered before this one binds it."""
EAGAIN_TRIES = 10
"""How often a request the kernel answers EAGAIN (a device still flushing) is repeated,
EAGAIN_PAUSE seconds apart, as losetup does."""
EAGAIN_PAUSE = 0.05


def attached() -> dict[str, str]:
    """Map of loop device -> backing file for every attached loop device."""
    return dict(_bound())


def find(path: str) -> list[str]:
    """Loop devices whose backing file is ``path``, in device order. A device is matched
    by the file's inode and filesystem, not only by the path the kernel shows: that path
    is the one the attaching process saw, and when it attached through a mount that is
    gone (a node plugin container replaced by an upgrade or a restart) the path shown is
    relative to that mount, so a match by path alone would leave the device attached for
    ever. A file that no longer exists is matched by its path."""
    return _find(os.path.realpath(path))


def attach(path: str, read_only: bool = False) -> str:
    """The loop device backed by ``path``, attaching one (read-only if asked) when there
    is none."""
    existing = find(path)
    if existing:
        return existing[0]
    path = os.path.realpath(path)
    backing, flags = _open_backing(path, read_only)
    try:
        taken: set[int] = set()
        for _ in range(ATTACH_TRIES):
            number = _free_number(path)
            if number in taken:
                time.sleep(EAGAIN_PAUSE)  # offered again: whoever holds it has not bound it yet
            device = f"/dev/loop{number}"
            try:
                _bind(device, backing, flags, path)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise refused(f"cannot attach {path} to {device}", exc) from exc
                taken.add(number)  # another process bound it first: ask for another
                continue
            log.debug(
                "attached loop device",
                extra={"device": device, "file": path, "read_only": bool(flags & LO_FLAGS_READ_ONLY)},
            )
            return device
    finally:
        os.close(backing)
    raise ResourceExhausted(
        f"cannot attach {path}: other processes took each of the {ATTACH_TRIES} loop devices offered first"
    )


def detach(path: str, wait: float = DETACH_WAIT) -> None:
    """Detach every loop device backed by ``path``; none attached is fine.

    The kernel detaches a device only once nothing holds it open: LOOP_CLR_FD on a device
    still in use succeeds, yet only marks the device to detach itself at its last close
    (autoclear), as ``losetup --detach`` does. What holds it may let go in a moment (a
    probe of the device), or not for long (a copy of its mount in another mount namespace,
    a container started while it was mounted). So this returns only once each device has
    let go of ``path``, waiting up to ``wait`` seconds, and otherwise raises
    FailedPrecondition naming what holds it where that can be seen: the device is not
    detached yet, and a retry finishes the job once it is released (the device stays
    marked, and detaches itself then)."""
    path = os.path.realpath(path)
    devices = _find(path)
    for device in devices:
        try:
            _request(device, LOOP_CLR_FD)
        except OSError as exc:
            if _find(path, among=[device]):
                raise refused(f"cannot detach {device} from {path}", exc) from exc
            # otherwise it detached meanwhile: at its last close, or by another call
        log.debug("asked loop device to detach", extra={"device": device, "file": path})
    deadline = time.monotonic() + wait
    backoff = Backoff()
    while held := _find(path, among=devices):
        if time.monotonic() >= deadline:
            raise FailedPrecondition(
                f"loop device {', '.join(held)} of {path} is still in use {wait:g}s after it was detached: "
                f"{_holders(held)}; it detaches once that lets go of it, and a retry then succeeds"
            )
        backoff.sleep()


def refresh_size(device: str) -> None:
    """Make the loop device see its backing file's current size."""
    try:
        _request(device, LOOP_SET_CAPACITY)
    except OSError as exc:
        back = _backing_file(os.path.basename(device))
        of = f" of {back}" if back else ""
        raise refused(f"cannot refresh the size of loop device {device}{of}", exc) from exc
    log.debug("refreshed loop device size", extra={"device": device})


# -- what is attached ---------------------------------------------------------------


def _bound(names: Collection[str] | None = None) -> list[tuple[str, str]]:
    """(device, backing file) of each attached loop device (of those ``names`` only, when
    given), in number order. The file is shown as the kernel shows it: its path from this
    process's root, or from the root of the mount namespace it was attached in when that
    mount is not reachable from here; a deleted file without its " (deleted)"."""
    if names is None:
        try:
            names = os.listdir(SYS_BLOCK)
        except OSError:
            return []  # no sysfs: nothing can be seen attached
    found = []
    for name in sorted((n for n in names if _DEVICE_NAME.fullmatch(n)), key=lambda n: int(n[4:])):
        back = _backing_file(name)
        if back is not None:
            found.append((f"/dev/{name}", back))
    return found


def _backing_file(name: str) -> str | None:
    """The backing file of loop device ``name`` (``loopN``), None when it is detached."""
    try:
        with open(f"{SYS_BLOCK}/{name}/loop/backing_file", "rb") as handle:
            shown = handle.read()
    except OSError:
        return None  # the kernel shows loop/ only while the device is attached
    return os.fsdecode(shown.removesuffix(b"\n")).removesuffix(" (deleted)")


def _find(path: str, among: Collection[str] | None = None) -> list[str]:
    """``find`` of a resolved ``path``, among the devices ``among`` only when given.
    A device showing ``path`` matches without being opened; only the others are opened
    (briefly) to compare the file's inode and device, so waiting for a device this
    driver attached never holds it open."""
    try:
        info = os.stat(path)
        identity: tuple[int, int, int] | None = (info.st_ino, os.major(info.st_dev), os.minor(info.st_dev))
    except OSError:
        identity = None
    names = None if among is None else [os.path.basename(device) for device in among]
    found = []
    for device, back in _bound(names):
        if back == path or (identity is not None and _backing_identity(device) == identity):
            found.append(device)
    return sorted(found)


def _backing_identity(device: str) -> tuple[int, int, int] | None:
    """(inode, major, minor) of the file backing ``device``, from LOOP_GET_STATUS64
    (lo_inode; lo_device, in the kernel's encoding, which os.major and os.minor read);
    None when the device cannot be opened (it is detaching, or has no node here) or is
    not attached."""
    try:
        fd = os.open(device, os.O_RDONLY)
    except OSError:
        return None
    try:
        status = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))
    except OSError:
        return None
    finally:
        os.close(fd)
    lo_device, lo_inode = LOOP_INFO64.unpack(status)[:2]
    return lo_inode, os.major(lo_device), os.minor(lo_device)


# -- requests -------------------------------------------------------------------------


def _open_backing(path: str, read_only: bool) -> tuple[int, int]:
    """The backing file opened for the device, and the device's flags. A file that may
    not be written (EROFS, EACCES) is attached read-only, as losetup does."""
    try:
        return os.open(path, os.O_RDONLY if read_only else os.O_RDWR), LO_FLAGS_READ_ONLY if read_only else 0
    except OSError as exc:
        if read_only or exc.errno not in (errno.EROFS, errno.EACCES):
            raise refused(f"cannot attach {path}", exc) from exc
    try:
        return os.open(path, os.O_RDONLY), LO_FLAGS_READ_ONLY
    except OSError as exc:
        raise refused(f"cannot attach {path}", exc) from exc


def _free_number(path: str) -> int:
    """The number of a loop device no file is attached to (the kernel adds one if need be)."""
    try:
        control = os.open(CONTROL, os.O_RDWR)
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot attach {path}: this host offers no loop devices ({CONTROL}: {exc.strerror or exc})"
        ) from exc
    try:
        return fcntl.ioctl(control, LOOP_CTL_GET_FREE)
    except OSError as exc:
        raise ResourceExhausted(f"cannot attach {path}: no free loop device ({exc.strerror or exc})") from exc
    finally:
        os.close(control)


def _bind(device: str, backing: int, flags: int, path: str) -> None:
    """Attach the open file ``backing`` to ``device`` with ``flags``, naming it ``path``
    (lo_file_name, what the kernel shows where sysfs is not available). The device is
    opened read-only for a read-only device: the kernel makes a device read-only when
    either it or the file is. EBUSY: another process bound it first."""
    fd = _open_device(device, os.O_RDONLY if flags & LO_FLAGS_READ_ONLY else os.O_RDWR)
    try:
        info = (0, 0, 0, 0, 0, 0, 0, 0, flags, os.fsencode(path)[: LO_NAME_SIZE - 1], b"", b"", 0, 0)
        try:
            _configure(fd, backing, info)
            return
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTTY):
                raise
        # A kernel without LOOP_CONFIGURE: bind, then describe; undone if describing fails.
        fcntl.ioctl(fd, LOOP_SET_FD, backing)
        try:
            _repeat_on_eagain(lambda: fcntl.ioctl(fd, LOOP_SET_STATUS64, LOOP_INFO64.pack(*info)))
        except OSError:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, LOOP_CLR_FD)
            raise
    finally:
        os.close(fd)


def _configure(fd: int, backing: int, info: tuple[int | bytes, ...]) -> None:
    """LOOP_CONFIGURE: bind and describe in one step (block size 0: the default)."""
    config = LOOP_CONFIG.pack(backing, 0, *info, *(0,) * 8)
    _repeat_on_eagain(lambda: fcntl.ioctl(fd, LOOP_CONFIGURE, config))


def _repeat_on_eagain(request: Callable[[], object]) -> None:
    for attempt in range(EAGAIN_TRIES):
        try:
            request()
            return
        except OSError as exc:
            if exc.errno != errno.EAGAIN or attempt == EAGAIN_TRIES - 1:
                raise
            time.sleep(EAGAIN_PAUSE)


def _request(device: str, request: int) -> None:
    """Send ``request`` (no argument) to ``device``, opened read-only as losetup does."""
    fd = _open_device(device, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, request)
    finally:
        os.close(fd)


def _open_device(device: str, flags: int) -> int:
    """Open loop device ``device``, making its node first when the kernel has the device
    but this /dev has no node for it (a container's own /dev, which no devtmpfs or udev
    fills): the numbers come from sysfs (the minor is not always the device's number)."""
    try:
        return os.open(device, flags)
    except FileNotFoundError:
        name = os.path.basename(device)
        if os.path.dirname(device) != "/dev" or not _DEVICE_NAME.fullmatch(name):
            raise
        try:
            with open(f"{SYS_BLOCK}/{name}/dev", encoding="ascii") as handle:
                major, minor = (int(part) for part in handle.read().split(":"))
        except (OSError, ValueError):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), device) from None
        if major == LOOP_MAJOR:
            with contextlib.suppress(FileExistsError):
                os.mknod(device, stat.S_IFBLK | 0o660, os.makedev(major, minor))
        return os.open(device, flags)


def _holders(devices: list[str]) -> str:
    """What keeps ``devices`` open, as far as this host shows it."""
    found = [f"mounted at {m}" for device in devices for m in mount.mounts_elsewhere(device)]
    for device in devices:
        stacked = f"{SYS_BLOCK}/{os.path.basename(device)}/holders"
        with contextlib.suppress(OSError):
            found += [f"device {holder} is stacked on {device}" for holder in sorted(os.listdir(stacked))]
    if not found:
        return "held open by a process, or by a filesystem that was unmounted while frozen"
    return "; ".join(found)
