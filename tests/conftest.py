from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.ceph import POOL, RUNNING_CLUSTER, CephCluster
from tests.cluster.kube import Cluster, build_step
from tests.nfs import GANESHA, NfsServer
from tests.nfs import RUNNING_SERVER as RUNNING_NFS_SERVER
from tests.support import Driver, leftovers, require, require_root, require_tools, scrub

CLUSTER_BUILD = Path(__file__).parent / "cluster" / "build"
CHART_CRDS = Path(__file__).parents[1] / "charts" / "cairn-csi" / "crds"


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


@pytest.fixture(scope="session", autouse=True)
def guest_beside_the_session(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """When the vm tier is selected, its guest starts with the session and runs beside
    the host's tests (tests/vm/background.py)."""
    from tests.vm import background, guest

    wanted = any(item.nodeid.startswith("tests/vm/") for item in request.session.items)
    if not wanted or os.geteuid() != 0 or guest.missing_prerequisites():
        yield  # the vm test says why it cannot run
        return
    with background.started(Path(tmp_path_factory.mktemp("vm"))):
        yield


@pytest.fixture(scope="session")
def nfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NfsServer]:
    """One NFS server (nfs-ganesha, NFSv4, loopback) for the whole session."""
    require_root()
    require_tools(GANESHA)
    if os.environ.get(RUNNING_NFS_SERVER):
        yield NfsServer.running(Path(os.environ[RUNNING_NFS_SERVER]))
        return
    server = NfsServer(Path(tmp_path_factory.mktemp("nfs")))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster_binaries() -> Path:
    """The Kubernetes binaries (built once, cached outside the clone, keyed on their
    version): the cluster tier's, and the API server of the tests that need only that."""
    require_root()
    require_tools("etcd", "containerd", "runc", "ctr", "openssl")
    return Path(build_step([str(CLUSTER_BUILD / "binaries.sh")]).strip().splitlines()[-1])


@pytest.fixture(scope="session")
def api_server(tmp_path_factory: pytest.TempPathFactory, cluster_binaries: Path) -> Iterator[Cluster]:
    """etcd and kube-apiserver alone, with every kind of the chart's crds/ (Cairn's and
    the snapshot ones): for clients of the API that need no node."""
    cluster = Cluster(tmp_path_factory.mktemp("api"), cluster_binaries, pause="")
    try:
        cluster.start_api()
        cluster.kubectl("apply", "-f", str(CHART_CRDS))
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        yield cluster
    finally:
        cluster.stop()


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
