"""Where a repository keeps its objects: a flat namespace of keys ("chunks/ab/abcd...",
"backups/ID") holding bytes, in a directory or an S3-compatible bucket.

A store promises little, so that an object store can keep it: a ``put`` is atomic (a
reader sees the whole object or none of it, never part), a key once listed can be read
until it is deleted, and nothing orders writes to different keys. The repository builds
crash safety on that alone (its manifest is written last)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Stored:
    """One object as a listing shows it."""

    key: str
    size: int
    modified: float
    """When it was last written, in seconds since the epoch (the store's clock)."""


class Store(Protocol):
    @property
    def where(self) -> str:
        """Where the objects live, for messages (a path, s3://bucket/prefix); never a secret."""

    def put(self, key: str, data: bytes) -> None:
        """Write the object whole, replacing any object of that key; durable on return."""

    def get(self, key: str) -> bytes:
        """The object's bytes; NotFound naming the key when there is none."""

    def exists(self, key: str) -> bool:
        """Whether an object of that key exists."""

    def delete(self, key: str) -> None:
        """Remove the object; not an error when there is none."""

    def list(self, prefix: str = "") -> Iterator[Stored]:
        """The objects whose key starts with ``prefix``, in key order."""

    def sweep(self, before: float) -> int:
        """Remove what puts interrupted by a crash left (never an object), if last
        touched before ``before`` (seconds since the epoch); return how many."""
