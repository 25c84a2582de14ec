"""The one place that formats, mounts, bind-mounts, unmounts, grows filesystems and reads
filesystem statistics. Everything here is idempotent where the CSI flows need it to be:
mounting what is already mounted the same way and unmounting what is not mounted are
both no-ops."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from csi import proc
from csi.errors import CommandBusy, CommandFailed, FailedPrecondition
from csi.model import Filesystem, FilesystemStats

log = logging.getLogger(__name__)

MKFS_TIMEOUT = 600.0

# Options that make mkfs fast on a volume that was just created and so holds only zeros:
# skip discarding every block and initialise inode tables and the journal lazily.
_FAST_MKFS = {
    Filesystem.EXT4: ["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"],
    Filesystem.XFS: ["-K"],
}

# XFS refuses to mount two filesystems with one UUID; a restored snapshot or a clone
# shares its source's UUID, so Cairn always mounts XFS with nouuid.
_ALWAYS_MOUNT_OPTIONS = {Filesystem.EXT4: (), Filesystem.XFS: ("nouuid",)}


@dataclass(frozen=True)
class MountEntry:
    source: str
    target: str
    fstype: str
    options: tuple[str, ...]
    root: str
    device_number: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def mounts() -> list[MountEntry]:
    """The mount table of this process's mount namespace."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8") as table:
        for line in table:
            fields = line.split()
            sep = fields.index("-")
            entries.append(
                MountEntry(
                    source=_unescape(fields[sep + 2]),
                    target=_unescape(fields[4]),
                    fstype=fields[sep + 1],
                    options=tuple(fields[5].split(",")),
                    root=_unescape(fields[3]),
                    device_number=fields[2],
                )
            )
    return entries


def find_mount(target: str) -> MountEntry | None:
    """The topmost mount on ``target``, or None."""
    target = os.path.realpath(target)
    found = None
    for entry in mounts():
        if entry.target == target:
            found = entry
    return found


def is_mounted(target: str) -> bool:
    return find_mount(target) is not None


def probe_filesystem(device: str) -> str | None:
    """The filesystem type on ``device``, or None when the device holds nothing that
    blkid recognises. A partition table or unknown signature refuses formatting."""
    result = proc.run(["blkid", "-p", "-o", "export", device], ok_codes=(0, 2))
    if result.returncode == 2:
        return None
    found = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    if "TYPE" in found:
        return found["TYPE"]
    raise FailedPrecondition(f"device {device} holds data blkid cannot name ({found}); refusing to format it")


def make_filesystem(device: str, fs: Filesystem, options: Sequence[str] = ()) -> None:
    argv = [f"mkfs.{fs.value}", "-q", *_FAST_MKFS[fs], *options, device]
    proc.run(argv, timeout=MKFS_TIMEOUT)


def mount(source: str, target: str, fstype: str, options: Sequence[str] = ()) -> None:
    argv = ["mount", "-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    proc.run([*argv, source, target])


def format_and_mount(
    device: str, target: str, fs: Filesystem, mkfs_options: Sequence[str], mount_options: Sequence[str]
) -> bool:
    """Mount ``device`` on ``target`` as ``fs``, creating the filesystem first only when the
    device is blank, and growing an existing one that is smaller than the device.
    Returns True when it formatted."""
    existing = probe_filesystem(device)
    formatted = existing is None
    if existing is None:
        make_filesystem(device, fs, mkfs_options)
    elif existing != fs.value:
        raise FailedPrecondition(f"device {device} already holds {existing}, not the {fs.value} asked for")
    elif fs is Filesystem.EXT4 and "ro" not in mount_options:
        grow_ext4_offline(device)
    options = list(dict.fromkeys([*_ALWAYS_MOUNT_OPTIONS[fs], *mount_options]))
    mount(device, target, fs.value, options)
    if fs is Filesystem.XFS and not formatted and "ro" not in mount_options:
        # XFS grows only while mounted; xfs_growfs is a no-op when nothing is to grow.
        grow_filesystem(device, target, fs)
    return formatted


def ext4_size(device: str) -> int:
    """Bytes the ext4 filesystem on ``device`` spans, from its superblock."""
    header = proc.run(["dumpe2fs", "-h", device]).stdout
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    return int(fields["Block count"]) * int(fields["Block size"])


def grow_ext4_offline(device: str) -> None:
    """Grow an unmounted ext4 filesystem that is smaller than its device: a volume
    restored into a larger one, or expanded while no node had it staged. Offline
    growth works on every kernel; resize2fs insists on a fresh check first."""
    if device_size(device) - ext4_size(device) < 1 << 20:
        return
    proc.run(["e2fsck", "-f", "-p", device], timeout=MKFS_TIMEOUT, ok_codes=(0, 1))
    proc.run(["resize2fs", device], timeout=MKFS_TIMEOUT)


def bind(source: str, target: str, readonly: bool = False, options: Sequence[str] = ()) -> None:
    """Bind-mount ``source`` (directory or device node) on ``target``; read-only takes a
    second remount, which is undone if it fails so no writable bind is left behind."""
    proc.run(["mount", "--bind", source, target])
    extra = [o for o in options if o not in ("bind", "rw", "ro")]
    if readonly or extra:
        remount = ["remount", "bind", "ro" if readonly else "rw", *extra]
        try:
            proc.run(["mount", "-o", ",".join(remount), target])
        except CommandFailed:
            unmount(target)
            raise


def unmount(target: str) -> None:
    """Unmount everything stacked on ``target``; a path that is not mounted is fine. A
    busy mount is FailedPrecondition naming what holds it, where a mount does."""
    for _ in range(8):
        if not is_mounted(target):
            return
        try:
            proc.run(["umount", target])
        except CommandBusy as exc:
            real = os.path.realpath(target)
            inside = [e.target for e in mounts() if e.target.startswith(real + "/")]
            holder = f"mounts inside it: {', '.join(inside)}" if inside else "a process has files open or works in it"
            raise CommandBusy(exc.argv, exc.returncode, f"{exc.stderr} ({holder})") from exc
    raise FailedPrecondition(f"{target} is still mounted after 8 unmounts")


def grow_filesystem(device: str, mount_path: str, fs: Filesystem) -> None:
    """Grow the mounted filesystem on ``device`` to fill it. A kernel that refuses to
    grow it while mounted (online ext4 growth needs CAP_SYS_RESOURCE) is
    FailedPrecondition with the reason: the volume grows at its next stage instead."""
    argv = ["resize2fs", device] if fs is Filesystem.EXT4 else ["xfs_growfs", mount_path]
    try:
        proc.run(argv, timeout=MKFS_TIMEOUT)
    except CommandFailed as exc:
        refused = ("Operation not permitted", "Permission denied", "Inappropriate ioctl", "not supported")
        if any(reason in exc.stderr for reason in refused):
            raise FailedPrecondition(
                f"the {fs.value} filesystem on {device} (mounted at {mount_path}) cannot grow while mounted on this "
                f"node: {exc.stderr.splitlines()[-1] if exc.stderr else exc}; it grows when the volume is next staged"
            ) from exc
        raise


def filesystem_stats(path: str) -> FilesystemStats:
    st = os.statvfs(path)
    return FilesystemStats(
        total_bytes=st.f_blocks * st.f_frsize,
        available_bytes=st.f_bavail * st.f_frsize,
        used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
        total_inodes=st.f_files,
        available_inodes=st.f_favail,
        used_inodes=st.f_files - st.f_ffree,
    )


def device_size(device: str) -> int:
    """Size in bytes of a block device (or regular file)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def remove_path(path: str) -> None:
    """Remove an unmounted publish target: an empty directory, or the empty file a block
    volume was bound on. Anything holding data is not the driver's to delete and stays;
    a missing path is fine."""
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(path)
        elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
            os.unlink(path)
        else:
            log.warning("leaving %s in place: it is not an empty directory or file", path)
    except OSError as exc:
        if exc.errno == errno.ENOTEMPTY:
            log.warning("leaving %s in place: the directory is not empty", path)
        elif exc.errno != errno.ENOENT:
            raise


def device_of(entry: MountEntry) -> str | None:
    """The block device a mount shows: its source for a filesystem, or the device node
    itself for a bind mount of one (a published raw block volume)."""
    if entry.source.startswith("/dev/"):
        return entry.source
    if entry.fstype == "devtmpfs" and entry.root not in ("", "/"):
        return "/dev" + entry.root
    return None


def users_of(device: str) -> list[str]:
    """Mount points that show ``device``: filesystems on it and binds of its node."""
    real = os.path.realpath(device)
    return [e.target for e in mounts() if (shown := device_of(e)) and os.path.realpath(shown) == real]


def writable_mount_of(device: str) -> str | None:
    """One read-write mount point of the filesystem on ``device``, or None. Bind mounts
    of it share the filesystem, so one is enough to freeze it."""
    for entry in mounts():
        if entry.source == device and "rw" in entry.options:
            return entry.target
    return None


@contextmanager
def frozen(devices: Sequence[str]) -> Iterator[None]:
    """Freeze the filesystems mounted from ``devices`` (flushing their caches and holding
    new writes) for the duration of the block, then thaw them, whatever happens."""
    held: list[str] = []
    try:
        for device in devices:
            target = writable_mount_of(device)
            if target is not None:
                proc.run(["fsfreeze", "--freeze", target], timeout=60)
                held.append(target)
        yield
    finally:
        for target in reversed(held):
            try:
                proc.run(["fsfreeze", "--unfreeze", target], timeout=60)
            except CommandFailed:
                log.exception("could not thaw %s", target)
