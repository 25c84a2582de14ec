"""The vm tier: node test suites again, inside a guest with a stock Debian kernel and a
root that has every capability. There nothing may skip: online ext4 growth, skipped on
hosts without CAP_SYS_RESOURCE, runs here; the rbd node suite runs with the kernel's
mappers, krbd and rbd-nbd; the nfs node suite, quotas and csi-sanity run with the
kernel's NFS client; the lvm node suite and csi-sanity with device-mapper.

The guest starts with the session and runs beside the host's tests, against a Ceph
cluster and an NFS server of its own (``background.py``); this test waits for it."""

from __future__ import annotations

import re

import pytest

from tests.support import require, require_root
from tests.vm import background, guest

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


def test_node_suites_on_a_stock_kernel() -> None:
    require_guest()
    run = background.RUNS.get(background.NAME)
    assert run is not None, "the session starts the guest when this test is selected (tests/conftest.py)"
    result = run.wait()
    print(result.stdout[-6000:])  # the guest's slowest tests, for whoever reads the log
    assert_all_passed(result, background.AT_LEAST)
