"""Background health checks: answering never waits for a check in progress, one run at
a time, and a check that raises is a finding."""

from __future__ import annotations

import threading

import pytest

from csi.checks import BackgroundCheck

pytestmark = pytest.mark.unit


def test_the_answer_never_waits_for_a_running_check() -> None:
    release = threading.Event()
    runs: list[int] = []

    def slow() -> str | None:
        runs.append(1)
        release.wait(60)
        return "monitors did not answer"

    check = BackgroundCheck("slow", slow, interval=0)
    assert check.result() is None  # nothing known yet: not a problem
    assert check.result() is None  # still running: the same answer, and no second run
    assert len(runs) == 1
    release.set()
    assert check.wait(60) == "monitors did not answer"


def test_a_fresh_outcome_is_kept_until_the_interval_passes() -> None:
    outcomes = iter(["first", None])
    runs: list[int] = []

    def check_once() -> str | None:
        runs.append(1)
        return next(outcomes)

    check = BackgroundCheck("steady", check_once, interval=3600)
    assert check.wait(60) == "first"
    assert check.result() == "first" and check.wait(60) == "first"
    assert len(runs) == 1
    check.interval = 0
    assert check.wait(60) is None and len(runs) == 2


def test_a_check_that_raises_reports_its_error() -> None:
    def broken() -> str | None:
        raise OSError("directory /srv is gone")

    assert BackgroundCheck("broken", broken, interval=0).wait(60) == "directory /srv is gone"
