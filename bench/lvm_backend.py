"""Cost of the lvm backend's controller, as ratios to the same LVM work done with the LVM
tools directly, in the same run on the same volume group (loop devices, the tests' private
LVM configuration):

    create+delete (thick)  CreateVolume + DeleteVolume over gRPC  vs  ``lvcreate`` with
                           the same tags, not activated, + ``lvremove``
    create+delete (thin)   the same in a thin pool  vs  ``lvcreate --thin`` + ``lvremove``
    snapshot (thin)        CreateSnapshot + DeleteSnapshot  vs  ``lvcreate --snapshot``
                           (skipped at activation, not activated) + ``lvremove``

Thick volumes need only LVM metadata and run on any kernel. Thin pools need device-mapper:
on a host without it the thin figures are measured in the vm tier's guest (a stock Debian
kernel under software emulation, so its milliseconds are slower than a real host's; the
ratios are what to read).

Run as root: python bench/lvm_backend.py [--rounds N]. Prints medians; no thresholds.
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MiB, grpc_create_delete, median_seconds, report
from csi.generated import csi_pb2 as pb
from tests.lvm import LoopVolumeGroup, has_device_mapper, loop_volume_group
from tests.support import Driver, mount_capability

SIZE = 64 * MiB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per operation")
    parser.add_argument("--thin-only", action="store_true", help=argparse.SUPPRESS)  # the guest's part
    args = parser.parse_args()
    if not args.thin_only:
        with tempfile.TemporaryDirectory(prefix="cairn-bench-") as tmp:
            results = measure(Path(tmp), args.rounds, thin=False)
        report(f"lvm backend, thick, {args.rounds} rounds, {SIZE // MiB} MiB volumes, median per operation", results)
    if has_device_mapper():
        with tempfile.TemporaryDirectory(prefix="cairn-bench-") as tmp:
            results = measure(Path(tmp), args.rounds, thin=True)
        where = "in the vm tier's guest" if args.thin_only else "on this host"
        report(f"lvm backend, thin pool, {where}, {args.rounds} rounds, median per operation", results)
    elif not args.thin_only:
        in_guest(args.rounds)


def in_guest(rounds: int) -> None:
    """The thin figures, measured in a guest with a stock kernel (this one has no
    device-mapper)."""
    from tests.vm import guest

    missing = guest.missing_prerequisites()
    if missing:
        print(f"thin pools: skipped (no device-mapper here, and no guest: {', '.join(missing)})")
        return
    command = (
        f"modprobe -a loop dm_mod dm_thin_pool && .venv/bin/python bench/lvm_backend.py --thin-only --rounds {rounds}"
    )
    result = guest.run(command, timeout=1800)
    print(result.stdout, end="")
    if result.status != 0:
        print(f"thin pools: the guest failed ({result.status}):\n{result.stderr[-2000:]}")


def measure(root: Path, rounds: int, thin: bool) -> dict[str, tuple[float, float]]:
    (root / "pvs").mkdir()
    with loop_volume_group(root / "pvs", size=4096 * MiB) as group:
        pool = ""
        if thin:
            pool = "pool"
            made = group.run("lvcreate", "--type", "thin-pool", "--size", "2g", "--name", pool, group.name)
            assert made.returncode == 0, made.stderr
        config = root / "cairn.yaml"
        backend = {"name": "lvm", "kind": "lvm", "volumeGroup": group.name, "lvmConfig": group.config}
        if pool:
            backend["thinPool"] = pool
        config.write_text(yaml.safe_dump({"backends": [backend]}))
        driver = Driver(root / "driver", ["--config", str(config)]).start()
        try:
            return run(driver, group, pool, rounds)
        finally:
            driver.stop()
            for row in group.report("lvs", "lv_name"):
                if row["lv_name"] != pool:
                    group.run("lvremove", "--yes", f"{group.name}/{row['lv_name']}")


def run(driver: Driver, group: LoopVolumeGroup, pool: str, rounds: int) -> dict[str, tuple[float, float]]:
    cap = mount_capability()

    def lvm(*args: str) -> None:
        done = group.run(*args)
        assert done.returncode == 0, done.stderr

    def tags(name: str) -> list[str]:
        """What the backend tags an LV with: the same metadata for the raw commands."""
        encoded = base64.urlsafe_b64encode(name.encode()).decode()
        return ["--addtag", f"cairn.csi.io/backend={encoded}", "--addtag", f"cairn.csi.io/name={encoded}"]

    cairn_create_delete = grpc_create_delete(driver, cap, SIZE)

    def raw_create_delete(i: int) -> None:
        where = ["--thin", "--virtualsize", f"{SIZE}b", f"{group.name}/{pool}"] if pool else ["--size", f"{SIZE}b"]
        extra = [] if pool else [group.name, "--zero", "n", "--wipesignatures", "n"]
        lvm("lvcreate", "--activate", "n", "--name", f"raw-{i}", *tags(f"raw-{i}"), *where, *extra)
        lvm("lvremove", "--yes", f"{group.name}/raw-{i}")

    results: dict[str, tuple[float, float]] = {
        "create+delete": (median_seconds(cairn_create_delete, rounds), median_seconds(raw_create_delete, rounds)),
    }
    if not pool:
        return results
    source = driver.controller.CreateVolume(
        pb.CreateVolumeRequest(name="origin", volume_capabilities=[cap], capacity_range={"required_bytes": SIZE})
    ).volume
    origin = f"cairn-{source.volume_id.rsplit('@', 1)[1]}"  # the LV of local ID <node>@vol-<uuid>

    def cairn_snapshot(i: int) -> None:
        snap = driver.controller.CreateSnapshot(
            pb.CreateSnapshotRequest(name=f"s-{i}", source_volume_id=source.volume_id)
        )
        driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot.snapshot_id))

    def raw_snapshot(i: int) -> None:
        lvm(
            "lvcreate", "--snapshot", "--name", f"rs-{i}", "--setactivationskip", "y", "--activate", "n",
            *tags(f"rs-{i}"), f"{group.name}/{origin}",
        )  # fmt: skip
        lvm("lvremove", "--yes", f"{group.name}/rs-{i}")

    results["snapshot"] = (median_seconds(cairn_snapshot, rounds), median_seconds(raw_snapshot, rounds))
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=source.volume_id))
    return results


if __name__ == "__main__":
    main()
