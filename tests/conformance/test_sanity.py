"""csi-sanity, the CSI community's conformance suite, against a live driver: once per
backend configuration, in filesystem and raw block mode, with zero failures and no
skip that tests/conformance/skips.yaml does not explain."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import running_driver
from tests.support import require_root, require_tools

pytestmark = pytest.mark.conformance
SKIPS = Path(__file__).with_name("skips.yaml")
TEST_VOLUME_BYTES = 64 << 20


@dataclass(frozen=True)
class Outcome:
    failed: list[str]
    skipped: list[str]
    passed: int


def read_report(report: Path) -> Outcome:
    failed, skipped, passed = [], [], 0
    for case in ET.parse(report).iter("testcase"):
        name = case.get("name", "")
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped.append(name)
        elif not name.startswith("[BeforeSuite]") and not name.startswith("[AfterSuite]"):
            passed += 1
    return Outcome(failed, skipped, passed)


def explained_skips() -> list[dict[str, str]]:
    entries: list[dict[str, str]] = yaml.safe_load(SKIPS.read_text())
    for entry in entries:
        assert entry.get("match") and entry.get("reason"), f"skips.yaml entry needs match and reason: {entry}"
    return entries


@pytest.mark.parametrize("access_type", ["mount", "block"])
def test_csi_sanity(tmp_path: Path, access_type: str) -> None:
    require_root()
    require_tools("csi-sanity", "losetup", "mkfs.ext4")
    report = tmp_path / "report.xml"
    with running_driver(tmp_path / "driver") as driver:
        argv = [
            str(shutil.which("csi-sanity")),
            f"--csi.endpoint={driver.socket}",
            f"--csi.stagingdir={tmp_path / 'staging'}",
            f"--csi.mountdir={tmp_path / 'mount'}",
            f"--csi.testvolumesize={TEST_VOLUME_BYTES}",
            f"--csi.testvolumeexpandsize={2 * TEST_VOLUME_BYTES}",
            f"--csi.testvolumeaccesstype={access_type}",
            f"--ginkgo.junit-report={report}",
            "--ginkgo.no-color",
            "--ginkgo.timeout=15m",
        ]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False)
    assert report.exists(), f"csi-sanity wrote no report:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    outcome = read_report(report)
    assert outcome.failed == [], f"csi-sanity failures:\n{result.stdout[-8000:]}"
    assert result.returncode == 0, result.stdout[-4000:]
    assert outcome.passed >= 75, f"only {outcome.passed} specs ran"

    entries = explained_skips()
    unexplained = [name for name in outcome.skipped if not any(e["match"] in name for e in entries)]
    stale = [e["match"] for e in entries if not any(e["match"] in name for name in outcome.skipped)]
    assert unexplained == [], f"skipped without a reason in {SKIPS.name}: {unexplained}"
    assert stale == [], f"{SKIPS.name} explains skips that no longer happen: {stale}"
