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


def test_shared_keys_admit_sharers_and_refuse_a_holder_until_the_last_leaves() -> None:
    inflight = InFlight()
    with inflight.share("backup-1", "snapshot"), inflight.share("backup-1", "snapshot"):
        assert inflight.busy("backup-1", "snapshot")
        with pytest.raises(Aborted, match="snapshot 'backup-1'"), inflight.hold("backup-1", "snapshot"):
            pass
        with inflight.hold("backup-1", "volume"):  # another namespace
            pass
    assert not inflight.busy("backup-1", "snapshot")
    with inflight.hold("backup-1", "snapshot"), pytest.raises(Aborted), inflight.share("backup-1", "snapshot"):
        pass
    with inflight.share("backup-1", "snapshot"):
        with inflight.share("backup-1", "snapshot"):
            pass
        assert inflight.busy("backup-1", "snapshot"), "one sharer is still there"
