"""Cost of the nfs backend's controller, as ratios to the same work done another way in the
same run, against a throw-away nfs-ganesha server on loopback:

    create+delete     CreateVolume + DeleteVolume over gRPC (a directory volume)  vs
                      a folder made and removed through the same user-space client (the
                      floor: what any driver must ask the server for)
    snapshot (dir)    CreateSnapshot + DeleteSnapshot of a folder of small files  vs
                      ``cp -a --sparse=always`` of that folder on the server's own
                      filesystem, then ``rm -r`` (what a driver on the server would do)
    snapshot (image)  CreateSnapshot + DeleteSnapshot of an image volume filled with data
                      vs  ``cp --sparse=always`` of the image on the server's filesystem

The copies travel through the controller (read from the server and written back, NFSv4.1
has no server-side copy), so the snapshot ratios say what that costs on loopback; on a
network every byte crosses it twice.

Run as root: python bench/nfs_backend.py [--rounds N] [--files N] [--file-kib N] [--image-mib N].
Prints medians; no thresholds. The issue's figures are --files 10000 --file-kib 100
--image-mib 1024 (slow: the client's writes are small, see the README).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MiB, median_seconds, report
from csi.backends.nfs.libnfs import Client
from csi.generated import csi_pb2 as pb
from tests.nfs import EXPORT, NfsServer
from tests.support import Driver, block_capability, mount_capability


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds for create+delete")
    parser.add_argument("--copy-rounds", type=int, default=3, help="timed rounds for each snapshot")
    parser.add_argument("--files", type=int, default=1000, help="files in the folder snapshotted")
    parser.add_argument("--file-kib", type=int, default=16, help="size of each of those files")
    parser.add_argument("--image-mib", type=int, default=64, help="data in the image snapshotted")
    return parser.parse_args()


def main() -> None:
    args = parse()
    with tempfile.TemporaryDirectory(prefix="cairn-bench-") as tmp:
        root = Path(tmp)
        server = NfsServer(root / "nfs").start()
        try:
            common = {"kind": "nfs", "server": "127.0.0.1", "share": EXPORT, "port": server.port}
            backends = [
                {"name": "shared", **common, "subDir": "bench/${pv.metadata.name}"},
                {"name": "images", **common, "layout": "image"},
            ]
            config = root / "cairn.yaml"
            config.write_text(yaml.safe_dump({"backends": backends}))
            driver = Driver(root / "driver", ["--config", str(config)]).start()
            try:
                results = {
                    "create+delete": create_delete(driver, server, args.rounds),
                    "snapshot (dir)": snapshot_dir(driver, server, args),
                    "snapshot (img)": snapshot_image(driver, server, args),
                }
            finally:
                driver.stop()
        finally:
            server.stop()
    report(
        f"nfs backend, {args.rounds} rounds (snapshots {args.copy_rounds}), a folder of {args.files} files of "
        f"{args.file_kib} KiB, an image with {args.image_mib} MiB of data, median per operation",
        results,
    )


def create(driver: Driver, name: str, backend: str, cap: pb.VolumeCapability, size: int = 64 * MiB) -> pb.Volume:
    request = pb.CreateVolumeRequest(
        name=name, volume_capabilities=[cap], capacity_range={"required_bytes": size}, parameters={"backend": backend}
    )
    volume: pb.Volume = driver.controller.CreateVolume(request, timeout=600).volume
    return volume


def delete(driver: Driver, volume_id: str) -> None:
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=600)


def create_delete(driver: Driver, server: NfsServer, rounds: int) -> tuple[float, float]:
    cap = mount_capability(mode="MULTI_NODE_MULTI_WRITER")
    client = Client("127.0.0.1", EXPORT, port=server.port)
    client.mkdir("raw", 0o777)

    def cairn(i: int) -> None:
        delete(driver, create(driver, f"b-{i}", "shared", cap).volume_id)

    def raw(i: int) -> None:
        client.mkdir(f"raw/{i}", 0o777)
        client.rmdir(f"raw/{i}")

    try:
        return median_seconds(cairn, rounds), median_seconds(raw, rounds)
    finally:
        client.rmdir("raw")
        client.close()


def snapshot_dir(driver: Driver, server: NfsServer, args: argparse.Namespace) -> tuple[float, float]:
    cap = mount_capability(mode="MULTI_NODE_MULTI_WRITER")
    source = create(driver, "dir-source", "shared", cap)
    folder = server.export_dir / source.volume_context["subDir"]
    for index in range(args.files):
        sub = folder / f"d{index % 100:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{index}").write_bytes(os.urandom(args.file_kib * 1024))
    os.sync()
    copy = server.root / "raw-copy"

    def cairn(i: int) -> None:
        request = pb.CreateSnapshotRequest(name=f"ds-{i}", source_volume_id=source.volume_id)
        snapshot_id = driver.controller.CreateSnapshot(request, timeout=3600).snapshot.snapshot_id
        driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id), timeout=3600)

    def raw(i: int) -> None:
        subprocess.run(["cp", "-a", "--sparse=always", str(folder), str(copy)], check=True)
        subprocess.run(["sync", "-f", str(copy)], check=True)
        shutil.rmtree(copy)

    try:
        return median_seconds(cairn, args.copy_rounds), median_seconds(raw, args.copy_rounds)
    finally:
        delete(driver, source.volume_id)


def snapshot_image(driver: Driver, server: NfsServer, args: argparse.Namespace) -> tuple[float, float]:
    size = args.image_mib * MiB
    source = create(driver, "img-source", "images", block_capability(), size)
    image = server.export_dir / ".cairn" / "images" / "volumes" / f"{source.volume_id.split(':', 2)[2]}.img"
    with open(image, "r+b") as handle:  # data written on the server, as a node would have
        for _ in range(args.image_mib):
            handle.write(os.urandom(MiB))
    os.sync()
    copy = server.root / "raw-copy.img"

    def cairn(i: int) -> None:
        request = pb.CreateSnapshotRequest(name=f"is-{i}", source_volume_id=source.volume_id)
        snapshot_id = driver.controller.CreateSnapshot(request, timeout=3600).snapshot.snapshot_id
        driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id), timeout=3600)

    def raw(i: int) -> None:
        subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
        subprocess.run(["sync", "-f", str(copy)], check=True)
        copy.unlink()

    try:
        started = time.perf_counter()
        return median_seconds(cairn, args.copy_rounds), median_seconds(raw, args.copy_rounds)
    finally:
        print(f"(image snapshots measured in {time.perf_counter() - started:.0f} s)")
        delete(driver, source.volume_id)


if __name__ == "__main__":
    main()
