from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ceph import POOL, USER, CephCluster


@pytest.fixture
def secrets(ceph: CephCluster) -> dict[str, str]:
    return {"userID": USER, "userKey": ceph.user_key}


@pytest.fixture
def clean_pool(ceph: CephCluster) -> Iterator[None]:
    """Every test must leave the pool as it found it: no image, no trash, no reservation."""
    yield
    leftovers = {
        "images": ceph.rbd("ls", POOL),
        "trash": ceph.rbd("trash", "ls", POOL),
        "journal": _journal_keys(ceph),
    }
    for name in leftovers["images"].split():
        ceph.rbd("snap", "purge", f"{POOL}/{name}")
        ceph._run("rbd", "-c", str(ceph.conf), "rm", f"{POOL}/{name}")
    ceph._run("rbd", "-c", str(ceph.conf), "trash", "purge", POOL)
    if leftovers["journal"]:
        ceph._run("rados", "-c", str(ceph.conf), "-p", POOL, "rm", "cairn.journal")
    assert not any(leftovers.values()), f"left in the pool: {leftovers}"


def _journal_keys(ceph: CephCluster) -> str:
    try:
        return ceph._run("rados", "-c", str(ceph.conf), "-p", POOL, "listomapkeys", "cairn.journal")
    except RuntimeError:
        return ""
