from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.ceph import POOL, USER, CephCluster


@pytest.fixture
def secrets(ceph: CephCluster) -> dict[str, str]:
    return {"userID": USER, "userKey": ceph.user_key}


@pytest.fixture
def pool_io(ceph: CephCluster) -> Iterator[Any]:
    """An I/O context on the test pool, as the admin: to look behind the backend's back."""
    import rados

    cluster = rados.Rados(conffile=str(ceph.conf), rados_id="admin")
    cluster.connect()
    io = cluster.open_ioctx(POOL)
    yield io
    io.close()
    cluster.shutdown()
