from __future__ import annotations

import pytest

from tests.ceph import USER, CephCluster


@pytest.fixture
def secrets(ceph: CephCluster) -> dict[str, str]:
    return {"userID": USER, "userKey": ceph.user_key}
