from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ceph import POOL, USER, CephCluster
from tests.support import require, require_root, require_tools


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """One cluster for the whole session; each test cleans up what it made."""
    require_root()
    require_tools("ceph-mon", "ceph-mgr", "ceph-osd", "ceph-authtool", "monmaptool", "rbd")
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError:
        require(False, "python3-rados and python3-rbd are not importable")
    cluster = CephCluster(Path(tmp_path_factory.mktemp("ceph")))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


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
