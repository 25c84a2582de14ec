"""A store in a directory of a filesystem: each key a file under the root, its slashes
folders ("chunks/ab/abcd..." is ``ROOT/chunks/ab/abcd...``). For a repository on a local
disk, an NFS export or any mounted filesystem.

A put writes a temporary file beside the target, fsyncs it, renames it over the target
and fsyncs the folder, so a reader (or a restart after a crash) sees the old object or
the new, never part of one. Temporary names contain a character no key may hold, so no
key can collide with one and listings never show them."""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Iterator

from csi.backup.store import Stored
from csi.errors import InvalidArgument, NotFound
from csi.files import fsync_dir

_COMPONENT = re.compile(r"[A-Za-z0-9._-]+")
_PREFIX = re.compile(r"[A-Za-z0-9._/-]*")
_TEMP_MARK = "~"
"""In every temporary file's name; never in a key."""


def check_key(key: str) -> None:
    """InvalidArgument unless ``key`` is relative, made of [A-Za-z0-9._-] parts joined by
    single slashes, with no "." or ".." part: a key must name a file under the root and
    nothing else."""
    parts = key.split("/")
    if not key or any(not _COMPONENT.fullmatch(part) or part in (".", "..") for part in parts):
        raise InvalidArgument(
            f"invalid store key {key!r}: it must be parts of [A-Za-z0-9._-] joined by '/', with no '.' or '..' part"
        )


class DirectoryStore:
    """A ``Store`` whose objects are the files under ``root`` (made at the first put)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    @property
    def where(self) -> str:
        return self.root

    def _path(self, key: str) -> str:
        check_key(key)
        return os.path.join(self.root, *key.split("/"))

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        folder = os.path.dirname(path)
        self._make_folders(folder, key)
        temp = os.path.join(folder, f".{os.path.basename(path)}{_TEMP_MARK}{secrets.token_hex(6)}")
        try:
            with open(temp, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        except IsADirectoryError as exc:
            raise InvalidArgument(f"store key {key!r} names a folder of other keys in {self.root}") from exc
        finally:
            if os.path.lexists(temp):
                os.unlink(temp)
        fsync_dir(folder)

    def _make_folders(self, folder: str, key: str) -> None:
        """Make ``folder`` and the folders above it up to the root, each made durable in
        its parent, so a put that returned survives a crash with its path."""
        missing: list[str] = []
        current = folder
        while not os.path.isdir(current):
            # (A folder another put made since the check above is no conflict.)
            if os.path.lexists(current) and not os.path.isdir(current):
                raise InvalidArgument(f"store key {key!r} lies under another key's object in {self.root}")
            missing.append(current)
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
        for made in reversed(missing):
            try:
                os.mkdir(made)
            except FileExistsError:
                if not os.path.isdir(made):
                    raise InvalidArgument(f"store key {key!r} lies under another key's object in {self.root}") from None
                continue
            fsync_dir(os.path.dirname(made))

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"no object {key!r} in store {self.root}") from None

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError as exc:
            raise InvalidArgument(f"store key {key!r} names a folder of other keys in {self.root}") from exc
        fsync_dir(os.path.dirname(path))

    def sweep(self, before: float) -> int:
        """Remove the temporary files of puts a crash interrupted (a put removes its own
        when it fails), last written before ``before``."""
        removed = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                if not (name.startswith(".") and _TEMP_MARK in name):
                    continue
                path = os.path.join(folder, name)
                try:
                    if os.lstat(path).st_mtime < before:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    def list(self, prefix: str = "") -> Iterator[Stored]:
        """The objects whose key starts with ``prefix``, in key order: the walk starts at
        the deepest folder the prefix names, and each folder's entries are taken in the
        order of their keys (a folder "a" as "a/", so "a-b" and "a.b" come before it)."""
        if not _PREFIX.fullmatch(prefix) or any(part in (".", "..") for part in prefix.split("/")[:-1]):
            raise InvalidArgument(f"invalid store key prefix {prefix!r}")
        folder_key, _, _ = prefix.rpartition("/")
        start = os.path.join(self.root, *folder_key.split("/")) if folder_key else self.root
        base = folder_key + "/" if folder_key else ""
        for stored in self._walk(start, base):
            if stored.key.startswith(prefix):
                yield stored
            elif stored.key > prefix:
                return

    def _walk(self, folder: str, base: str) -> Iterator[Stored]:
        try:
            with os.scandir(folder) as scan:
                entries = list(scan)
        except (FileNotFoundError, NotADirectoryError):
            return
        named: list[tuple[str, os.DirEntry[str], bool]] = []
        for entry in entries:
            if not _COMPONENT.fullmatch(entry.name) or entry.name in (".", ".."):
                continue  # a temporary file, or nothing a put made
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(mode):
                named.append((entry.name + "/", entry, True))
            elif stat.S_ISREG(mode):
                named.append((entry.name, entry, False))
        named.sort(key=lambda item: item[0])
        for name, entry, is_folder in named:
            if is_folder:
                yield from self._walk(entry.path, base + name)
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted since the scan
            yield Stored(key=base + name, size=info.st_size, modified=info.st_mtime)
