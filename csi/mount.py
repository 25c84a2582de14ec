"""The one place that formats, mounts, bind-mounts, unmounts, grows filesystems and reads
filesystem statistics. Everything here is idempotent where the CSI flows need it to be:
mounting what is already mounted the same way and unmounting what is not mounted are
both no-ops.

A network filesystem (NFS, a FUSE daemon) whose server is gone blocks any process that
touches it, in the kernel, until the server answers (a ``hard`` NFS mount: forever). So
nothing here looks at a mount point in this process: the mount table is read from
/proc, paths are resolved without a stat of their last name, and the statistics of a
network filesystem are read by a child process with a timeout (``probe``), which tells
a healthy mount from a stale one (ESTALE: its server restarted) or one that does not
answer. Unmounting such a mount falls back to a forced, then a lazy unmount.

Bind mounts, and unmounts of local filesystems, are made with the mount(2) and umount2(2)
system calls rather than mount(8) and umount(8): a process start each costs more than
the call itself. Mounts that need a helper (a filesystem type, network filesystems)
and option strings the table below does not know still go through the tools."""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import hashlib
import json
import logging
import os
import re
import select
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from csi import proc
from csi.errors import (
    Aborted,
    CommandBusy,
    CommandFailed,
    CommandTimeout,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    refused,
)
from csi.files import TEMP_SUFFIX, fsync_dir, write_atomically
from csi.model import Filesystem, FilesystemStats
from csi.waiting import Backoff

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


def mounts(pid: str = "self") -> list[MountEntry]:
    """The mount table of this process's mount namespace (or of process ``pid``'s)."""
    entries = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8") as table:
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


def canonical(path: str) -> str:
    """``path`` as the mount table names it: absolute, its folders' symlinks resolved,
    its last name left as it is. Resolving the last name would stat it, and a stat of a
    dead network mount blocks; a mount point is never a symlink, so it needs none."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else parent


def find_mount(target: str) -> MountEntry | None:
    """The topmost mount on ``target``, or None. Reads the mount table only: a mount on
    ``target`` is found without touching it. A ``target`` that is a symlink (never a
    mount point) is followed."""
    wanted = canonical(target)
    found = None
    for entry in mounts():
        if entry.target == wanted:
            found = entry
    if found is None and os.path.islink(wanted):
        resolved = os.path.realpath(wanted)
        return find_mount(resolved) if resolved != wanted else None
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


# What mkfs prints when it refuses its arguments (before it touches the device).
_MKFS_REFUSALS = re.compile(r"usage:|invalid option|unrecognized option|unknown option|illegal option|bad option", re.I)


def make_filesystem(device: str, fs: Filesystem, options: Sequence[str] = ()) -> None:
    """Format ``device``; options from the StorageClass that mkfs refuses are the
    caller's mistake (InvalidArgument naming them), not a failure of the node."""
    argv = [f"mkfs.{fs.value}", "-q", *_FAST_MKFS[fs], *options, device]
    try:
        proc.run(argv, timeout=MKFS_TIMEOUT)
    except CommandFailed as exc:
        if options and _MKFS_REFUSALS.search(exc.stderr):
            first = exc.stderr.splitlines()[0] if exc.stderr else ""
            raise InvalidArgument(f"mkfsOptions {' '.join(options)!r} refused by mkfs.{fs.value}: {first}") from exc
        raise


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
    if existing is None and "ro" in mount_options:
        raise FailedPrecondition(
            f"device {device} holds no filesystem yet, and read-only access cannot make one: "
            "stage the volume for writing once first"
        )
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
    check(device)
    proc.run(["resize2fs", device], timeout=MKFS_TIMEOUT)


def check(device: str) -> None:
    """Check an unmounted ext4 filesystem, repairing what is safe; a filesystem that the
    safe repairs leave inconsistent (a resize interrupted by a crash: no further stage
    could ever grow or mount it) is repaired in full, and that is logged."""
    result = proc.run(["e2fsck", "-f", "-p", device], timeout=MKFS_TIMEOUT, ok_codes=(0, 1, 2, 4))
    if result.returncode == 4:
        log.warning("repairing %s in full: the safe repairs were not enough (%s)", device, result.stdout.strip())
        proc.run(["e2fsck", "-f", "-y", device], timeout=MKFS_TIMEOUT, ok_codes=(0, 1, 2))


# Per-mount flags a bind remount can set (linux/mount.h), and those mountinfo shows.
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 0x20, 0x400, 0x800, 0x1000
MS_RELATIME, MS_STRICTATIME, MS_NOSYMFOLLOW = 0x200000, 0x1000000, 0x100
_MOUNT_FLAGS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
    "nosymfollow": MS_NOSYMFOLLOW,
}
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount_call(argv: Sequence[str], source: str, target: str, flags: int) -> None:
    """mount(2) for a bind or a bind remount; a failure is classified as its mount(8)
    equivalent ``argv`` would be."""
    if _libc.mount(source.encode(), target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        code = ctypes.get_errno()
        raise refused(" ".join(argv), OSError(code, os.strerror(code)))


def _umount_call(target: str) -> None:
    if _libc.umount2(target.encode(), 0) != 0:
        code = ctypes.get_errno()
        raise refused(f"umount {target}", OSError(code, os.strerror(code)))


def bind(source: str, target: str, readonly: bool = False, options: Sequence[str] = ()) -> None:
    """Bind-mount ``source`` (directory or device node) on ``target``; read-only (or
    options) take a second remount, which is undone if it fails so no writable bind is
    left behind. The remount keeps the flags the bind has (a bind copies its source's
    nosuid, nodev, ...) and adds those asked for."""
    _mount_call(["mount", "--bind", source, target], source, target, MS_BIND)
    extra = [o for o in options if o not in ("bind", "rw", "ro")]
    if not (readonly or extra):
        return
    remount = ["remount", "bind", "ro" if readonly else "rw", *extra]
    try:
        if all(o in _MOUNT_FLAGS for o in extra):
            entry = find_mount(target)
            shown = entry.options if entry else ()
            flags = MS_REMOUNT | MS_BIND | (MS_RDONLY if readonly else 0)
            for option in [*(o for o in shown if o != "ro"), *extra]:
                flags |= _MOUNT_FLAGS.get(option, 0)
            _mount_call(["mount", "-o", ",".join(remount), target], "none", target, flags)
        else:
            proc.run(["mount", "-o", ",".join(remount), target])
    except BaseException:  # whatever failed, no writable (or half-optioned) bind stays
        unmount(target)
        raise


def unmount(target: str) -> None:
    """Unmount everything stacked on ``target``; a path that is not mounted is fine. A
    busy mount is FailedPrecondition naming what holds it, where a mount does. A network
    mount whose server does not answer, or whose handle is stale, is unmounted by force
    (lazily where even that fails), never waited for."""
    for _ in range(8):
        entry = find_mount(target)
        if entry is None:
            return
        if is_network(entry):
            _unmount_network(entry)
            continue
        try:
            _umount_call(entry.target)
        except CommandBusy as exc:
            raise _busy(target, exc) from exc
    raise FailedPrecondition(f"{target} is still mounted after 8 unmounts")


def _busy(target: str, exc: CommandBusy) -> CommandBusy:
    real = canonical(target)
    inside = [e.target for e in mounts() if e.target.startswith(real + "/")]
    holder = f"mounts inside it: {', '.join(inside)}" if inside else "a process has files open or works in it"
    return CommandBusy(exc.argv, exc.returncode, f"{exc.stderr} ({holder})")


def _unmount_network(entry: MountEntry) -> None:
    """Unmount the network filesystem mounted as ``entry``: as usual while its server
    answers (busy is FailedPrecondition, as for any mount), by force when it does not,
    its handle is stale, or the plain unmount runs past UMOUNT_TIMEOUT. The umount calls
    name the mount point as the mount table does and resolve nothing (``-c``), so they
    stat nothing on it either."""
    health = probe(entry.target, entry=entry)
    if health.condition in (Condition.OK, Condition.ERROR):
        try:
            proc.run(["umount", "--no-canonicalize", entry.target], timeout=UMOUNT_TIMEOUT)
            return
        except CommandBusy as exc:
            raise _busy(entry.target, exc) from exc
        except CommandTimeout:
            reason = f"umount did not finish within {UMOUNT_TIMEOUT:g} s"
    else:
        reason = health.message
    log.warning("forcing the unmount of %s: %s", entry.target, reason)
    _force_unmount(entry)


def _force_unmount(entry: MountEntry) -> None:
    """``umount --force`` (which aborts the calls waiting on the server), then, if the
    mount is still there, ``umount --lazy`` (detached now, released by the kernel once
    unused). Each bounded by FORCE_TIMEOUT; neither runs the filesystem's umount helper
    (``-i``), which may talk to the server."""
    target = entry.target
    for flag in ("--force", "--lazy"):
        try:
            proc.run(["umount", flag, "--internal-only", "--no-canonicalize", target], timeout=FORCE_TIMEOUT)
            if flag == "--lazy":
                log.warning("detached %s lazily: the kernel releases it once nothing uses it", target)
            return
        except (CommandFailed, CommandTimeout) as exc:
            if find_mount(target) != entry:
                return  # unmounted after all (a forced unmount killed while releasing the filesystem)
            if flag == "--lazy":
                raise
            log.warning("umount --force of %s failed (%s); detaching it lazily", target, exc)


# -- network filesystems: health without blocking --------------------------------------

PROBE_TIMEOUT = 10.0
"""Seconds a network filesystem has to answer a statfs before it counts as not responding."""
UMOUNT_TIMEOUT = 30.0
FORCE_TIMEOUT = 10.0
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "ceph", "fuse"})
_STALE = ("Stale file handle", "Transport endpoint is not connected")
_STATFS_FORMAT = "%S %b %f %a %c %d"  # fragment size, blocks, free, available, inodes, free inodes


def is_network(entry: MountEntry) -> bool:
    """Whether the mount is served from elsewhere (a server, a FUSE daemon), so touching
    it may block for as long as that does not answer."""
    return entry.fstype in NETWORK_FILESYSTEMS or entry.fstype.startswith("fuse.")


class Condition(enum.Enum):
    OK = "ok"
    STALE = "stale"
    """The handle is stale (ESTALE: the server restarted or the export changed) or the
    FUSE daemon is gone (ENOTCONN): it answers, but only with errors, until mounted again."""
    HUNG = "hung"
    """No answer within the timeout: the server is down or unreachable."""
    ERROR = "error"
    """Any other error reading it."""


@dataclass(frozen=True)
class Health:
    condition: Condition
    stats: FilesystemStats | None = None
    message: str = ""


def _describe(entry: MountEntry | None, path: str) -> str:
    if entry is None:
        return f"the filesystem at {path}"
    if entry.fstype in ("nfs", "nfs4"):
        return f"NFS server {entry.source} (mounted at {path})"
    return f"{entry.fstype} filesystem {entry.source} (mounted at {path})"


def probe(path: str, timeout: float | None = None, entry: MountEntry | None = None) -> Health:
    """The statistics of the filesystem at ``path``, read by a child process (``stat
    -f``) that is killed when it takes longer than ``timeout`` (PROBE_TIMEOUT): a dead
    server blocks that child, never the caller. ``entry`` is the mount at ``path`` (found
    when not given), which names the server in the message."""
    limit = PROBE_TIMEOUT if timeout is None else timeout
    if entry is None:
        entry = find_mount(path)
    what = _describe(entry, path)
    try:
        result = proc.run(["stat", "--file-system", f"--format={_STATFS_FORMAT}", "--", path], timeout=limit)
    except CommandTimeout:
        return Health(Condition.HUNG, message=f"{what} not responding (no answer within {limit:g} s)")
    except CommandFailed as exc:
        error = exc.stderr.rsplit(": ", 1)[-1] if exc.stderr else str(exc)
        if any(marker in exc.stderr for marker in _STALE):
            return Health(Condition.STALE, message=f"{what} is stale ({error}): it must be mounted again")
        return Health(Condition.ERROR, message=f"{what} cannot be read ({error})")
    try:
        frsize, blocks, free, avail, files, ffree = (int(field) for field in result.stdout.split())
    except ValueError:
        return Health(Condition.ERROR, message=f"{what}: stat printed {result.stdout.strip()!r}")
    return Health(Condition.OK, _stats(frsize, blocks, free, avail, files, ffree, ffree))


def health(path: str, timeout: float | None = None) -> Health:
    """The statistics of the filesystem at ``path`` without ever blocking on a server: a
    network filesystem mounted at ``path`` is probed in a child process; any other is
    read here (``filesystem_stats``)."""
    entry = find_mount(path)
    if entry is not None and is_network(entry):
        return probe(path, timeout, entry)
    return Health(Condition.OK, filesystem_stats(path))


def give_group(path: str, gid: str) -> None:
    """Give the filesystem at ``path`` to group ``gid``: its root's group, group read,
    write and search, and setgid, so everything made in it later belongs to the group
    too. Only the root changes (no walk through the files, which is what makes the
    kubelet's own fsGroup handling slow on large volumes and shares). Bounded, like
    everything that touches a mount."""
    proc.run(["chgrp", "--", gid, path], timeout=PROBE_TIMEOUT * 3)
    proc.run(["chmod", "g+rwxs", "--", path], timeout=PROBE_TIMEOUT * 3)


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
    """Statistics of the filesystem at ``path``, read in this process: for local
    filesystems (``health`` picks this or ``probe``)."""
    st = os.statvfs(path)
    return _stats(st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree, st.f_favail)


def _stats(frsize: int, blocks: int, free: int, avail: int, files: int, ffree: int, favail: int) -> FilesystemStats:
    """What statfs says, as the node reports it."""
    return FilesystemStats(
        total_bytes=blocks * frsize,
        available_bytes=avail * frsize,
        used_bytes=(blocks - free) * frsize,
        total_inodes=files,
        available_inodes=favail,
        used_inodes=files - ffree,
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


def source_of(entry: MountEntry) -> str:
    """What a mount shows as its source: the block device or share it mounts, or, for a
    bind mount of a device node (a published raw block volume), that device."""
    if entry.fstype == "devtmpfs" and entry.root not in ("", "/"):
        return "/dev" + entry.root
    return entry.source


def users_of(source: str) -> list[str]:
    """Mount points that show ``source``: filesystems on a device, binds of its node, or
    mounts of a share."""
    wanted = os.path.realpath(source) if source.startswith("/") else source
    found = []
    for entry in mounts():
        shown = source_of(entry)
        if (os.path.realpath(shown) if shown.startswith("/") else shown) == wanted:
            found.append(entry.target)
    return found


def mounts_elsewhere(device: str, limit: int = 4) -> list[str]:
    """Mounts of the filesystem on block device ``device`` in mount namespaces other than
    this process's, each named with its mount point and one process in that namespace
    (at most ``limit``). A process that entered a new mount namespace while the device
    was mounted here (a container starting, ``unshare -m``) holds a private copy of the
    mount, which keeps the filesystem, and so the device, in use after it is unmounted
    here. Namespaces this process may not read are not seen."""
    try:
        rdev = os.stat(device).st_rdev
        own = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return []
    number = f"{os.major(rdev)}:{os.minor(rdev)}"
    seen = {own}
    found: list[str] = []
    for pid in sorted((entry for entry in os.listdir("/proc") if entry.isdigit()), key=int):
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
            if namespace in seen:
                continue
            targets = [e.target for e in mounts(pid) if e.device_number == number]
            with open(f"/proc/{pid}/comm", encoding="utf-8") as handle:
                command = handle.read().strip()
        except OSError:
            continue  # the process ended meanwhile (another in its namespace may show it), or is not ours to read
        seen.add(namespace)
        found += [f"{target} in the mount namespace of process {pid} ({command})" for target in targets]
        if len(found) >= limit:
            return found[:limit]
    return found


def writable_mount_of(device: str) -> str | None:
    """One read-write mount point of the filesystem on ``device``, or None. Bind mounts
    of it share the filesystem, so one is enough to freeze it."""
    for entry in mounts():
        if entry.source == device and "rw" in entry.options:
            return entry.target
    return None


# -- freezing ---------------------------------------------------------------------------
#
# A freeze must end however the process that took it ends; a filesystem left frozen hangs
# every write of the pods using it. Two mechanisms see to that:
#
# * A guard process holds each freeze: a small shell whose stdin is a pipe from the driver.
#   Told to, it freezes, answers "frozen" and reads its stdin until the end; it thaws the
#   moment it gets there, that is when the driver closes the pipe (the copy is over) or
#   dies in any way (the kernel closes a dead process's pipes, SIGKILL included). It
#   ignores the signals a terminal or a polite stop sends, and thaws by itself once the
#   hold limit passes, so not even a hung driver keeps a filesystem frozen for longer.
# * A journal records each freeze before it is taken (mount point, device, the guard's
#   identity), fsynced in a directory its user owns, and forgets it once thawed. When the
#   driver and its guard die together (a container restart), the record outlives them: the
#   restarted driver's ``thaw_recorded``, or the next freeze of that filesystem, thaws it.
#   Only what a record names is thawed, never a filesystem someone else froze (a frozen
#   filesystem cannot be frozen again, so while Cairn's freeze held, nobody else's began).

FREEZE_TIMEOUT = 60.0  # freezing flushes the filesystem first
THAW_TIMEOUT = 60.0
GUARD_EXIT_WAIT = 5.0  # how long to wait for an orphaned guard to finish thawing

_GUARD_SCRIPT = """
trap '' HUP INT PIPE TERM
read -r request || exit 0
fsfreeze --freeze "$1" || exit 2
echo frozen
timeout -s KILL "$2" cat >/dev/null
held=$?
fsfreeze --unfreeze "$1" || exit 3
[ "$held" -eq 0 ] || exit 4
"""
# The guard's exit codes: 0 thawed when let go (or never asked to freeze), 2 could not
# freeze, 3 could not thaw, 4 thawed by itself after the hold limit.
_FREEZE_FAILED, _THAW_FAILED, _HELD_TOO_LONG = 2, 3, 4

_freezing: set[str] = set()  # mount points this process holds frozen
_freezing_lock = threading.Lock()


@contextmanager
def frozen(devices: Sequence[str], journal: str, limit: float) -> Iterator[None]:
    """Freeze the filesystems mounted from ``devices`` (flushing their caches and holding
    new writes) for the duration of the block, then thaw them, whatever happens: each
    freeze is held by a guard process that thaws when this process lets go or dies, and
    is recorded in ``journal`` (a directory the caller owns, given to ``thaw_recorded``
    at start-up) until it is thawed.

    A guard thaws by itself after ``limit`` seconds; the block then fails, as what it
    copied may be torn. A filesystem this process already holds frozen is Aborted (one
    copy of a volume at a time); one frozen by someone else is FailedPrecondition and
    left alone."""
    guards: list[_Guard] = []
    torn: list[str] = []
    try:
        for device in devices:
            target = writable_mount_of(device)
            if target is not None:
                guards.append(_Guard.freeze(target, device, journal, limit))
        yield
    finally:
        for guard in reversed(guards):
            if not guard.release():
                torn.append(guard.target)
    if torn:
        raise DeadlineExceeded(
            f"the filesystem at {', '.join(torn)} was thawed before the copy ended (held over {limit:g}s, "
            "or thawed by someone else), so the copy may be torn"
        )


def thaw_recorded(journal: str) -> None:
    """Thaw what the journal says a dead process froze, and forget it. Run at start-up,
    before any call is served. A record whose guard still runs is left to it: a guard
    whose driver died thaws within moments, one of a live process when its copy ends."""
    if not os.path.isdir(journal):
        return
    for entry in sorted(os.listdir(journal)):
        path = os.path.join(journal, entry)
        if entry.endswith(TEMP_SUFFIX):
            os.unlink(path)  # a record whose writing was cut short: nothing was frozen
        elif entry.endswith(".json") and not _settle(path):
            log.warning("a freeze's guard is still running; leaving it to thaw", extra={"record": path})


class _Guard:
    def __init__(self, target: str, device: str, record: str, process: subprocess.Popen[str]) -> None:
        self.target = target
        self.device = device
        self.record = record
        self.process = process

    @classmethod
    def freeze(cls, target: str, device: str, journal: str, limit: float) -> _Guard:
        with _freezing_lock:
            if target in _freezing:
                raise Aborted(f"the filesystem at {target} is frozen for another copy of it; retry when that ends")
            _freezing.add(target)
        try:
            os.makedirs(journal, exist_ok=True)
            record = os.path.join(journal, hashlib.sha256(target.encode()).hexdigest()[:32] + ".json")
            if not _settle(record):
                raise Aborted(f"an earlier freeze of the filesystem at {target} is still held; retry later")
            argv = ["sh", "-c", _GUARD_SCRIPT, "cairn-freeze", target, f"{limit:g}"]
            guard = cls(target, device, record, proc.spawn(argv))
            guard._freeze()
            return guard
        except BaseException:
            with _freezing_lock:
                _freezing.discard(target)
            raise

    def _freeze(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            record = {
                "target": self.target,
                "device": self.device,
                "boot": _boot_id(),
                "guard": self.process.pid,
                "guard_started": proc.start_time(self.process.pid),
            }
            write_atomically(self.record, json.dumps(record).encode())  # before the guard may freeze
            self.process.stdin.write("freeze\n")
            self.process.stdin.flush()
            ready, _, _ = select.select([self.process.stdout], [], [], FREEZE_TIMEOUT)
            answer = self.process.stdout.readline() if ready else None
        except BaseException:
            self._abandon()
            raise
        if answer == "frozen\n":
            return
        if answer is None:
            self._abandon()
            raise CommandTimeout(["fsfreeze", "--freeze", self.target], FREEZE_TIMEOUT)
        _, err = self.process.communicate(timeout=THAW_TIMEOUT)
        _forget(self.record)
        if "busy" in err.lower():
            raise FailedPrecondition(
                f"the filesystem at {self.target} is frozen, and not by Cairn: it cannot be copied consistently "
                f"until whoever froze it thaws it (fsfreeze --unfreeze {self.target})"
            )
        raise CommandFailed(["fsfreeze", "--freeze", self.target], self.process.returncode, err)

    def _abandon(self) -> None:
        """Let go of a guard whose freeze may or may not have happened: it thaws once its
        freeze returns. Its record stays unless it is seen to end well."""
        try:
            self.process.communicate(timeout=GUARD_EXIT_WAIT)
        except (subprocess.TimeoutExpired, OSError):
            log.warning("a freeze guard did not end in time", extra={"target": self.target, "pid": self.process.pid})
            return
        if self.process.returncode in (0, _FREEZE_FAILED):
            _forget(self.record)

    def release(self) -> bool:
        """Thaw; False when the freeze did not last until now, so the copy may be torn.
        What cannot be thawed stays recorded, for the next freeze or start-up to retry."""
        try:
            _, err = self.process.communicate(timeout=THAW_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        code = self.process.returncode
        held = code != _HELD_TOO_LONG and not (code == _THAW_FAILED and "invalid argument" in err.lower())
        if code in (0, _HELD_TOO_LONG) or _thaw(self.target, self.device):
            _forget(self.record)
        else:
            log.error(
                "could not thaw a filesystem; the next copy of it or the next start retries",
                extra={"target": self.target, "guard_exit": code, "error": err.strip()},
            )
        with _freezing_lock:
            _freezing.discard(self.target)
        return held


def _settle(path: str) -> bool:
    """Finish with the record an earlier freeze left, if any: wait for its guard to end,
    thaw the filesystem if it is still frozen (its guard was killed), forget the record.
    False when its guard still runs, or the filesystem would not thaw."""
    try:
        with open(path, encoding="utf-8") as handle:
            record: dict[str, Any] = json.load(handle)
        target, device = str(record["target"]), str(record["device"])
    except FileNotFoundError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("removing an unreadable freeze record", extra={"record": path})
        _forget(path)
        return True
    if record.get("boot") == _boot_id():  # a freeze does not survive a reboot
        deadline = time.monotonic() + GUARD_EXIT_WAIT
        backoff = Backoff()
        while proc.start_time(int(record["guard"])) == record.get("guard_started"):
            if time.monotonic() > deadline:
                return False
            backoff.sleep()
        if not _thaw(target, device):
            return False
    _forget(path)
    return True


def _thaw(target: str, device: str) -> bool:
    """Thaw the filesystem of ``device`` mounted at ``target``; True when it is not frozen
    (any more), or no longer mounted there, so not Cairn's to thaw."""
    entry = find_mount(target)
    if entry is None or entry.source != device:
        return True
    try:
        proc.run(["fsfreeze", "--unfreeze", target], timeout=THAW_TIMEOUT)
    except CommandFailed as exc:
        if "invalid argument" in exc.stderr.lower():
            return True  # not frozen
        log.error("could not thaw %s: %s", target, exc)
        return False
    except DeadlineExceeded:
        log.error("could not thaw %s in %gs", target, THAW_TIMEOUT)
        return False
    log.warning("thawed a filesystem a copy had left frozen", extra={"target": target, "device": device})
    return True


def _forget(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(os.path.dirname(path))


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
        return handle.read().strip()
