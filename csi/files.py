"""Crash-safe small-file writes: write a temporary file, fsync it, rename it into place,
fsync the directory. A reader sees the old content or the new, never a torn file."""

from __future__ import annotations

import os

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
