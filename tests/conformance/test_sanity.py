"""csi-sanity, the CSI community's conformance suite, against a live driver: once per
backend configuration, in filesystem and raw block mode, with zero failures and no
skip that tests/conformance/skips.yaml does not explain."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ceph import POOL, USER, CephCluster
from tests.conftest import running_driver
from tests.nfs import EXPORT, NfsServer, kernel_has_nfs
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
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            failed.append(f"{name}\n    {(problem.get('message') or '').strip()[:1500]}")
        elif case.find("skipped") is not None:
            skipped.append(name)
        elif not name.startswith("[BeforeSuite]") and not name.startswith("[AfterSuite]"):
            passed += 1
    return Outcome(failed, skipped, passed)


def explained_skips() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = yaml.safe_load(SKIPS.read_text())
    for entry in entries:
        assert entry.get("match") and entry.get("reason"), f"skips.yaml entry needs match and reason: {entry}"
    return entries


def explained_for(backend: str) -> list[dict[str, Any]]:
    return [e for e in explained_skips() if backend in e.get("backends", [backend])]


def imposed_skips(backend: str) -> list[str]:
    patterns = [re.escape(e["match"]) for e in explained_for(backend) if e.get("impose")]
    return [f"--ginkgo.skip={'|'.join(patterns)}"] if patterns else []


def run_sanity(tmp_path: Path, endpoint: str, access_type: str, extra: list[str]) -> subprocess.CompletedProcess[str]:
    argv = [
        str(shutil.which("csi-sanity")),
        f"--csi.endpoint={endpoint}",
        f"--csi.stagingdir={tmp_path / 'staging'}",
        f"--csi.mountdir={tmp_path / 'mount'}",
        f"--csi.testvolumesize={TEST_VOLUME_BYTES}",
        f"--csi.testvolumeexpandsize={2 * TEST_VOLUME_BYTES}",
        f"--csi.testvolumeaccesstype={access_type}",
        f"--ginkgo.junit-report={tmp_path / 'report.xml'}",
        "--ginkgo.no-color",
        "--ginkgo.timeout=15m",
        *extra,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False)


def check(tmp_path: Path, result: subprocess.CompletedProcess[str], backend: str) -> None:
    report = tmp_path / "report.xml"
    assert report.exists(), f"csi-sanity wrote no report:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    outcome = read_report(report)
    assert outcome.failed == [], "csi-sanity failures:\n" + "\n".join(outcome.failed)
    assert result.returncode == 0, result.stdout[-4000:]
    assert outcome.passed >= 75, f"only {outcome.passed} specs ran"
    entries = explained_for(backend)
    unexplained = [name for name in outcome.skipped if not any(e["match"] in name for e in entries)]
    stale = [e["match"] for e in entries if not any(e["match"] in name for name in outcome.skipped)]
    assert unexplained == [], f"skipped without a reason in {SKIPS.name}: {unexplained}"
    assert stale == [], f"{SKIPS.name} explains skips that no longer happen: {stale}"


@pytest.mark.parametrize("access_type", ["mount", "block"])
def test_csi_sanity_local(tmp_path: Path, access_type: str) -> None:
    require_root()
    require_tools("csi-sanity", "losetup", "mkfs.ext4")
    with running_driver(tmp_path / "driver") as driver:
        result = run_sanity(tmp_path, str(driver.socket), access_type, imposed_skips("local"))
    check(tmp_path, result, "local")


@pytest.mark.parametrize("access_type", ["mount", "block"])
def test_csi_sanity_rbd(tmp_path: Path, ceph: CephCluster, access_type: str) -> None:
    """Against the test cluster with cephx; node mapping through rbd-fuse and a loop
    device, the mapper that works without the rbd and nbd kernel modules."""
    require_tools("csi-sanity", "rbd-fuse", "losetup", "mkfs.ext4")
    credentials = {"userID": USER, "userKey": ceph.user_key}
    credentials_dir = tmp_path / "ceph-secret"  # for the calls that carry no secret
    credentials_dir.mkdir()
    for key, value in credentials.items():
        (credentials_dir / key).write_text(value)
    config = tmp_path / "cairn.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "backends": [
                    {
                        "name": "ceph",
                        "kind": "rbd",
                        "monitors": ceph.monitors,
                        "pool": POOL,
                        "mapper": "rbd-fuse",
                        "fuseDir": str(tmp_path / "driver" / "fuse"),
                        "credentialsDir": str(credentials_dir),
                    }
                ]
            }
        )
    )
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(yaml.safe_dump({name: credentials for name in SECRET_NAMES}))
    with running_driver(tmp_path / "driver", ["--config", str(config)]) as driver:
        result = run_sanity(
            tmp_path, str(driver.socket), access_type, [f"--csi.secrets={secrets}", *imposed_skips("rbd")]
        )
        assert ceph.user_key not in driver.log.read_text(), "a key reached the log"
    check(tmp_path, result, "rbd")
    assert ceph.rbd("ls", POOL) == "", "csi-sanity's volumes and snapshots must all be gone"


SECRET_NAMES = [
    "CreateVolumeSecret", "DeleteVolumeSecret", "ControllerPublishVolumeSecret", "ControllerUnpublishVolumeSecret",
    "ControllerValidateVolumeCapabilitiesSecret", "NodeStageVolumeSecret", "NodePublishVolumeSecret",
    "CreateSnapshotSecret", "DeleteSnapshotSecret", "ControllerExpandVolumeSecret", "NodeExpandVolumeSecret",
    "ListSnapshotsSecret", "GetSnapshotSecret", "ListVolumesSecret",
]  # fmt: skip


@pytest.mark.parametrize(("layout", "access_type"), [("directory", "mount"), ("image", "mount"), ("image", "block")])
def test_csi_sanity_nfs(tmp_path: Path, nfs_server: NfsServer, layout: str, access_type: str) -> None:
    """Against the test NFS server: the controller through the user-space client, the
    node through the kernel's NFS client, which this host may lack (the vm tier runs
    this test in a guest with a stock kernel)."""
    require_tools("csi-sanity", "mount.nfs", "losetup", "mkfs.ext4")
    if not kernel_has_nfs():
        pytest.skip("this kernel has no NFS client (the vm tier runs this test)")
    backend = {
        "name": f"nfs-{layout}",
        "kind": "nfs",
        "server": "127.0.0.1",
        "share": EXPORT,
        "port": nfs_server.port,
        "layout": layout,
        "subDir": f"{tmp_path.name}/${{pv.metadata.name}}",
        "nodeMountDir": str(tmp_path / "driver" / "nfs"),  # under the driver: its leak check covers it
        "timeout": 20,
    }
    config = tmp_path / "cairn.yaml"
    config.write_text(yaml.safe_dump({"backends": [backend]}))
    with running_driver(tmp_path / "driver", ["--config", str(config)]) as driver:
        result = run_sanity(tmp_path, str(driver.socket), access_type, imposed_skips(f"nfs-{layout}"))
    check(tmp_path, result, f"nfs-{layout}")
    control = nfs_server.export_dir / ".cairn" / f"nfs-{layout}"
    left = [str(p.relative_to(control)) for p in control.rglob("*") if p.is_file()]
    assert left == [], f"csi-sanity's volumes and snapshots must all be gone: {left}"


@pytest.mark.parametrize("access_type", ["mount", "block"])
def test_csi_sanity_lvm(tmp_path: Path, access_type: str) -> None:
    """Against a thin pool on a volume group of loop devices: activation needs the
    kernel's device-mapper, which this host may lack (the vm tier runs this test in a
    guest with a stock kernel)."""
    from tests.lvm import has_device_mapper, loop_volume_group

    require_root()
    require_tools("csi-sanity", "lvm", "wipefs", "mkfs.ext4", "thin_check")
    if not has_device_mapper():
        pytest.skip("this kernel has no device-mapper (the vm tier runs this test)")
    with loop_volume_group(tmp_path, size=2048 << 20) as group:
        pool = group.run("lvcreate", "--type", "thin-pool", "--size", "1g", "--name", "pool", group.name)
        assert pool.returncode == 0, pool.stderr
        backend = {
            "name": "lvm",
            "kind": "lvm",
            "volumeGroup": group.name,
            "thinPool": "pool",
            "lvmConfig": group.config,
        }
        config = tmp_path / "cairn.yaml"
        config.write_text(yaml.safe_dump({"backends": [backend]}))
        with running_driver(tmp_path / "driver", ["--config", str(config)]) as driver:
            result = run_sanity(tmp_path, str(driver.socket), access_type, imposed_skips("lvm"))
        check(tmp_path, result, "lvm")
        left = [row["lv_name"] for row in group.report("lvs", "lv_name") if row["lv_name"] != "pool"]
        assert left == [], f"csi-sanity's volumes and snapshots must all be gone: {left}"
