"""Provisioning and staging cost of the local backend, as ratios to the raw operations
measured in the same run on the same disk:

    create+delete   CreateVolume + DeleteVolume over gRPC  vs  truncate + unlink of a file
    snapshot        CreateSnapshot over gRPC               vs  cp --reflink=auto --sparse=always
    stage+unstage   NodeStage + NodeUnstage (ext4) over gRPC  vs  losetup + mkfs.ext4 + mount
                    and umount + losetup -d run directly

Run as root: python bench/provision.py [--rounds N]. Prints medians; no thresholds.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MiB, grpc_create_delete, median_seconds, parse_rounds, report, sh
from csi.generated import csi_pb2 as pb
from tests.support import Driver, mount_capability

SIZE = 256 * MiB


def main() -> None:
    rounds = parse_rounds()
    with tempfile.TemporaryDirectory(prefix="cairn-bench-") as tmp:
        root = Path(tmp)
        driver = Driver(root / "driver").start()
        try:
            results = run(driver, root, rounds)
        finally:
            driver.stop()
    report(f"local backend, {rounds} rounds, {SIZE // MiB} MiB volumes, median per operation", results)


def run(driver: Driver, root: Path, rounds: int) -> dict[str, tuple[float, float]]:
    cap = mount_capability()
    raw_dir = root / "raw"
    raw_dir.mkdir()

    cairn_create_delete = grpc_create_delete(driver, cap, SIZE)

    def raw_create_delete(i: int) -> None:
        path = raw_dir / f"v{i}.img"
        with open(path, "wb") as handle:
            handle.truncate(SIZE)
            os.fsync(handle.fileno())
        path.unlink()

    request = pb.CreateVolumeRequest(
        name="snap-source", volume_capabilities=[cap], capacity_range={"required_bytes": SIZE}
    )
    source = driver.controller.CreateVolume(request).volume
    source_image = driver.data / "volumes" / (source.volume_id.rsplit(":", 1)[1] + ".img")

    def cairn_snapshot(i: int) -> None:
        snap = driver.controller.CreateSnapshot(
            pb.CreateSnapshotRequest(name=f"s-{i}", source_volume_id=source.volume_id)
        )
        driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot.snapshot_id))

    def raw_snapshot(i: int) -> None:
        copy = raw_dir / f"s{i}.img"
        sh("cp", "--reflink=auto", "--sparse=always", str(source_image), str(copy))
        copy.unlink()

    staging = str(root / "staging")

    def cairn_stage(i: int) -> None:
        request = pb.CreateVolumeRequest(
            name=f"st-{i}", volume_capabilities=[cap], capacity_range={"required_bytes": SIZE}
        )
        volume_id = driver.controller.CreateVolume(request).volume.volume_id
        started = time.perf_counter()
        driver.node.NodeStageVolume(
            pb.NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=staging, volume_capability=cap)
        )
        driver.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging))
        timings.append(time.perf_counter() - started)
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))

    def raw_stage(i: int) -> None:
        image = raw_dir / f"st{i}.img"
        with open(image, "wb") as handle:
            handle.truncate(SIZE)
        started = time.perf_counter()
        device = sh("losetup", "--find", "--show", str(image))
        sh("mkfs.ext4", "-q", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", device)
        os.makedirs(staging, exist_ok=True)
        sh("mount", "-t", "ext4", device, staging)
        sh("umount", staging)
        sh("losetup", "--detach", device)
        timings.append(time.perf_counter() - started)
        image.unlink()

    results = {
        "create+delete": (median_seconds(cairn_create_delete, rounds), median_seconds(raw_create_delete, rounds)),
        "snapshot": (median_seconds(cairn_snapshot, rounds), median_seconds(raw_snapshot, rounds)),
    }
    timings: list[float] = []
    for i in range(rounds):
        cairn_stage(i)
    cairn = statistics.median(timings)
    timings.clear()
    for i in range(rounds):
        raw_stage(i)
    results["stage+unstage"] = (cairn, statistics.median(timings))
    return results


if __name__ == "__main__":
    main()
