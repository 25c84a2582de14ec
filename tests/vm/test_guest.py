"""The vm tier: the node test suite again, inside a guest with a stock Debian kernel and
a root that has every capability. There nothing in tests/test_node.py may skip: online
ext4 growth, skipped on hosts without CAP_SYS_RESOURCE, runs here."""

from __future__ import annotations

import re
import sys

import pytest

from tests.support import require, require_root
from tests.vm import guest

pytestmark = pytest.mark.vm


def test_node_suite_on_a_stock_kernel() -> None:
    require_root()
    missing = guest.missing_prerequisites()
    require(not missing, f"the vm tier needs {', '.join(missing)}")
    command = f"modprobe loop && {sys.executable} -m pytest -p no:cacheprovider -q -rs tests/test_node.py"
    result = guest.run(command, env={"CAIRN_REQUIRE_ALL": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    report = (
        f"guest ran {result.seconds:.0f}s\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}\n{result.console[-2000:]}"
    )
    assert result.status == 0, report
    summary = re.search(r"(\d+) passed", result.stdout)
    assert summary and int(summary.group(1)) >= 16, report
    assert "skipped" not in result.stdout.splitlines()[-1], report
