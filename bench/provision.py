"""Cost of the local backend, in one run on one disk, against two references measured
alongside it:

    floor  the same gRPC calls answered by a CSI server that does nothing (``bench/floor.py``:
           Python grpcio in a process of its own, the driver's thread pool, no work): what
           Python and grpcio themselves cost, which no Python driver can beat
    raw    the same work with the same durability done directly, without gRPC
           (``bench/local_raw.py`` says, step by step, why each is equivalent)

It prints:

1. Latency, p50 and p99 over ``--rounds`` rounds (Probe: ten times as many), one call at a
   time, the three measured round by round (so a change of load on the machine falls on
   all three alike) after two untimed rounds each:
       probe              Probe                         (floor only: there is no raw work)
       create+delete      CreateVolume + DeleteVolume (256 MiB, sparse)
                          vs  temporary image + truncate + fsync, record written
                          crash-safely, rename, fsync the directory; unlink both + fsync
       snapshot+delete    CreateSnapshot + DeleteSnapshot of a 64 MiB volume
                          vs  ``cp --reflink=auto --sparse=always`` + fsync + record +
                          rename + fsync; unlink both + fsync
       stage+unstage      NodeStage + NodeUnstage, ext4, 256 MiB (a blank volume each
                          round, so it is formatted)  vs  losetup, signature check, mkfs.ext4,
                          mount, record; umount, losetup -d, wait for the release, unlink
       publish+unpublish  NodePublish + NodeUnpublish of a staged volume  vs  mount table
                          read, mkdir, mount --bind, record; umount, rmdir, record
2. Throughput: ``--count`` CreateVolume calls (1 MiB) with 1, 4 and 16 in flight (a pool of
   client threads), then as many DeleteVolume calls, on the driver and on the floor: calls
   a second, and each call's p50 and p99 as its caller saw it. A call the driver answers
   ABORTED (it collides with one in flight) is made again after 1 ms, as a sidecar would
   with the shortest back-off; the retries are counted and printed.
   With ``--profile``: where the driver's time goes during a repeat of the 16-in-flight
   create run, sampled by py-spy (its summary, or why it could not attach).
3. The listing curve: ListVolumes through every volume in pages of 100 at 100, 1,000 and
   10,000 volumes (1 MiB, sparse, created 16 in flight, which says the creation rate with
   that many volumes present): the full listing's time and the time per page, which stays
   flat as the count grows when a page costs what the page holds. A listing is measured
   as it is, however long it takes; ``--quick`` stops the curve at 1,000.

The driver runs as the tests run it (``tests.support.Driver``), at its default log level
(info: one summary line a call, as deployed). Client, driver and floor share this machine's
cores, so on a small machine the figures under load include the client's own cost.

Run as root: python bench/provision.py [--rounds N] [--count N] [--quick] [--profile].
Prints; no thresholds.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Load,
    MiB,
    Timing,
    duration,
    grpc_create_delete,
    in_flight,
    interleaved,
    ratio,
    report_spread,
)
from bench.floor import Floor, floor_server
from bench.local_raw import RawLocal
from bench.sampling import sampled, summary
from csi.generated import csi_pb2 as pb
from tests.support import Driver, leftovers, mount_capability, scrub

SIZE = 256 * MiB  # create+delete and stage+unstage
SNAPSHOT_SOURCE = 64 * MiB
SMALL = 1 * MiB  # throughput and listing
PAGE = 100
IN_FLIGHT = (1, 4, 16)
FILL_IN_FLIGHT = 16
MIN_PAGES = 20  # listings are repeated until this many pages were timed

Target = Driver | Floor
T = TypeVar("T")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100, help="timed rounds per latency figure (default 100)")
    parser.add_argument("--count", type=int, default=1000, help="volumes per throughput run (default 1000)")
    parser.add_argument("--quick", action="store_true", help="stop the listing curve at 1,000 volumes")
    parser.add_argument("--profile", action="store_true", help="sample the driver with py-spy under load")
    return parser.parse_args()


def main() -> None:
    args = parse()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # each line as it is measured
    describe_machine()
    with tempfile.TemporaryDirectory(prefix="cairn-bench-") as tmp:
        root = Path(tmp)
        driver = Driver(root / "driver", ["--log-level", "info"]).start()
        try:
            with floor_server(root) as floor:
                latency(driver, floor, root, args.rounds)
                throughput(driver, floor, root, args.count, args.profile)
                listing(driver, floor, [100, 1000] if args.quick else [100, 1000, 10000])
        finally:
            driver.stop()
            left = leftovers(root)
            if left:
                print(f"note: the run left {', '.join(left)}; removed")
                scrub(root)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def describe_machine() -> None:
    model = ""
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    where = Path(tempfile.gettempdir())
    print(
        f"machine: {os.cpu_count()} cores ({model or platform.machine()}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"files on {filesystem_of(where)} ({where}); load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"a new file there (open with O_CREAT, then close; the median of {FILE_ROUNDS}) costs "
        f"{duration(new_file_cost(where))}: a local volume is two new files"
    )
    print()


FILE_ROUNDS = 500


def new_file_cost(where: Path) -> float:
    """The median cost of making an empty file in a folder of its own under ``where``:
    what the filesystem's inode allocation costs, which a local create pays twice."""
    with tempfile.TemporaryDirectory(prefix="cairn-bench-files-", dir=where) as folder:
        costs = []
        for i in range(FILE_ROUNDS):
            started = time.perf_counter()
            os.close(os.open(os.path.join(folder, str(i)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            costs.append(time.perf_counter() - started)
    return statistics.median(costs)


def filesystem_of(path: Path) -> str:
    best, kind = "", "?"
    with open("/proc/self/mountinfo", encoding="utf-8") as table:
        for line in table:
            fields = line.split()
            mount_point, fs_type = fields[4], fields[fields.index("-") + 1]
            inside = str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, kind = mount_point, fs_type
    return kind


# -- 1. latency -----------------------------------------------------------------------


def latency(driver: Driver, floor: Floor, root: Path, rounds: int) -> None:
    cap = mount_capability()
    raw = RawLocal(root / "raw")
    results: dict[str, list[Timing | None]] = {}

    def probe(target: Target) -> Callable[[int], None]:
        def round_trip(i: int) -> None:
            target.identity.Probe(pb.ProbeRequest())

        return round_trip

    timings = interleaved({"cairn": probe(driver), "floor": probe(floor)}, rounds * 10)
    results["probe"] = [timings["cairn"], timings["floor"], None]

    timings = interleaved(
        {
            "cairn": grpc_create_delete(driver, cap, SIZE),
            "floor": grpc_create_delete(floor, cap, SIZE),
            "raw": lambda i: raw.delete(raw.create(f"v{i}", SIZE)),
        },
        rounds,
    )
    results["create+delete"] = [timings["cairn"], timings["floor"], timings["raw"]]

    results["snapshot+delete (64 MiB)"] = snapshots(driver, floor, raw, rounds)
    results["stage+unstage (ext4)"] = stages(driver, floor, raw, root, rounds)
    results["publish+unpublish"] = publishes(driver, floor, raw, root, rounds)

    report_spread(
        f"1. latency, local backend, one call at a time: {rounds} rounds (probe {rounds * 10}), "
        "cairn vs the do-nothing server (floor) and the raw operations",
        ["floor", "raw"],
        results,
    )
    print()


class Aborts:
    """ABORTED answers retried so far (the driver's answer to a call that collides with one
    in flight; the sidecars retry it with back-off)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1


ABORTS = Aborts()


def retrying(call: Callable[[], T]) -> T:
    """``call()``, made again 1 ms after each ABORTED answer (counted in ABORTS) as a
    sidecar would, with the shortest back-off."""
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise
            ABORTS.add()
            time.sleep(0.001)


def create(target: Target, name: str, size: int) -> str:
    request = pb.CreateVolumeRequest(
        name=name, volume_capabilities=[mount_capability()], capacity_range={"required_bytes": size}
    )
    volume_id: str = retrying(lambda: target.controller.CreateVolume(request)).volume.volume_id
    return volume_id


def delete(target: Target, volume_id: str) -> None:
    retrying(lambda: target.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id)))


def snapshots(driver: Driver, floor: Floor, raw: RawLocal, rounds: int) -> list[Timing | None]:
    sources = {
        "cairn": create(driver, "snap-source", SNAPSHOT_SOURCE),
        "floor": create(floor, "snap-source", SNAPSHOT_SOURCE),
    }
    raw_source = raw.create("snap-source", SNAPSHOT_SOURCE)

    def grpc_snapshot(target: Target, source: str) -> Callable[[int], None]:
        def snapshot_delete(i: int) -> None:
            request = pb.CreateSnapshotRequest(name=f"s-{i}", source_volume_id=source)
            snapshot_id = target.controller.CreateSnapshot(request).snapshot.snapshot_id
            target.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id))

        return snapshot_delete

    timings = interleaved(
        {
            "cairn": grpc_snapshot(driver, sources["cairn"]),
            "floor": grpc_snapshot(floor, sources["floor"]),
            "raw": lambda i: raw.delete(raw.snapshot(f"s{i}", raw_source)),
        },
        rounds,
    )
    delete(driver, sources["cairn"])
    delete(floor, sources["floor"])
    raw.delete(raw_source)
    return [timings["cairn"], timings["floor"], timings["raw"]]


def stages(driver: Driver, floor: Floor, raw: RawLocal, root: Path, rounds: int) -> list[Timing | None]:
    cap = mount_capability()
    staging = str(root / "staging")

    def cairn(i: int) -> float:
        volume_id = create(driver, f"st-{i}", SIZE)
        started = time.perf_counter()
        driver.node.NodeStageVolume(
            pb.NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=staging, volume_capability=cap)
        )
        driver.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging))
        elapsed = time.perf_counter() - started
        delete(driver, volume_id)
        return elapsed

    def nothing(i: int) -> None:
        floor.node.NodeStageVolume(
            pb.NodeStageVolumeRequest(volume_id=f"floor-st-{i}", staging_target_path=staging, volume_capability=cap)
        )
        floor.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(volume_id=f"floor-st-{i}", staging_target_path=staging)
        )

    def by_hand(i: int) -> float:
        image = raw.create(f"st{i}", SIZE)
        started = time.perf_counter()
        device = raw.stage(image, staging)
        raw.unstage(image, staging, device)
        elapsed = time.perf_counter() - started
        raw.delete(image)
        return elapsed

    timings = interleaved({"cairn": cairn, "floor": nothing, "raw": by_hand}, rounds)
    return [timings["cairn"], timings["floor"], timings["raw"]]


def publishes(driver: Driver, floor: Floor, raw: RawLocal, root: Path, rounds: int) -> list[Timing | None]:
    cap = mount_capability()
    staging, raw_staging = str(root / "pub-staging"), str(root / "raw-pub-staging")
    target, raw_target = str(root / "pub-target"), str(root / "raw-pub-target")
    volume_id = create(driver, "pub", SIZE)
    driver.node.NodeStageVolume(
        pb.NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=staging, volume_capability=cap)
    )
    image = raw.create("pub", SIZE)
    device = raw.stage(image, raw_staging)
    try:

        def publish_unpublish(node: Any, volume: str) -> Callable[[int], None]:
            def round_trip(i: int) -> None:
                node.NodePublishVolume(
                    pb.NodePublishVolumeRequest(
                        volume_id=volume, staging_target_path=staging, target_path=target, volume_capability=cap
                    )
                )
                node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume, target_path=target))

            return round_trip

        def by_hand(i: int) -> None:
            raw.publish(image, raw_staging, raw_target)
            raw.unpublish(image, raw_target)

        timings = interleaved(
            {
                "cairn": publish_unpublish(driver.node, volume_id),
                "floor": publish_unpublish(floor.node, "floor-pub"),
                "raw": by_hand,
            },
            rounds,
        )
    finally:
        driver.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging))
        delete(driver, volume_id)
        raw.unstage(image, raw_staging, device)
        raw.delete(image)
    return [timings["cairn"], timings["floor"], timings["raw"]]


# -- 2. throughput --------------------------------------------------------------------


def create_many(target: Target, prefix: str, count: int, calls: int, offset: int = 0) -> tuple[Load, list[str]]:
    """Create ``count`` 1 MiB volumes named ``prefix-<number>``, ``calls`` in flight."""
    made = [""] * count

    def one(i: int) -> None:
        made[i] = create(target, f"{prefix}-{offset + i:05d}", SMALL)

    return in_flight(one, count, calls), made


def delete_many(target: Target, volume_ids: list[str], calls: int) -> Load:
    return in_flight(lambda i: delete(target, volume_ids[i]), len(volume_ids), calls)


def throughput(driver: Driver, floor: Floor, root: Path, count: int, profile: bool) -> None:
    print(f"2. throughput: {count} CreateVolume (1 MiB), then {count} DeleteVolume, n in flight; calls a second")
    print(
        f"{'call':<8}{'in flight':>10}{'cairn/s':>10}{'p50':>10}{'p99':>10}{'aborted':>9} | "
        f"{'floor/s':>10}{'p50':>10}{'p99':>10} | {'floor/cairn':>11} | {'raw/s':>8}{'raw/cairn':>10}"
    )
    raw = RawLocal(root / "raw-throughput")
    for calls in IN_FLIGHT:
        images = [Path()] * count

        def raw_create(i: int) -> None:
            images[i] = raw.create(f"r{calls}-{i:05d}", SMALL)  # noqa: B023 (run before the loop moves on)

        raw_made = in_flight(raw_create, count, calls)
        raw_gone = in_flight(lambda i: raw.delete(images[i]), count, calls)  # noqa: B023
        before = ABORTS.count
        made_cairn, cairn_ids = create_many(driver, f"t{calls}", count, calls)
        create_aborts = ABORTS.count - before
        made_floor, floor_ids = create_many(floor, f"t{calls}", count, calls)
        before = ABORTS.count
        gone_cairn = delete_many(driver, cairn_ids, calls)
        delete_aborts = ABORTS.count - before
        gone_floor = delete_many(floor, floor_ids, calls)
        rows = (
            ("create", made_cairn, create_aborts, made_floor, raw_made),
            ("delete", gone_cairn, delete_aborts, gone_floor, raw_gone),
        )
        for call, cairn, aborts, nothing, by_hand in rows:
            print(
                f"{call:<8}{calls:>10}{cairn.per_second:>10.0f}{duration(cairn.calls.p50):>10}"
                f"{duration(cairn.calls.p99):>10}{aborts:>9} | {nothing.per_second:>10.0f}"
                f"{duration(nothing.calls.p50):>10}{duration(nothing.calls.p99):>10} | "
                f"{ratio(nothing.per_second, cairn.per_second):>11} | {by_hand.per_second:>8.0f}"
                f"{ratio(by_hand.per_second, cairn.per_second):>10}"
            )
    print(
        "  (aborted: ABORTED answers, each retried after 1 ms; a call's p50 and p99 include its retries. "
        "The floor never aborts. raw: the raw create and delete of section 1, from as many threads of this "
        "process: what the disk's flushes allow.)"
    )
    print()
    if profile:
        profiled(driver, root, count)


def profiled(driver: Driver, root: Path, count: int) -> None:
    assert driver.process is not None
    with sampled(driver.process.pid, root) as samples:
        made, volume_ids = create_many(driver, "p", count, FILL_IN_FLIGHT)
    delete_many(driver, volume_ids, FILL_IN_FLIGHT)
    print(
        f"2, profiled: the driver during a repeat of the {FILL_IN_FLIGHT}-in-flight create run "
        f"({made.per_second:.0f} creates a second while sampled)"
    )
    for line in summary(samples):
        print(f"  {line}")
    print()


# -- 3. listing -----------------------------------------------------------------------


def list_all(target: Target) -> tuple[float, list[float], int]:
    """One full listing in pages of PAGE: its seconds, each page's, and the entries seen."""
    pages: list[float] = []
    entries, token = 0, ""
    started = time.perf_counter()
    while True:
        page_started = time.perf_counter()
        answer = target.controller.ListVolumes(pb.ListVolumesRequest(max_entries=PAGE, starting_token=token))
        pages.append(time.perf_counter() - page_started)
        entries += len(answer.entries)
        token = answer.next_token
        if not token:
            break
    return time.perf_counter() - started, pages, entries


def listing(driver: Driver, floor: Floor, levels: list[int]) -> None:
    print(
        f"3. listing: ListVolumes through every volume, {PAGE} a page; each line times at least {MIN_PAGES} "
        f"pages (the median of repeated full listings where one has fewer); volumes created {FILL_IN_FLIGHT} in flight"
    )
    print(
        f"{'volumes':>8}{'cairn total':>13}{'page p50':>10}{'p99':>10}{'page vs first':>15} | "
        f"{'floor total':>12}{'page p50':>10}{'p99':>10} | {'x total':>8}{'x page':>8} | "
        f"{'created/s: cairn':>17}{'aborted':>9}{'floor':>8}"
    )
    have = 0
    first_page: float | None = None
    for level in levels:
        before = ABORTS.count
        filled_cairn, _ = create_many(driver, "l", level - have, FILL_IN_FLIGHT, offset=have)
        aborts = ABORTS.count - before
        filled_floor, _ = create_many(floor, "l", level - have, FILL_IN_FLIGHT, offset=have)
        have = level
        passes = max(1, math.ceil(MIN_PAGES / math.ceil(level / PAGE)))
        cairn_runs, floor_runs = [], []
        for _ in range(passes):
            cairn_runs.append(list_all(driver))
            floor_runs.append(list_all(floor))
        cairn_total = Timing(tuple(run[0] for run in cairn_runs)).p50
        floor_total = Timing(tuple(run[0] for run in floor_runs)).p50
        cairn_pages = Timing(tuple(page for run in cairn_runs for page in run[1]))
        floor_pages = Timing(tuple(page for run in floor_runs for page in run[1]))
        first_page = first_page or cairn_pages.p50
        print(
            f"{level:>8}{duration(cairn_total):>13}{duration(cairn_pages.p50):>10}{duration(cairn_pages.p99):>10}"
            f"{ratio(cairn_pages.p50, first_page):>15} | {duration(floor_total):>12}"
            f"{duration(floor_pages.p50):>10}{duration(floor_pages.p99):>10} | {ratio(cairn_total, floor_total):>8}"
            f"{ratio(cairn_pages.p50, floor_pages.p50):>8} | {filled_cairn.per_second:>17.0f}"
            f"{aborts:>9}{filled_floor.per_second:>8.0f}",
            flush=True,
        )
        for name, runs in (("cairn", cairn_runs), ("floor", floor_runs)):
            seen = {run[2] for run in runs}
            if seen != {level}:
                print(f"  note: a {name} listing of {level} volumes returned {sorted(seen)} entries")
    print()


if __name__ == "__main__":
    main()
