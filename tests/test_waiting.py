from __future__ import annotations

import pytest

from csi import waiting

pytestmark = pytest.mark.unit


def test_pauses_start_short_and_double_up_to_the_longest(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("csi.waiting.time.sleep", slept.append)
    backoff = waiting.Backoff(longest=0.02)
    for _ in range(6):
        backoff.sleep()
    assert slept == [0.002, 0.004, 0.008, 0.016, 0.02, 0.02]
    assert waiting.Backoff().pause <= 0.002 and waiting.Backoff(longest=0.001).pause == 0.001
