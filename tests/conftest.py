from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.ceph import RUNNING_CLUSTER, CephCluster
from tests.support import Driver, leftovers, require, require_root, require_tools, scrub


@contextmanager
def running_driver(root: Path, extra_args: Sequence[str] = ()) -> Iterator[Driver]:
    """A running driver on the embedded local backend; afterwards it must stop cleanly
    on SIGTERM, remove its socket, and leave no loop device or mount behind."""
    instance = Driver(root, extra_args).start()
    try:
        yield instance
    finally:
        code = instance.stop()
        left = leftovers(root)
        scrub(root)
        assert code == 0, f"driver exited with {code}:\n{instance.log.read_text()[-4000:]}"
        assert not instance.socket.exists(), "driver left its socket behind"
        assert not left, f"test left behind: {left}"


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Driver]:
    with running_driver(tmp_path) as instance:
        yield instance


@pytest.fixture(scope="module")
def shared_driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    """One driver for a module of tests that create nothing lasting."""
    with running_driver(tmp_path_factory.mktemp("driver")) as instance:
        yield instance


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
    if os.environ.get(RUNNING_CLUSTER):
        yield CephCluster.running(Path(os.environ[RUNNING_CLUSTER]))
        return
    cluster = CephCluster(Path(tmp_path_factory.mktemp("ceph")))
    try:
        yield cluster.start()
    finally:
        cluster.stop()
