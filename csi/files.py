"""Crash-safe small-file writes: write a temporary file, fsync it, rename it into place,
fsync the directory. A reader sees the old content or the new, never a torn file. And the
unix sockets the driver listens on: one a killed process left behind is replaced."""

from __future__ import annotations

import os
import stat

from csi.errors import ConfigError

TEMP_SUFFIX = ".tmp"


def write_atomically(path: str, data: bytes) -> None:
    temp = path + TEMP_SUFFIX
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_dir(os.path.dirname(path))


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_socket(path: str) -> None:
    """Remove the socket at ``path``, left by a process that was killed (or by this one
    stopping). Nothing there is fine; anything but a socket is refused, never removed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to remove it")
    os.unlink(path)
