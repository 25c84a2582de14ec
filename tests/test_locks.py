from __future__ import annotations

import pytest

from csi.errors import Aborted
from csi.locks import InFlight

pytestmark = pytest.mark.unit


def test_second_call_is_aborted_at_once_and_lock_is_released() -> None:
    inflight = InFlight()
    with inflight.hold("vol-1"):
        assert inflight.busy("vol-1")
        with pytest.raises(Aborted, match="'vol-1' is already in progress"), inflight.hold("vol-1"):
            pass
        with inflight.hold("vol-2"):
            pass
    assert not inflight.busy("vol-1")


def test_lock_is_released_when_the_operation_fails() -> None:
    inflight = InFlight()
    with pytest.raises(RuntimeError), inflight.hold("vol-1"):
        raise RuntimeError("backend failed")
    with inflight.hold("vol-1"):
        pass
