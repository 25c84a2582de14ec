"""Per-object in-flight locks.

A second call on an object that already has an operation in flight gets ABORTED at once
(the CSI spec's answer, which makes the sidecars retry with back-off) instead of blocking
a server thread behind a slow backend."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from csi.errors import Aborted


class InFlight:
    """Keys live in namespaces (``what``): a volume ID, a volume name and a snapshot ID
    never collide, even when the strings are equal."""

    def __init__(self) -> None:
        self._held: set[tuple[str, str]] = set()
        self._shared: dict[tuple[str, str], int] = {}
        self._mutex = threading.Lock()

    @contextmanager
    def hold(self, key: str, what: str = "volume") -> Iterator[None]:
        """``key`` for this call alone: ABORTED while another call holds or shares it."""
        with self._mutex:
            if (what, key) in self._held or (what, key) in self._shared:
                raise Aborted(f"an operation on {what} {key!r} is already in progress")
            self._held.add((what, key))
        try:
            yield
        finally:
            with self._mutex:
                self._held.discard((what, key))

    @contextmanager
    def share(self, key: str, what: str = "volume") -> Iterator[None]:
        """``key`` for this call and others that only read it (restores of one backup):
        ABORTED while a call holds it alone (its delete), which waits for them in turn."""
        with self._mutex:
            if (what, key) in self._held:
                raise Aborted(f"an operation on {what} {key!r} is already in progress")
            self._shared[(what, key)] = self._shared.get((what, key), 0) + 1
        try:
            yield
        finally:
            with self._mutex:
                left = self._shared.pop((what, key)) - 1
                if left:
                    self._shared[(what, key)] = left

    def busy(self, key: str, what: str = "volume") -> bool:
        with self._mutex:
            return (what, key) in self._held or (what, key) in self._shared
