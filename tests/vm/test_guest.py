"""The vm tier: node test suites again, inside a guest with a stock Debian kernel and a
root that has every capability. There nothing may skip: online ext4 growth, skipped on
hosts without CAP_SYS_RESOURCE, runs here; the rbd node suite runs with the kernel's
mappers, krbd and rbd-nbd, against the host's test cluster; the nfs node suite, quotas and
csi-sanity run with the kernel's NFS client against the host's test server."""

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
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert not skips, f"nothing may skip in the guest, whose kernel has every feature:\n{report}"


def pytest_in_guest(suite: str) -> str:
    return f"{sys.executable} -m pytest -p no:cacheprovider -q -rs --durations=20 {suite}"


# Python runs tens of times slower under emulation, so every suite runs in one guest and
# one pytest session: a boot and a session start (imports, fixtures) cost minutes each.
SUITES = (
    "tests/test_node.py",  # online ext4 growth, skipped on hosts without CAP_SYS_RESOURCE
    "tests/backends/rbd/test_node.py",  # once per kernel mapper
    "tests/backends/nfs/test_node.py",
    "tests/backends/nfs/test_quota.py",
    "tests/conformance/test_sanity.py",  # only its nfs runs: the host runs the others
    "tests/backends/lvm/test_node.py",  # device-mapper: activation, thin pools, snapshots
)
AT_LEAST = 16 + 2 * 4 + 1 + 13 + 3


def test_node_suites_on_a_stock_kernel(ceph: CephCluster, nfs_server: NfsServer) -> None:
    require_guest()
    result = guest.run(
        f"modprobe -a loop rbd nbd nfsv4 dm_mod dm_thin_pool && {pytest_in_guest(' '.join(SUITES))} -k 'nfs or not test_sanity'",
        env={
            "CAIRN_REQUIRE_ALL": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "CAIRN_TEST_RBD_MAPPER": "krbd,rbd-nbd",
            RUNNING_CLUSTER: str(ceph.root),
            RUNNING_SERVER: str(nfs_server.root),
        },
        host_ports=[*ceph.client_ports(), nfs_server.port],
        shares=[ceph.root, nfs_server.root],
    )
    print(result.stdout[-6000:])  # the guest's slowest tests, for whoever reads the log
    assert_all_passed(result, AT_LEAST)
