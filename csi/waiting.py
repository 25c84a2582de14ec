"""Waiting for what the kernel or a daemon finishes "a moment later" (a loop device
letting go of its file, a FUSE daemon exiting after its unmount, a guard process ending):
most such moments are a few milliseconds, a few are long. A fixed pause of 50 or 100 ms
costs every call that pause; pauses that start short and double cost little either way."""

from __future__ import annotations

import time

FIRST = 0.002
"""Seconds of the first pause."""
LONGEST = 0.1
"""Seconds no pause exceeds."""


class Backoff:
    """Pauses for one wait: ``FIRST`` seconds, twice as long each time, up to ``longest``.
    Make one per wait, and ``sleep`` between two looks."""

    def __init__(self, longest: float = LONGEST) -> None:
        self.pause = min(FIRST, longest)
        self.longest = longest

    def sleep(self) -> None:
        time.sleep(self.pause)
        self.pause = min(2 * self.pause, self.longest)
