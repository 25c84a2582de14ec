"""What the nfs controller does to trees on an export, written once over ``fs.Tree`` so it
runs the same through the user-space client and on a local directory: small records
written atomically, folders made without following planted links, trees removed and
copied.

A copy keeps modes, owners, timestamps, hardlinks, symbolic links and holes (a block of
zeros is not written, and the file is sized at the end). It is consistent per file: a
file that changes while it is copied (its size, mtime or ctime moves) is copied again,
and a file that keeps changing fails the copy, so a copy never holds a torn file. Files
are copied at different instants, so the copy of a live directory is what a backup tool
would make, not an atomic image (see the README).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat as statmod
import uuid
from collections.abc import Callable
from typing import Any

from csi.backends.nfs.fs import Stat, Tree, opened
from csi.errors import Aborted, InvalidArgument

CHUNK = 1 << 20
STALE_ATTEMPTS = 3
"""Reads and writes of a small record redone when the client reconnected meanwhile."""
COPY_ATTEMPTS = 3
_ZERO = bytes(CHUNK)


def join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def exists(tree: Tree, path: str) -> bool:
    try:
        tree.lstat(path)
    except FileNotFoundError:
        return False
    return True


def read_json(tree: Tree, path: str) -> dict[str, Any] | None:
    """A small record, or None. A client that had to reconnect while the file was open
    (ESTALE: another call found the connection lost) reads it again."""
    for attempt in range(STALE_ATTEMPTS):
        try:
            with opened(tree, path, os.O_RDONLY) as handle:
                size = handle.fstat().size
                data = handle.pread(size, 0)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ESTALE or attempt == STALE_ATTEMPTS - 1:
                raise
            continue
        record: dict[str, Any] = json.loads(data)
        return record
    raise AssertionError("unreachable")


def write_json(tree: Tree, path: str, record: dict[str, Any]) -> None:
    """Write ``record`` at ``path`` so a reader sees the old or the new, never a torn one."""
    data = json.dumps(record, sort_keys=True).encode()
    for attempt in range(STALE_ATTEMPTS):
        temp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with opened(tree, temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) as handle:
                handle.pwrite(data, 0)
                handle.fsync()
            tree.rename(temp, path)
            return
        except OSError as exc:
            remove_file(tree, temp)
            if exc.errno != errno.ESTALE or attempt == STALE_ATTEMPTS - 1:
                raise
        except BaseException:
            remove_file(tree, temp)
            raise


def remove_file(tree: Tree, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        tree.unlink(path)


def make_dirs(tree: Tree, parts: list[str], mode: int = 0o755) -> None:
    """Make each missing folder of ``parts``; an existing component that is not a real
    folder (a symbolic link planted on the export, a file) is refused."""
    path = ""
    for part in parts:
        path = join(path, part)
        try:
            st = tree.lstat(path)
        except FileNotFoundError:
            try:
                tree.mkdir(path, mode)
            except FileExistsError:
                st = tree.lstat(path)  # made meanwhile: checked below
            else:
                continue
        if not st.is_dir:
            kind = "a symbolic link" if st.is_symlink else "not a folder"
            raise InvalidArgument(f"{path!r} on the export is {kind}: refusing to place a volume through it")


def check_no_links(tree: Tree, parts: list[str]) -> None:
    """Refuse a path whose existing components include a symbolic link or a file."""
    path = ""
    for part in parts[:-1]:
        path = join(path, part)
        try:
            st = tree.lstat(path)
        except FileNotFoundError:
            return
        if not st.is_dir:
            raise InvalidArgument(f"{path!r} on the export is not a folder: refusing to follow it")


def remove_tree(tree: Tree, path: str, as_owner: Callable[[Stat], Tree] | None = None) -> None:
    """Remove ``path`` and everything below it; missing is fine. ``as_owner`` gives a
    tree that acts as a folder's owner, for exports that squash root: there the owner of
    each folder removes its entries (and may first give itself back read, write and search
    permission on it)."""
    try:
        st = tree.lstat(path)
    except FileNotFoundError:
        return
    _remove_tree(tree, path, st, as_owner, None)


def _remove_tree(
    tree: Tree, path: str, st: Stat, as_owner: Callable[[Stat], Tree] | None, parent_owner: Tree | None
) -> None:
    """``st`` is ``path``'s, as whoever could see it (below a folder only its owner may
    search, ``tree`` cannot); ``parent_owner`` acts as the owner of the folder holding it."""
    if not st.is_dir:
        remove_file(tree, path)
        return
    actor = as_owner(st) if as_owner else tree
    if as_owner is not None and statmod.S_IMODE(st.mode) & statmod.S_IRWXU != statmod.S_IRWXU:
        # A folder its owner took permissions from (0500, 0300, 0000): the mode is the
        # owner's to change, whatever it is, so it may list, search and empty it again.
        actor.chmod(path, statmod.S_IMODE(st.mode) | statmod.S_IRWXU)
    for name in actor.listdir(path):
        child = join(path, name)
        try:
            child_st = actor.lstat(child)
        except FileNotFoundError:
            continue
        if child_st.is_dir:
            _remove_tree(tree, child, child_st, as_owner, actor)
        else:
            try:
                actor.unlink(child)
            except PermissionError:
                if as_owner is None:
                    raise
                actor.chmod(path, statmod.S_IMODE(st.mode) | statmod.S_IRWXU)
                actor.unlink(child)
    try:
        tree.rmdir(path)
    except FileNotFoundError:
        pass
    except PermissionError:
        if as_owner is None:
            raise
        if parent_owner is None:
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            parent_owner = as_owner(tree.lstat(parent))
        parent_owner.rmdir(path)


def copy_tree(tree: Tree, source: str, target: str) -> None:
    """Copy the folder ``source`` to ``target`` (which must not exist) with everything
    below it; see the module's docstring for what is kept."""
    links: dict[int, str] = {}
    _copy_dir(tree, source, target, tree.lstat(source), links)


def _copy_dir(tree: Tree, source: str, target: str, st: Stat, links: dict[int, str]) -> None:
    tree.mkdir(target, 0o700)
    for name in sorted(tree.listdir(source)):
        src, dst = join(source, name), join(target, name)
        try:
            child = tree.lstat(src)
        except FileNotFoundError:
            continue  # removed since the listing: not part of the copy
        if child.is_dir:
            _copy_dir(tree, src, dst, child, links)
        elif child.is_symlink:
            tree.symlink(tree.readlink(src), dst)
            _attributes(tree, dst, child, {}, symlink=True)
        elif child.is_file:
            if child.nlink > 1 and child.ino in links:
                tree.link(links[child.ino], dst)
                continue
            copy_file(tree, src, dst)
            if child.nlink > 1:
                links[child.ino] = dst
        # Sockets, FIFOs and device nodes are not data; they are left out.
    _attributes(tree, target, st, tree.xattrs(source))


def copy_file(tree: Tree, source: str, target: str) -> None:
    """Copy one regular file, keeping holes, attributes, and consistency (the copy is
    redone while the source changes under it)."""
    for attempt in range(COPY_ATTEMPTS):
        if attempt:
            remove_file(tree, target)
        before = tree.lstat(source)
        # Shared extents where the filesystem can (instant, holes stay holes), else bytes.
        if not tree.clone_file(source, target):
            _copy_bytes(tree, source, target, before.size)
        after = tree.lstat(source)
        if (after.size, after.mtime_ns, after.ctime_ns) == (before.size, before.mtime_ns, before.ctime_ns):
            _attributes(tree, target, before, tree.xattrs(source))
            return
    raise Aborted(f"file {source!r} kept changing while it was copied ({COPY_ATTEMPTS} attempts); try again")


def _copy_bytes(tree: Tree, source: str, target: str, size: int) -> None:
    """Copy ``size`` bytes, writing no block of zeros (the target keeps the holes)."""
    with (
        opened(tree, source, os.O_RDONLY) as src,
        opened(tree, target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as dst,
    ):
        offset = 0
        while offset < size:
            data = src.pread(min(CHUNK, size - offset), offset)
            if not data:
                break
            if data != _ZERO[: len(data)]:
                dst.pwrite(data, offset)
            offset += len(data)
        dst.truncate(size)
        dst.fsync()


def _attributes(tree: Tree, path: str, st: Stat, source_xattrs: dict[str, bytes], symlink: bool = False) -> None:
    with contextlib.suppress(PermissionError):  # a squashed client cannot give files away
        tree.lchown(path, st.uid, st.gid)
    if not symlink:
        tree.chmod(path, statmod.S_IMODE(st.mode))
        # After the mode: a POSIX ACL (an xattr) carries the mode's bits and its own mask.
        for name, value in source_xattrs.items():
            tree.set_xattr(path, name, value)
    try:
        tree.lutimes(path, st.atime_ns, st.mtime_ns)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOTSUP):
            raise
