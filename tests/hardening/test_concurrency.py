"""Concurrent calls on the same objects, on every backend: same-name creates, delete
against snapshot and clone, listing against delete, stage against unstage. One call wins,
the others answer ABORTED or the same answer; nothing answers INTERNAL, and afterwards
exactly one object exists per name and nothing is left behind.

On a profile without a node path (nfs here), stage against unstage is skipped with the
reason; the controller races run as everywhere.

Backups, on the profiles with a backup repository: one backup name asked for from many
threads, backups of one volume under different names at once, a backup deleted while it
runs, a restore while its backup is deleted, and restores of one backup onto two backends
at once. A backup is asked for again until it is ready, as the CO does; an answer a
backup reports once (its run failed, or ran into another) is retried like ABORTED, never
INTERNAL. Each backup restores byte for byte; a restore answers OK only with the whole
backup written, or NOT_FOUND or ABORTED; once everything is deleted and the repository
collected, neither the backend nor the repository holds anything.

Seeded: the seed is printed, and CAIRN_TEST_SEED replays a run's timing jitter."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi.generated import csi_pb2 as pb
from tests.hardening import harness
from tests.hardening.harness import Profile, host_leftovers, seed
from tests.support import NODE_ID, Driver, mount_capability

pytestmark = pytest.mark.integration
MiB = 1 << 20
OK = grpc.StatusCode.OK
ABORTED = grpc.StatusCode.ABORTED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ROUNDS = 6
BACKUP_ROUNDS = 2
READY_WITHIN = 120.0
"""Seconds a backup may take to be ready, or a refused restore to be let through."""
UNEXPECTED = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT}
"""Answers a retried backup or restore must never get."""


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

    def __init__(self, driver: Driver, profile: Profile, parameters: Mapping[str, str] | None = None) -> None:
        self.driver = driver
        self.profile = profile
        self.secrets = profile.secrets
        self.parameters = dict(profile.parameters if parameters is None else parameters)

    def create(
        self, name: str, source: pb.VolumeContentSource | None = None, parameters: Mapping[str, str] | None = None
    ) -> pb.Volume:
        request = pb.CreateVolumeRequest(
            name=name,
            volume_capabilities=[mount_capability()],
            capacity_range={"required_bytes": 16 * MiB},
            parameters=self.parameters if parameters is None else parameters,
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

    # backups

    def backup(self, name: str, volume_id: str) -> pb.Snapshot:
        """CreateSnapshot through a VolumeSnapshotClass of type backup, asked once."""
        parameters = {"type": "backup", "repository": self.profile.repository}
        request = pb.CreateSnapshotRequest(
            name=name, source_volume_id=volume_id, parameters=parameters, secrets=self.secrets
        )
        snapshot: pb.Snapshot = self.driver.controller.CreateSnapshot(request, timeout=120).snapshot
        return snapshot

    def until_ready(self, name: str, volume_id: str) -> pb.Snapshot:
        """The backup, asked for again as the CO does until it is ready to use."""
        snapshot: pb.Snapshot = until_ok(
            lambda: self.backup(name, volume_id), lambda s: s.ready_to_use, f"backup {name!r}"
        )
        return snapshot

    def restore(self, name: str, backup: str, parameters: Mapping[str, str] | None = None) -> pb.Volume:
        source = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=backup))
        return self.create(name, source, parameters)

    def is_backup(self, snapshot_id: str) -> bool:
        return bool(self.profile.repository) and snapshot_id.split(":", 2)[1] == self.profile.repository

    def get_snapshot(self, snapshot_id: str) -> pb.Snapshot:
        request = pb.GetSnapshotRequest(snapshot_id=snapshot_id, secrets=self.secrets)
        snapshot: pb.Snapshot = self.driver.controller.GetSnapshot(request, timeout=120).snapshot
        return snapshot

    def clean(self) -> None:
        """Delete everything: backups first, whose deletion removes the backend snapshots
        they made; none may outlive them."""
        snapshots = [s.snapshot_id for s in self.snapshots()]
        for snapshot_id in [s for s in snapshots if self.is_backup(s)]:
            self.delete_snapshot(snapshot_id)
        left = self.profile.backup_snapshots()
        for snapshot_id in [s for s in snapshots if not self.is_backup(s)]:
            self.delete_snapshot(snapshot_id)
        for volume in self.volumes():
            self.delete(volume.volume_id)
        assert not left, f"backend snapshots of backups outlive every backup: {sorted(left)}"


def until_ok(call: Callable[[], Any], done: Callable[[Any], bool], what: str) -> Any:
    """``call`` again until its answer is ``done``, as a CO retries: an error but those
    in UNEXPECTED is retried, and printed."""
    seen: list[str] = []
    deadline = time.monotonic() + READY_WITHIN
    while True:
        try:
            answer = call()
            if done(answer):
                if seen:
                    print(f"  {what} after {len(seen)} errors: {'; '.join(dict.fromkeys(seen))}")
                return answer
        except grpc.RpcError as exc:
            error: Any = exc
            seen.append(f"{error.code().name}: {error.details()}")
            assert error.code() not in UNEXPECTED, f"{what}: {seen[-1]}"
        assert time.monotonic() < deadline, f"{what} not done within {READY_WITHIN:g} s: {seen[-3:]}"
        time.sleep(0.05)


def finish(profile: Profile, calls: Calls) -> None:
    calls.clean()
    assert calls.volumes() == [] and calls.snapshots() == []
    if profile.repository and profile.repository_dir.exists():
        print(f"gc: {harness.collect_garbage(profile)}")
    held = profile.backend_objects()
    assert held == set(), f"the backend still holds objects after every delete: {sorted(held)}"
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


# -- backups ------------------------------------------------------------------------------


def filled(calls: Calls, name: str, rng: random.Random, parameters: Mapping[str, str] | None = None) -> pb.Volume:
    """A new volume, written to in a few places behind the driver's back."""
    volume = calls.create(name, parameters=parameters)
    rewrite(calls.profile, volume, rng)
    return volume


def rewrite(profile: Profile, volume: pb.Volume, rng: random.Random) -> str:
    """Write a few random runs into the volume, as a pod would; the digest of its content."""
    write, read = profile.write_volume, profile.read_volume
    assert write is not None and read is not None
    for _ in range(4):
        length = rng.randint(1, 2 * MiB)
        write(volume.volume_id, rng.randrange(volume.capacity_bytes - length), rng.randbytes(length))
    return harness.digest(read(volume.volume_id))


def restores_as(calls: Calls, backup: str, expected: str, name: str) -> None:
    """The backup restores onto a new volume byte for byte (the volume is deleted again)."""
    read = calls.profile.read_volume
    assert read is not None
    restored = until_ok(lambda: calls.restore(name, backup), lambda v: True, f"restore {name!r}")
    try:
        assert harness.digest(read(restored.volume_id)) == expected, f"backup {backup} does not restore as it was"
    finally:
        calls.delete(restored.volume_id)


def base_of(backup: str) -> str:
    """The name of the backend snapshot a backup keeps."""
    return harness.BACKUP_SNAPSHOT_PREFIX + backup.rsplit(":", 1)[1]


def repository_is_quiet(profile: Profile) -> None:
    """No backup in progress is marked, and nothing collectable is left once collected."""
    assert harness.pending_backups(profile) == [], "a backup is still marked in progress"
    harness.open_repository(profile).collect(grace=0)
    assert harness.repository_leftovers(profile) == [], "the repository holds what no backup needs"


def test_one_backup_name_asked_from_many_threads_makes_one_backup(profile: Profile) -> None:
    profile.require_backups("the same backup asked for at once")
    rng = random.Random(seed("same-name backups"))
    with profile.driver() as driver:
        calls = Calls(driver, profile)
        volume = filled(calls, "backed-up", rng)
        made: dict[str, tuple[str, str]] = {}
        for round_ in range(BACKUP_ROUNDS):
            name = f"same-{round_}"
            expected = rewrite(profile, volume, rng)
            # While it starts, then while it runs (or once it ended): one backup.
            outcomes = race(rng, *[partial(calls.backup, name, volume.volume_id) for _ in range(6)])
            outcomes += race(rng, *[partial(calls.backup, name, volume.volume_id) for _ in range(4)])
            expect(outcomes, {OK, ABORTED})
            ids = {answer.snapshot_id for code, answer in outcomes if code is OK}
            assert len(ids) == 1, outcomes
            done = calls.until_ready(name, volume.volume_id)
            assert {done.snapshot_id} == ids
            made[name] = (done.snapshot_id, expected)
        assert harness.pending_backups(profile) == []
        assert sorted(harness.manifests(profile).values()) == sorted(made), "not one backup per name"
        newest = made[f"same-{BACKUP_ROUNDS - 1}"][0]
        assert profile.backup_snapshots() == {base_of(newest)}
        for name, (backup, expected) in made.items():
            restores_as(calls, backup, expected, f"restored-{name}")
        repository_is_quiet(profile)
        finish(profile, calls)


def test_backups_of_one_volume_under_different_names_at_once(profile: Profile) -> None:
    profile.require_backups("backups of one volume at once")
    rng = random.Random(seed("backups of one volume at once"))
    with profile.driver() as driver:
        calls = Calls(driver, profile)
        volume = filled(calls, "backed-up", rng)
        # A backup before, whose snapshot the next ones all diff against.
        calls.until_ready("before", volume.volume_id)
        expected = rewrite(profile, volume, rng)
        names = [f"at-once-{i}" for i in range(3)]
        outcomes = race(rng, *[partial(calls.backup, name, volume.volume_id) for name in names])
        expect(outcomes, {OK, ABORTED})
        done = {name: calls.until_ready(name, volume.volume_id).snapshot_id for name in names}
        assert len(set(done.values())) == len(names), done
        assert harness.pending_backups(profile) == []
        assert sorted(harness.manifests(profile).values()) == sorted(["before", *names])
        print(f"backend snapshots of backups once they are all ready: {sorted(profile.backup_snapshots())}")
        for name, backup in done.items():
            restores_as(calls, backup, expected, f"restored-{name}")
        # The next backup leaves the volume one backend snapshot, its own.
        after = calls.until_ready("after", volume.volume_id).snapshot_id
        assert harness.pending_backups(profile) == []
        assert profile.backup_snapshots() == {base_of(after)}
        restores_as(calls, after, expected, "restored-after")
        repository_is_quiet(profile)
        finish(profile, calls)


def test_a_backup_deleted_while_it_runs_is_gone(profile: Profile) -> None:
    profile.require_backups("deleting a running backup")
    rng = random.Random(seed("delete a running backup"))
    with profile.driver() as driver:
        calls = Calls(driver, profile)
        volume = filled(calls, "backed-up", rng)
        started = time.monotonic()
        measured = calls.until_ready("measured", volume.volume_id).snapshot_id
        duration = time.monotonic() - started
        calls.delete_snapshot(measured)
        while_running = 0
        for round_ in range(ROUNDS // 2):
            rewrite(profile, volume, rng)  # so that every backup stores new chunks
            running = calls.backup(f"deleted-{round_}", volume.volume_id).snapshot_id
            time.sleep(rng.uniform(0, duration))
            while_running += not calls.get_snapshot(running).ready_to_use
            until_ok(lambda: calls.delete_snapshot(running), lambda _: True, f"delete {running}")  # noqa: B023
            with pytest.raises(grpc.RpcError) as gone:
                calls.get_snapshot(running)
            assert gone.value.code() is NOT_FOUND, gone.value.details()
            assert running not in [s.snapshot_id for s in calls.snapshots()]
            assert harness.manifests(profile) == {}, "a deleted backup saved its manifest"
            assert profile.backup_snapshots() == set(), "a deleted backup left its backend snapshot"
            repository_is_quiet(profile)
        print(f"{while_running} of {ROUNDS // 2} backups were deleted while they ran ({duration:.2f} s each)")
        finish(profile, calls)


def test_a_restore_while_its_backup_is_deleted_is_whole_or_refused(profile: Profile) -> None:
    profile.require_backups("a restore against the deletion of its backup")
    rng = random.Random(seed("restore against delete"))
    read = profile.read_volume
    assert read is not None
    with profile.driver() as driver:
        calls = Calls(driver, profile)
        volume = filled(calls, "backed-up", rng)
        for round_ in range(ROUNDS // 2):
            expected = rewrite(profile, volume, rng)
            backup = calls.until_ready(f"deleted-{round_}", volume.volume_id).snapshot_id
            restored, deleted = race(
                rng, partial(calls.restore, f"restored-{round_}", backup), partial(calls.delete_snapshot, backup)
            )
            expect([restored], {OK, NOT_FOUND, ABORTED})
            expect([deleted], {OK, ABORTED})
            print(f"round {round_}: restore {restored[0].name}, delete {deleted[0].name}")
            existing = [v.volume_id for v in calls.volumes() if v.volume_id != volume.volume_id]
            if restored[0] is OK:
                assert existing == [restored[1].volume_id]
                assert harness.digest(read(restored[1].volume_id)) == expected, "a restore answered OK, not whole"
                calls.delete(restored[1].volume_id)
            else:
                assert existing == [], f"a refused restore left the volumes {existing} ({restored})"
            until_ok(lambda: calls.delete_snapshot(backup), lambda _: True, f"delete {backup}")  # noqa: B023
            assert profile.filling() == set()
            assert harness.manifests(profile) == {} and profile.backup_snapshots() == set()
            repository_is_quiet(profile)
        finish(profile, calls)


def test_restores_of_one_backup_onto_two_backends_at_once(profile: Profile) -> None:
    profile.require_backups("restores onto two backends")
    rng = random.Random(seed("restores onto two backends"))
    both = harness.with_spare(profile)
    read = both.read_volume
    assert read is not None
    own = {**profile.parameters, "backend": profile.backend}
    spare = {**profile.parameters, "backend": harness.SPARE}
    with both.driver() as driver:
        calls = Calls(driver, both, own)
        volume = filled(calls, "backed-up", rng)
        expected = harness.digest(read(volume.volume_id))
        backup = calls.until_ready("backup", volume.volume_id).snapshot_id
        for round_ in range(BACKUP_ROUNDS):
            asked = [(f"own-{round_}", own), (f"spare-{round_}", spare), (f"own-{round_}", own)]
            outcomes = race(rng, *[partial(calls.restore, name, backup, where) for name, where in asked])
            expect(outcomes, {OK, ABORTED})
            print(f"round {round_}: {', '.join(code.name for code, _ in outcomes)} (then the refused asked again)")
            # Restores share their backup: only a second call of one name may be refused.
            assert outcomes[1][0] is OK, f"the restore onto the spare backend was refused: {outcomes[1]}"
            assert [code for code, _ in outcomes].count(ABORTED) <= 1, outcomes
            # The refused one (its name is being restored by the other) is asked again.
            made = [
                answer if code is OK else until_ok(partial(calls.restore, name, backup, where), lambda _: True, name)
                for (name, where), (code, answer) in zip(asked, outcomes, strict=True)
            ]
            assert made[0].volume_id == made[2].volume_id, "one name, two volumes"
            assert made[0].volume_id.startswith(f"1:{profile.backend}:"), made[0].volume_id
            assert made[1].volume_id.startswith(f"1:{harness.SPARE}:"), made[1].volume_id
            for restored in made[:2]:
                assert harness.digest(read(restored.volume_id)) == expected, f"{restored.volume_id} is not the backup"
            assert both.filling() == set()
            for restored in made[:2]:
                calls.delete(restored.volume_id)
        finish(both, calls)
