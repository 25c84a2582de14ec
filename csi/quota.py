"""Project quotas: a size limit on one folder tree of an XFS or ext4 filesystem, the way a
share's size is enforced where the driver reaches the exported filesystem itself.

A folder gets a project ID, inherited by everything made below it later (and set on what
is there already); the project's hard block limit is the volume's size, so a write past
it fails (EDQUOT, or ENOSPC from XFS). The filesystem must be mounted with project quotas
(``prjquota``; ext4 made with ``-O quota,project``). Tools: ``xfs_quota`` (xfsprogs) for
XFS, ``chattr`` (e2fsprogs), ``setquota`` and ``quotaon`` (quota) for ext4. ext4 lets a
writer with CAP_SYS_RESOURCE (root on the server: an export without root squashing, and a
pod running as root) exceed the limit; XFS enforces project quotas for every writer.
"""

from __future__ import annotations

import os

from csi import mount, proc
from csi.errors import CairnError, FailedPrecondition

SUPPORTED = ("xfs", "ext4")
MAX_PROJECT = (1 << 32) - 2


def mount_of(path: str) -> mount.MountEntry | None:
    """The mount that holds ``path`` (the longest mount point above it)."""
    real = os.path.realpath(path)
    best: mount.MountEntry | None = None
    for entry in mount.mounts():
        inside = real == entry.target or real.startswith(entry.target.rstrip("/") + "/")
        if inside and (best is None or len(entry.target) >= len(best.target)):
            best = entry
    return best


def enforced_at(path: str) -> str | None:
    """Why sizes cannot be enforced under ``path``, or None when project quotas work there
    (asked of the filesystem's own tools: mount options do not show it for ext4)."""
    entry = mount_of(path)
    if entry is None:
        return f"{path} is on no mount this process sees"
    if entry.fstype not in SUPPORTED:
        return f"{path} is on {entry.fstype}, which has no project quotas here (XFS and ext4 do)"
    try:
        if entry.fstype == "xfs":
            state = proc.run(["xfs_quota", "-x", "-c", "state -p", entry.target], timeout=30).stdout
            on = "Enforcement: ON" in state
        else:
            state = proc.run(["quotaon", "-p", "-P", entry.target], timeout=30, ok_codes=(0, 1)).stdout
            on = " is on" in state
    except CairnError as exc:
        return f"cannot ask {entry.target} about project quotas: {exc}"
    if not on:
        return f"{entry.target} ({entry.fstype}) does not enforce project quotas (mount it with prjquota)"
    return None


def project_for(path: str) -> int:
    """A project ID unique on the filesystem for as long as the folder exists: its inode
    number (where it fits the 32-bit project ID)."""
    inode = os.lstat(path).st_ino
    if not 0 < inode <= MAX_PROJECT:
        raise FailedPrecondition(f"inode {inode} of {path} does not fit a project ID")
    return inode


def limit(path: str, project: int, size: int) -> None:
    """Put ``path`` and everything below it in ``project`` and cap the project at ``size``
    bytes (rounded up to whole KiB)."""
    entry = _quota_mount(path)
    if entry.fstype == "xfs":
        proc.run(["xfs_quota", "-x", "-c", f"project -s -p {path} {project}", entry.target], timeout=600)
    else:
        proc.run(["chattr", "-R", "+P", "-p", str(project), path], timeout=600)
    _cap(entry, project, size)


def grow(path: str, project: int, size: int) -> None:
    """Raise the project's cap (the folder's project is set already)."""
    _cap(_quota_mount(path), project, size)


def release(path: str, project: int) -> None:
    """Drop the project's cap (its folder is being removed)."""
    entry = mount_of(path)
    if entry is not None and entry.fstype in SUPPORTED:
        _cap(entry, project, 0)


def _quota_mount(path: str) -> mount.MountEntry:
    entry = mount_of(path)
    if entry is None or entry.fstype not in SUPPORTED:
        raise FailedPrecondition(f"{path}: no filesystem with project quotas")
    return entry


def _cap(entry: mount.MountEntry, project: int, size: int) -> None:
    """The project's hard block limit: ``size`` bytes rounded up to whole KiB (0: none)."""
    kib = -(-size // 1024)
    if entry.fstype == "xfs":
        proc.run(["xfs_quota", "-x", "-c", f"limit -p bhard={kib}k {project}", entry.target])
    else:
        proc.run(["setquota", "-P", str(project), "0", str(kib), "0", "0", entry.target])
