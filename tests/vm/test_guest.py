"""The vm tier: node test suites again, inside a guest with a stock Debian kernel and a
root that has every capability. There nothing in tests/test_node.py may skip: online ext4
growth, skipped on hosts without CAP_SYS_RESOURCE, runs here. The rbd node suite runs
there with the kernel's mappers, krbd and rbd-nbd, against the host's test cluster."""

from __future__ import annotations

import re
import sys

import pytest

from tests.ceph import RUNNING_CLUSTER, CephCluster
from tests.nfs import RUNNING_SERVER, NfsServer
from tests.support import require, require_root
from tests.vm import guest

pytestmark = pytest.mark.vm


def require_guest() -> None:
    require_root()
    missing = guest.missing_prerequisites()
    require(not missing, f"the vm tier needs {', '.join(missing)}")


def assert_all_passed(result: guest.GuestResult, at_least: int) -> None:
    report = (
        f"guest ran {result.seconds:.0f}s\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}\n{result.console[-2000:]}"
    )
    assert result.status == 0, report
    summary = re.search(r"(\d+) passed", result.stdout)
    assert summary and int(summary.group(1)) >= at_least, report
    assert "skipped" not in result.stdout.splitlines()[-1], report


def pytest_in_guest(suite: str) -> str:
    return f"{sys.executable} -m pytest -p no:cacheprovider -q -rs {suite}"


def test_node_suite_on_a_stock_kernel() -> None:
    require_guest()
    result = guest.run(
        f"modprobe loop && {pytest_in_guest('tests/test_node.py')}",
        env={"CAIRN_REQUIRE_ALL": "1", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert_all_passed(result, 16)


@pytest.mark.parametrize("mapper", ["krbd", "rbd-nbd"])
def test_rbd_node_suite_with_a_kernel_mapper(mapper: str, ceph: CephCluster) -> None:
    require_guest()
    result = guest.run(
        f"modprobe -a loop rbd nbd && {pytest_in_guest('tests/backends/rbd/test_node.py')}",
        env={
            "CAIRN_REQUIRE_ALL": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "CAIRN_TEST_RBD_MAPPER": mapper,
            RUNNING_CLUSTER: str(ceph.root),
        },
        host_ports=ceph.client_ports(),
        shares=[ceph.root],
    )
    assert_all_passed(result, 3)


def test_nfs_node_suite_with_the_kernel_client(nfs_server: NfsServer) -> None:
    require_guest()
    result = guest.run(
        f"modprobe -a loop nfsv4 && {pytest_in_guest('tests/backends/nfs/test_node.py tests/backends/nfs/test_quota.py tests/conformance/test_sanity.py -k nfs')}",
        env={"CAIRN_REQUIRE_ALL": "1", "PYTHONDONTWRITEBYTECODE": "1", RUNNING_SERVER: str(nfs_server.root)},
        host_ports=[nfs_server.port],
        shares=[nfs_server.root],
    )
    assert_all_passed(result, 13)
