"""How the nfs backend's controller sees an export: a small set of POSIX-like calls on
paths relative to the export's root, with two implementations behind one protocol.

- ``libnfs.Client`` speaks NFSv4 to the server in user space (no mount, no privilege).
- ``LocalTree`` runs the same calls on a directory of this host: the exported
  filesystem itself when the server runs beside the driver (``exportRoot``), which is
  also what lets the backend set project quotas.

Paths are relative, '/'-separated and already checked (``paths.py``); every failure is
an ``OSError`` with its errno, so callers handle both the same way.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat as statmod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from csi.extents import data_ranges

FICLONE = 0x40049409
"""The ioctl that makes a file share another's extents (linux/fs.h)."""


@dataclass(frozen=True)
class Stat:
    mode: int
    ino: int
    nlink: int
    uid: int
    gid: int
    size: int
    used: int  # bytes allocated (holes excluded)
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    @property
    def is_dir(self) -> bool:
        return statmod.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return statmod.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return statmod.S_ISLNK(self.mode)


@dataclass(frozen=True)
class FsStat:
    total_bytes: int
    available_bytes: int


class File(Protocol):
    def pread(self, size: int, offset: int) -> bytes: ...
    def pwrite(self, data: bytes, offset: int) -> None: ...  # writes all of it or raises
    def truncate(self, size: int) -> None: ...
    def fsync(self) -> None: ...
    def fstat(self) -> Stat: ...
    def close(self) -> None: ...


class Tree(Protocol):
    """An export's tree. Implementations are safe to call from many threads."""

    def describe(self) -> str: ...
    def stat(self, path: str) -> Stat: ...
    def lstat(self, path: str) -> Stat: ...
    def fsstat(self, path: str) -> FsStat: ...
    def listdir(self, path: str) -> list[str]: ...
    def mkdir(self, path: str, mode: int) -> None: ...
    def rmdir(self, path: str) -> None: ...
    def unlink(self, path: str) -> None: ...
    def rename(self, old: str, new: str) -> None: ...
    def link(self, existing: str, new: str) -> None: ...
    def symlink(self, target: str, path: str) -> None: ...
    def readlink(self, path: str) -> str: ...
    def chmod(self, path: str, mode: int) -> None: ...
    def lchown(self, path: str, uid: int, gid: int) -> None: ...
    def lutimes(self, path: str, atime_ns: int, mtime_ns: int) -> None: ...
    def truncate(self, path: str, size: int) -> None: ...
    def clone_file(self, source: str, target: str) -> bool: ...  # True: cloned (shared extents)
    def data_ranges(self, path: str, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The ranges [low, high) of file ``path`` within [start, end) that may hold data,
        in order and apart; what lies outside them reads as zeros. The whole span where
        holes cannot be told. Lazy: the file is looked at as the ranges are taken."""
        ...

    def xattrs(self, path: str) -> dict[str, bytes]: ...
    def set_xattr(self, path: str, name: str, value: bytes) -> None: ...
    def open(self, path: str, flags: int, mode: int = 0o600) -> File: ...
    def close(self) -> None: ...


def _stat(st: os.stat_result) -> Stat:
    return Stat(
        mode=st.st_mode,
        ino=st.st_ino,
        nlink=st.st_nlink,
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size,
        used=st.st_blocks * 512,
        atime_ns=st.st_atime_ns,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
    )


class _LocalFile:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def fstat(self) -> Stat:
        return _stat(os.fstat(self.fd))

    def close(self) -> None:
        os.close(self.fd)


class LocalTree:
    """The tree under a directory of this host. Every call resolves its path below the
    root without following a symbolic link on the way (``O_NOFOLLOW`` walk is not
    needed: paths come checked, and the backend never walks into a link it did not
    make)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def describe(self) -> str:
        return self.root

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def stat(self, path: str) -> Stat:
        return _stat(os.stat(self._path(path)))

    def lstat(self, path: str) -> Stat:
        return _stat(os.lstat(self._path(path)))

    def fsstat(self, path: str) -> FsStat:
        st = os.statvfs(self._path(path))
        return FsStat(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(self._path(path))

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._path(path), mode)
        os.chmod(self._path(path), mode)  # not narrowed by the umask

    def rmdir(self, path: str) -> None:
        os.rmdir(self._path(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._path(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._path(old), self._path(new))

    def link(self, existing: str, new: str) -> None:
        os.link(self._path(existing), self._path(new), follow_symlinks=False)

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self._path(path))

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._path(path), mode)

    def lchown(self, path: str, uid: int, gid: int) -> None:
        os.lchown(self._path(path), uid, gid)

    def lutimes(self, path: str, atime_ns: int, mtime_ns: int) -> None:
        os.utime(self._path(path), ns=(atime_ns, mtime_ns), follow_symlinks=False)

    def truncate(self, path: str, size: int) -> None:
        os.truncate(self._path(path), size)

    def clone_file(self, source: str, target: str) -> bool:
        """Make ``target`` share ``source``'s extents (a reflink: XFS with reflink, btrfs),
        durably; False where the filesystem cannot, and nothing made."""
        src = os.open(self._path(source), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            dst = os.open(
                self._path(target), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            try:
                fcntl.ioctl(dst, FICLONE, src)
                os.fsync(dst)
            except OSError as exc:
                os.close(dst)
                os.unlink(self._path(target))
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS):
                    return False
                raise
            os.close(dst)
            return True
        finally:
            os.close(src)

    def data_ranges(self, path: str, start: int, end: int) -> Iterator[tuple[int, int]]:
        """From ``lseek`` (SEEK_DATA, SEEK_HOLE); the whole span on a filesystem without
        them. The file is open while the ranges are taken."""
        fd = os.open(self._path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            yield from data_ranges(fd, start, end)
        finally:
            os.close(fd)

    def xattrs(self, path: str) -> dict[str, bytes]:
        """Extended attributes, POSIX ACLs included (``system.posix_acl_*``)."""
        full = self._path(path)
        try:
            names = os.listxattr(full, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM):
                return {}  # a filesystem (or a symbolic link) without them
            raise
        return {name: os.getxattr(full, name, follow_symlinks=False) for name in names}

    def set_xattr(self, path: str, name: str, value: bytes) -> None:
        os.setxattr(self._path(path), name, value, follow_symlinks=False)

    def open(self, path: str, flags: int, mode: int = 0o600) -> File:
        return _LocalFile(os.open(self._path(path), flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode))

    def close(self) -> None:
        return None


@contextmanager
def opened(tree: Tree, path: str, flags: int, mode: int = 0o600) -> Iterator[File]:
    handle = tree.open(path, flags, mode)
    try:
        yield handle
    finally:
        handle.close()
