"""Concurrent calls on the same objects, on every backend: same-name creates, delete
against snapshot and clone, listing against delete, stage against unstage. One call wins,
the others answer ABORTED or the same answer; nothing answers INTERNAL, and afterwards
exactly one object exists per name and nothing is left behind.

On a profile without a node path (nfs here), stage against unstage is skipped with the
reason; the controller races run as everywhere.

Seeded: the seed is printed, and CAIRN_TEST_SEED replays a run's timing jitter."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi.generated import csi_pb2 as pb
from tests.hardening.harness import Profile, host_leftovers, seed
from tests.support import NODE_ID, Driver, mount_capability

pytestmark = pytest.mark.integration
MiB = 1 << 20
OK = grpc.StatusCode.OK
ABORTED = grpc.StatusCode.ABORTED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ROUNDS = 6


def race(rng: random.Random, *calls: Callable[[], Any]) -> list[tuple[grpc.StatusCode, Any]]:
    """Run ``calls`` at once (released together, each after a small seeded jitter) and
    return each one's code with its answer or error message."""
    start = threading.Barrier(len(calls))
    jitter = [rng.uniform(0, 0.01) for _ in calls]

    def run(index: int) -> tuple[grpc.StatusCode, Any]:
        start.wait()
        time.sleep(jitter[index])
        try:
            return OK, calls[index]()
        except grpc.RpcError as exc:
            error: Any = exc
            return error.code(), error.details()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, range(len(calls))))


def expect(outcomes: list[tuple[grpc.StatusCode, Any]], allowed: set[grpc.StatusCode]) -> None:
    for code, answer in outcomes:
        assert code in allowed, f"{code.name}: {answer}"


class Calls:
    """The requests a CO would send, carrying the profile's secrets and parameters."""

    def __init__(self, driver: Driver, profile: Profile) -> None:
        self.driver = driver
        self.secrets = profile.secrets
        self.parameters = profile.parameters

    def create(self, name: str, source: pb.VolumeContentSource | None = None) -> pb.Volume:
        request = pb.CreateVolumeRequest(
            name=name,
            volume_capabilities=[mount_capability()],
            capacity_range={"required_bytes": 16 * MiB},
            parameters=self.parameters,
            secrets=self.secrets,
            volume_content_source=source,
        )
        volume: pb.Volume = self.driver.controller.CreateVolume(request, timeout=120).volume
        return volume

    def delete(self, volume_id: str) -> None:
        request = pb.DeleteVolumeRequest(volume_id=volume_id, secrets=self.secrets)
        self.driver.controller.DeleteVolume(request, timeout=120)

    def snapshot(self, name: str, volume_id: str) -> pb.Snapshot:
        request = pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id, secrets=self.secrets)
        snapshot: pb.Snapshot = self.driver.controller.CreateSnapshot(request, timeout=120).snapshot
        return snapshot

    def delete_snapshot(self, snapshot_id: str) -> None:
        request = pb.DeleteSnapshotRequest(snapshot_id=snapshot_id, secrets=self.secrets)
        self.driver.controller.DeleteSnapshot(request, timeout=120)

    def volumes(self) -> list[pb.Volume]:
        found, token = [], ""
        while True:
            request = pb.ListVolumesRequest(max_entries=3, starting_token=token)
            page = self.driver.controller.ListVolumes(request, timeout=120)
            found += [e.volume for e in page.entries]
            token = page.next_token
            if not token:
                return found

    def snapshots(self) -> list[pb.Snapshot]:
        request = pb.ListSnapshotsRequest(secrets=self.secrets)
        return [e.snapshot for e in self.driver.controller.ListSnapshots(request, timeout=120).entries]

    def publish(self, volume_id: str) -> dict[str, str]:
        request = pb.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=NODE_ID, volume_capability=mount_capability(), secrets=self.secrets
        )
        return dict(self.driver.controller.ControllerPublishVolume(request, timeout=120).publish_context)

    def unpublish(self, volume_id: str) -> None:
        request = pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=NODE_ID, secrets=self.secrets)
        self.driver.controller.ControllerUnpublishVolume(request, timeout=120)

    def stage(self, volume: pb.Volume, path: str, publish_context: dict[str, str]) -> None:
        request = pb.NodeStageVolumeRequest(
            volume_id=volume.volume_id,
            staging_target_path=path,
            volume_capability=mount_capability(),
            publish_context=publish_context,
            volume_context=volume.volume_context,
            secrets=self.secrets,
        )
        self.driver.node.NodeStageVolume(request, timeout=120)

    def unstage(self, volume_id: str, path: str) -> None:
        request = pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=path)
        self.driver.node.NodeUnstageVolume(request, timeout=120)

    def clean(self) -> None:
        for snapshot in self.snapshots():
            self.delete_snapshot(snapshot.snapshot_id)
        for volume in self.volumes():
            self.delete(volume.volume_id)


def finish(profile: Profile, calls: Calls) -> None:
    calls.clean()
    assert calls.volumes() == [] and calls.snapshots() == []
    assert profile.backend_objects() == set(), "the backend still holds objects after every delete"
    assert host_leftovers(profile.root) == []


def test_same_name_creates_make_one_volume(profile: Profile) -> None:
    rng = random.Random(seed("same-name creates"))
    with profile.driver() as driver:
        calls = Calls(driver, profile)
        for round_ in range(ROUNDS):
            name = f"same-{round_}"
            outcomes = race(rng, *[partial(calls.create, name) for _ in range(4)])
            expect(outcomes, {OK, ABORTED})
            made = {answer.volume_id for code, answer in outcomes if code is OK}
            assert len(made) == 1, outcomes
            assert [v.volume_id for v in calls.volumes() if v.volume_id in made] == list(made)
            volume_id = made.pop()
            if not profile.snapshots:
                continue
            snapshots = race(rng, *[partial(calls.snapshot, f"snap-{name}", volume_id) for _ in range(3)])
            expect(snapshots, {OK, ABORTED})
            assert len({answer.snapshot_id for code, answer in snapshots if code is OK}) == 1, snapshots
        assert len(calls.volumes()) == ROUNDS
        assert len(calls.snapshots()) == (ROUNDS if profile.snapshots else 0)
        finish(profile, calls)


@pytest.mark.parametrize("copy", ["snapshot", "clone"])
def test_delete_against_a_copy_of_the_same_volume(profile: Profile, copy: str) -> None:
    profile.require_snapshots(f"delete against a {copy}")
    rng = random.Random(seed(f"delete against {copy}"))
    with profile.driver() as driver:
        calls = Calls(driver, profile)
        for round_ in range(ROUNDS):
            source = calls.create(f"source-{round_}")
            if copy == "snapshot":
                make: Callable[[], Any] = partial(calls.snapshot, f"copy-{round_}", source.volume_id)
            else:
                origin = pb.VolumeContentSource(volume={"volume_id": source.volume_id})
                make = partial(calls.create, f"copy-{round_}", origin)
            copied, deleted = race(rng, make, partial(calls.delete, source.volume_id))
            # The copy either took the source's lock first (the delete is ABORTED or finds
            # the source in use), or came after the delete (the source is gone).
            expect([copied], {OK, ABORTED, NOT_FOUND})
            expect([deleted], {OK, ABORTED, grpc.StatusCode.FAILED_PRECONDITION})
            existing = {v.volume_id for v in calls.volumes()}
            assert (source.volume_id in existing) == (deleted[0] is not OK), (copied, deleted)
            if copied[0] is OK:
                made = copied[1].snapshot_id if copy == "snapshot" else copied[1].volume_id
                listed = {s.snapshot_id for s in calls.snapshots()} | existing
                assert made in listed, "a copy that answered OK must exist"
            calls.clean()
        finish(profile, calls)


def test_listing_while_volumes_are_deleted(profile: Profile) -> None:
    rng = random.Random(seed("list against delete"))
    with profile.driver() as driver:
        calls = Calls(driver, profile)
        made = [calls.create(f"listed-{i:02d}").volume_id for i in range(12)]
        rng.shuffle(made)
        errors: list[str] = []
        stop = threading.Event()

        def list_repeatedly() -> None:
            while not stop.is_set():
                try:
                    calls.volumes()
                    calls.snapshots()
                except grpc.RpcError as exc:
                    error: Any = exc
                    if error.code() is not ABORTED:
                        errors.append(f"{error.code().name}: {error.details()}")

        listers = [threading.Thread(target=list_repeatedly) for _ in range(2)]
        for lister in listers:
            lister.start()
        try:
            for volume_id in made:
                calls.delete(volume_id)
                time.sleep(rng.uniform(0, 0.02))
        finally:
            stop.set()
            for lister in listers:
                lister.join(60)
        assert errors == []
        finish(profile, calls)


def test_stage_against_unstage(profile: Profile, tmp_path: Path) -> None:
    profile.require_node("stage against unstage")
    rng = random.Random(seed("stage against unstage"))
    with profile.driver() as driver:
        calls = Calls(driver, profile)
        volume = calls.create("staged")
        context = calls.publish(volume.volume_id)
        staging = str(tmp_path / "staging")
        for _ in range(ROUNDS):
            outcomes = race(
                rng,
                partial(calls.stage, volume, staging, context),
                partial(calls.unstage, volume.volume_id, staging),
            )
            expect(outcomes, {OK, ABORTED})
        calls.unstage(volume.volume_id, staging)
        calls.unpublish(volume.volume_id)
        finish(profile, calls)
