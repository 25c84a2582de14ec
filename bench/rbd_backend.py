"""Cost of the rbd backend, as ratios to the same work done directly through librbd and
the Ceph tools in the same run, against a throw-away single-node cluster:

    create+delete   CreateVolume + DeleteVolume over gRPC  vs  RBD.create + RBD.remove
                    (the driver adds its reservation journal and the completion metadata)
    snapshot        CreateSnapshot + DeleteSnapshot         vs  an RBD snapshot created and
                    removed (the driver's snapshot is a clone-v2 image that outlives its
                    source: snapshot, clone, metadata, and the reverse; the RBD snapshot
                    of that image that restores clone from is taken by the first restore,
                    which is not timed here)
    throughput      CreateVolume, then DeleteVolume, of THROUGHPUT_COUNT volumes with
                    THROUGHPUT_IN_FLIGHT calls in flight, in calls a second (printed
                    apart)  vs  RBD.create, then RBD.remove, from as many threads
    stage+unstage   NodeStage + NodeUnstage (ext4, rbd-fuse)  vs  rbd-fuse + losetup +
                    mkfs.ext4 + mount, then the reverse, run directly, until the
                    rbd-fuse daemon has exited and let go of the image (as the
                    driver's unstage does: until then a delete or another map fails)

Run as root: python bench/rbd_backend.py [--rounds N]. Prints medians; no thresholds.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import rados
import rbd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MiB, in_flight, median_seconds, parse_rounds, report, sh
from csi import proc
from csi.backends.rbd.node import fuse_daemons
from csi.generated import csi_pb2 as pb
from tests.ceph import POOL, USER, CephCluster
from tests.support import Driver, mount_capability

SIZE = 256 * MiB
THROUGHPUT_COUNT = 200
THROUGHPUT_IN_FLIGHT = 16


def main() -> None:
    rounds = parse_rounds()
    with tempfile.TemporaryDirectory(prefix="cairn-bench-") as tmp:
        root = Path(tmp)
        cluster = CephCluster(root / "ceph").start()
        try:
            config = root / "cairn.yaml"
            backend = {"name": "ceph", "kind": "rbd", "monitors": cluster.monitors, "pool": POOL}
            backend |= {"mapper": "rbd-fuse", "fuseDir": str(root / "fuse")}
            config.write_text(yaml.safe_dump({"backends": [backend]}))
            driver = Driver(root / "driver", ["--config", str(config)]).start()
            try:
                results = run(driver, cluster, root, rounds)
            finally:
                driver.stop()
        finally:
            cluster.stop()
    report(f"rbd backend, {rounds} rounds, {SIZE // MiB} MiB volumes, median per operation", results)


def run(driver: Driver, cluster: CephCluster, root: Path, rounds: int) -> dict[str, tuple[float, float]]:
    cap = mount_capability()
    secrets = {"userID": USER, "userKey": cluster.user_key}
    connection = rados.Rados(rados_id=USER, conf={"mon_host": ",".join(cluster.monitors), "key": cluster.user_key})
    connection.connect()
    io = connection.open_ioctx(POOL)
    try:
        results = {
            "create+delete": create_delete(driver, io, cap, secrets, rounds),
            "snapshot": snapshot(driver, io, cap, secrets, rounds),
            "stage+unstage": stage(driver, cluster, io, root, cap, secrets, rounds),
        }
        throughput(driver, io, cap, secrets)
        return results
    finally:
        io.close()
        connection.shutdown()


def create(driver: Driver, name: str, cap: pb.VolumeCapability, secrets: dict[str, str]) -> str:
    request = pb.CreateVolumeRequest(
        name=name, volume_capabilities=[cap], capacity_range={"required_bytes": SIZE}, secrets=secrets
    )
    volume_id: str = driver.controller.CreateVolume(request).volume.volume_id
    return volume_id


def delete(driver: Driver, volume_id: str, secrets: dict[str, str]) -> None:
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets))


def create_delete(
    driver: Driver, io: Any, cap: pb.VolumeCapability, secrets: dict[str, str], rounds: int
) -> tuple[float, float]:
    def cairn(i: int) -> None:
        delete(driver, create(driver, f"b-{i}", cap, secrets), secrets)

    def raw(i: int) -> None:
        rbd.RBD().create(io, f"raw-{i}", SIZE, old_format=False, features=rbd.RBD_FEATURE_LAYERING)
        rbd.RBD().remove(io, f"raw-{i}")

    return median_seconds(cairn, rounds), median_seconds(raw, rounds)


def throughput(driver: Driver, io: Any, cap: pb.VolumeCapability, secrets: dict[str, str]) -> None:
    count, calls = THROUGHPUT_COUNT, THROUGHPUT_IN_FLIGHT
    made = [""] * count

    def cairn_create(i: int) -> None:
        made[i] = create(driver, f"t-{i}", cap, secrets)

    def raw_create(i: int) -> None:
        rbd.RBD().create(io, f"raw-t-{i}", SIZE, old_format=False, features=rbd.RBD_FEATURE_LAYERING)

    cairn = in_flight(cairn_create, count, calls), in_flight(lambda i: delete(driver, made[i], secrets), count, calls)
    raw = in_flight(raw_create, count, calls), in_flight(lambda i: rbd.RBD().remove(io, f"raw-t-{i}"), count, calls)
    print(f"rbd backend, {count} volumes, {calls} calls in flight: calls a second (cairn vs librbd)")
    for what, ours, theirs in (("create", cairn[0], raw[0]), ("delete", cairn[1], raw[1])):
        print(
            f"  {what:<8}{ours.per_second:>8.0f}/s vs {theirs.per_second:>6.0f}/s ({theirs.per_second / ours.per_second:.1f}x)"
        )


def snapshot(
    driver: Driver, io: Any, cap: pb.VolumeCapability, secrets: dict[str, str], rounds: int
) -> tuple[float, float]:
    source = create(driver, "snap-source", cap, secrets)
    rbd.RBD().create(io, "raw-source", SIZE, old_format=False, features=rbd.RBD_FEATURE_LAYERING)

    def cairn(i: int) -> None:
        request = pb.CreateSnapshotRequest(name=f"s-{i}", source_volume_id=source, secrets=secrets)
        snap_id = driver.controller.CreateSnapshot(request).snapshot.snapshot_id
        driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap_id, secrets=secrets))

    def raw(i: int) -> None:
        with rbd.Image(io, "raw-source") as image:
            image.create_snap(f"s-{i}")
            image.remove_snap(f"s-{i}")

    try:
        return median_seconds(cairn, rounds), median_seconds(raw, rounds)
    finally:
        delete(driver, source, secrets)
        rbd.RBD().remove(io, "raw-source")


def stage(
    driver: Driver,
    cluster: CephCluster,
    io: Any,
    root: Path,
    cap: pb.VolumeCapability,
    secrets: dict[str, str],
    rounds: int,
) -> tuple[float, float]:
    staging = str(root / "staging")
    timings: list[float] = []
    for i in range(rounds):
        volume_id = create(driver, f"st-{i}", cap, secrets)
        publish = pb.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=driver_node(driver), volume_capability=cap, secrets=secrets
        )
        context = driver.controller.ControllerPublishVolume(publish).publish_context
        started = time.perf_counter()
        driver.node.NodeStageVolume(
            pb.NodeStageVolumeRequest(
                volume_id=volume_id,
                staging_target_path=staging,
                volume_capability=cap,
                publish_context=context,
                secrets=secrets,
            )
        )
        driver.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging))
        timings.append(time.perf_counter() - started)
        unpublish = pb.ControllerUnpublishVolumeRequest(
            volume_id=volume_id, node_id=driver_node(driver), secrets=secrets
        )
        driver.controller.ControllerUnpublishVolume(unpublish)
        delete(driver, volume_id, secrets)
    cairn = statistics.median(timings)

    timings.clear()
    key, conf = root / "raw.key", root / "raw.conf"
    key.write_text(cluster.user_key)
    key.chmod(0o600)
    conf.write_text("[global]\n")
    auth = ["-c", str(conf), "-m", ",".join(cluster.monitors), "--id", USER, "--keyfile", str(key)]
    fuse = root / "raw-fuse"
    fuse.mkdir()
    os.makedirs(staging, exist_ok=True)
    for i in range(rounds):
        name = f"raw-st-{i}"
        rbd.RBD().create(io, name, SIZE, old_format=False, features=rbd.RBD_FEATURE_LAYERING)
        started = time.perf_counter()
        sh("rbd-fuse", *auth, "-p", POOL, "-r", name, str(fuse))
        device = sh("losetup", "--find", "--show", str(fuse / name))
        sh("mkfs.ext4", "-q", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", device)
        sh("mount", "-t", "ext4", device, staging)
        sh("umount", staging)
        sh("losetup", "--detach", device)
        # Until its rbd-fuse has exited, the image is busy (a delete or another node's
        # map fails): the driver's unstage answers only then, and so does this one.
        with proc.Exits(fuse_daemons(str(fuse))) as daemon:
            sh("umount", str(fuse))
            daemon.wait(30)
        timings.append(time.perf_counter() - started)
        remove_once_released(io, name)
    return cairn, statistics.median(timings)


def remove_once_released(io: Any, name: str) -> None:
    """Remove image ``name`` once the rbd-fuse daemon unmounted above lets go of it: it
    exits, dropping its watch on the image, a moment after ``umount`` returns."""
    deadline = time.monotonic() + 30
    while True:
        try:
            rbd.RBD().remove(io, name)
            return
        except rbd.ImageBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def driver_node(driver: Driver) -> str:
    info: str = driver.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id
    return info


if __name__ == "__main__":
    main()
