"""Health checks that may block (a round trip to a remote cluster) run in the background.

Their answer feeds the scheduler and the readiness probe, both of which must answer at
once: ``BackgroundCheck.result`` never waits. It returns the last outcome and, when that is
older than the interval, starts one new run (never two at a time).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class BackgroundCheck:
    def __init__(self, name: str, check: Callable[[], str | None], interval: float) -> None:
        self.name = name
        self.check = check
        self.interval = interval
        self._lock = threading.Lock()
        self._outcome: str | None = None  # nothing known is nothing wrong
        self._checked_at: float | None = None
        self._running: threading.Thread | None = None

    def result(self) -> str | None:
        """What the last run found wrong, or None; starts a run when that one is stale."""
        with self._lock:
            stale = self._checked_at is None or time.monotonic() - self._checked_at >= self.interval
            if stale and self._running is None:
                self._running = threading.Thread(target=self._run, name=f"check-{self.name}", daemon=True)
                self._running.start()
            return self._outcome

    def wait(self, timeout: float) -> str | None:
        """Like ``result``, but wait (up to ``timeout`` seconds) for the run in progress,
        or the one this call started, and return its outcome."""
        self.result()
        with self._lock:
            running = self._running
        if running is not None:
            running.join(timeout)
        with self._lock:
            return self._outcome

    def _run(self) -> None:
        try:
            outcome = self.check()
        except Exception as exc:  # a failed check is the finding, not a crash
            outcome = str(exc) or type(exc).__name__
        with self._lock:
            if outcome != self._outcome:
                (log.warning if outcome else log.info)(
                    "health changed", extra={"check": self.name, "problem": outcome or "none"}
                )
            self._outcome = outcome
            self._checked_at = time.monotonic()
            self._running = None
