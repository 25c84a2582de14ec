"""Crash and retry, on every backend: kill -9 the driver inside create, clone, snapshot,
stage, expand and delete (with its child processes, as a container restart would, or
alone, as the OOM killer might), restart it, retry the same requests, and check that
exactly one object exists per name, nothing is left frozen, attached or mounted, data
written before a snapshot or clone is in it, and nothing at all is left once everything
is deleted.

Kill points: each operation is measured once, then killed after seeded random delays
within that time, and at milestones (the moment a given child process such as ``cp``,
``mkfs.ext4`` or ``rbd-fuse`` appears below the driver; the nfs controller runs no child
process, so its kills are at random delays only, and more of them: ``random_kills``).
Seeded: each test prints its seed, and CAIRN_TEST_SEED replays a run's choices (timing
itself cannot be replayed).

On a profile without a node path (nfs here), a "mount" is ControllerPublish alone and the
data is written and read on the server side; the stage rounds, which exist to test the
node path, are skipped with the reason.

Backups and restores (on the profiles with a backup repository) are crashed the same
way. A backup runs in the background after CreateSnapshot answers, so its step is the
CO's whole loop: CreateSnapshot asked again until the backup is ready to use. Its
milestones are events in the repository or the backend besides child processes: the
k-th new chunk stored (mid-upload), a volume marked as filling (mid-restore). After the
retry there must be exactly one backup per name, restorable byte for byte; exactly one
backend snapshot kept for the source (the newest backup's); no marker of a backup in
progress; and, once the repository is collected, no chunk that no manifest references.
A kill after the manifest is saved, which the random delays could hit by chance, waits
until the backup has ended: that window has a test of its own, which kills there on
purpose.

The first two tests pin the freeze defect: a snapshot or clone of a mounted local volume
freezes its filesystem, and a crash during the copy must not leave it frozen."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi import loopdev
from csi.backup.engine import backup_id
from csi.generated import csi_pb2 as pb
from tests.hardening import harness
from tests.hardening.harness import Profile, frozen_filesystems, host_leftovers, local_profile, seed, thaw
from tests.support import (
    CAP_SYS_RESOURCE,
    NODE_ID,
    Driver,
    command_name,
    descendants,
    has_capability,
    mount_capability,
    require_tools,
    scrub,
    wait_for_child,
)

pytestmark = pytest.mark.integration
MiB = 1 << 20
CALL_TIMEOUT = 120.0
POLL = 0.05  # how often the CO asks again whether a backup is ready
RETRY_FOR = 20.0  # a retry keeps trying this long (rbd: a dead client's watch expires first)
ALONE = 0.25  # share of kills that hit the driver alone, leaving its children running
# Answers no retry can change: a retry that gets one fails the test at once. Any other
# error is retried, as the sidecars and kubelet do, until RETRY_FOR has passed (and is
# printed): the restarted driver may still be busy, or the backend still holds the dead
# process's locks.
FINAL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
}


# -- processes ---------------------------------------------------------------------------


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


# Daemons a child may turn into; they serve a mount and outlive any call by design.
DAEMONS = {"rbd-fuse"}


def settle(orphans: list[int], timeout: float = 60.0) -> None:
    """Wait for what a killed driver's children were doing to end (a retry racing an
    orphaned ``mkfs`` is another test); kill what is still running after ``timeout``."""
    waited = [pid for pid in orphans if command_name(pid) not in DAEMONS]
    if not wait_until(lambda: not any(running(pid) for pid in waited), timeout):
        for pid in waited:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def scrub_profile(profile: Profile) -> None:
    """After a failure, remove what is left under the profile's root (its rbd-fuse daemons,
    mounts and loop devices included; see ``scrub``)."""
    scrub(profile.root)


def stop(driver: Driver, children: bool) -> list[int]:
    """SIGSTOP the driver, and its children when ``children``, so that the kill that
    follows lands here and all at once, as a container's end does (a child that saw its
    parent die first could act on it); returns the children."""
    assert driver.process is not None
    os.kill(driver.process.pid, signal.SIGSTOP)
    found = descendants(driver.process.pid)
    if children:
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
    return found


def restart(driver: Driver) -> None:
    """Start a killed driver again. Its socket is stale: removed first, so the client
    connects at once instead of backing off from the refused first attempt."""
    driver.socket.unlink(missing_ok=True)
    driver.start()


# -- the calls a CO makes ----------------------------------------------------------------


@dataclass
class Handle:
    """A volume as the sidecars and kubelet know it."""

    name: str
    id: str
    context: dict[str, str]
    publish_context: dict[str, str] = field(default_factory=dict)
    staging: str = ""
    target: str = ""


Step = tuple[str, str, Any]  # service ("controller" or "node"), method, request


class Api:
    """Requests carrying the profile's secrets and parameters, sent to whichever driver
    process currently serves the socket."""

    def __init__(self, profile: Profile, driver: Driver) -> None:
        self.profile = profile
        self.driver = driver
        self.cap = mount_capability(profile.fs_type)
        self.paths = driver.root / "paths"  # where the driver's own teardown looks for leftovers

    def send(self, step: Step) -> Any:
        service, method, request = step
        if service == "co":
            return self.until_ready(request)
        return getattr(getattr(self.driver, service), method)(request, timeout=CALL_TIMEOUT)

    def until_ready(self, request: Any) -> Any:
        """CreateSnapshot of a backup, asked again as the external-snapshotter does until
        the snapshot is ready to use; its last answer. An error is the step's error."""
        deadline = time.monotonic() + CALL_TIMEOUT
        controller = self.driver.controller  # this driver's: a kill closes its channel, which ends the loop
        while True:
            answer = controller.CreateSnapshot(request, timeout=CALL_TIMEOUT)
            if answer.snapshot.ready_to_use:
                return answer
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"backup {request.name!r} not ready within {CALL_TIMEOUT:g} s; the driver's threads:\n"
                    + self.driver.thread_stacks()[-20000:]
                )
            time.sleep(POLL)

    def retry(self, step: Step, deadline: float = RETRY_FOR) -> Any:
        """``step`` until it succeeds; an answer in FINAL, or errors for longer than
        ``deadline``, fail the test with every answer seen."""
        seen: list[str] = []
        end = time.monotonic() + deadline
        while True:
            try:
                answer = self.send(step)
            except grpc.RpcError as exc:
                error: Any = exc
                seen.append(f"{error.code().name}: {error.details()}")
                if error.code() in FINAL or time.monotonic() > end:
                    raise AssertionError(f"{step[1]} does not succeed: {tally(seen)}") from exc
                time.sleep(0.5)
                continue
            if seen:
                print(f"  {step[1]} succeeded after {len(seen)} errors: {tally(seen)}")
            return answer

    # volumes

    def create_request(self, name: str, size: int, source: pb.VolumeContentSource | None = None) -> Any:
        return pb.CreateVolumeRequest(
            name=name,
            volume_capabilities=[self.cap],
            capacity_range=pb.CapacityRange(required_bytes=size),
            parameters=self.profile.parameters,
            secrets=self.profile.secrets,
            volume_content_source=source,
        )

    def create(self, name: str, size: int = 64 * MiB, source: pb.VolumeContentSource | None = None) -> Handle:
        return self.handle(name, self.retry(("controller", "CreateVolume", self.create_request(name, size, source))))

    def handle(self, name: str, response: Any) -> Handle:
        volume = response.volume
        return Handle(name, volume.volume_id, dict(volume.volume_context))

    def delete_request(self, volume_id: str) -> Any:
        return pb.DeleteVolumeRequest(volume_id=volume_id, secrets=self.profile.secrets)

    def publish(self, vol: Handle) -> None:
        request = pb.ControllerPublishVolumeRequest(
            volume_id=vol.id, node_id=NODE_ID, volume_capability=self.cap, secrets=self.profile.secrets
        )
        vol.publish_context = dict(self.retry(("controller", "ControllerPublishVolume", request)).publish_context)

    def stage_request(self, vol: Handle) -> Any:
        vol.staging = str(self.paths / "staging" / vol.name)
        return pb.NodeStageVolumeRequest(
            volume_id=vol.id,
            staging_target_path=vol.staging,
            volume_capability=self.cap,
            publish_context=vol.publish_context,
            volume_context=vol.context,
            secrets=self.profile.secrets,
        )

    def node_publish(self, vol: Handle) -> None:
        vol.target = str(self.paths / "targets" / vol.name)
        request = pb.NodePublishVolumeRequest(
            volume_id=vol.id,
            staging_target_path=vol.staging,
            target_path=vol.target,
            volume_capability=self.cap,
            volume_context=vol.context,
        )
        self.retry(("node", "NodePublishVolume", request))

    def mount(self, vol: Handle) -> Handle:
        """ControllerPublish, NodeStage and NodePublish, as for a pod; without a node path
        ControllerPublish alone (the data is then reached on the server side)."""
        self.publish(vol)
        if not self.profile.node:
            return vol
        self.retry(("node", "NodeStageVolume", self.stage_request(vol)))
        self.node_publish(vol)
        return vol

    def unstage(self, vol: Handle) -> None:
        """NodeUnpublish and NodeUnstage: what kubelet does when the pod goes."""
        if vol.target:
            unpublish = pb.NodeUnpublishVolumeRequest(volume_id=vol.id, target_path=vol.target)
            self.retry(("node", "NodeUnpublishVolume", unpublish))
        if vol.staging:
            unstage = pb.NodeUnstageVolumeRequest(volume_id=vol.id, staging_target_path=vol.staging)
            self.retry(("node", "NodeUnstageVolume", unstage))
        vol.target = vol.staging = ""

    def unmount(self, vol: Handle) -> None:
        """Undo ``mount``: what kubelet and then the attacher do when the pod goes."""
        self.unstage(vol)
        unpublish = pb.ControllerUnpublishVolumeRequest(volume_id=vol.id, node_id=NODE_ID, secrets=self.profile.secrets)
        self.retry(("controller", "ControllerUnpublishVolume", unpublish))
        vol.target = vol.staging = ""

    def delete(self, vol: Handle) -> None:
        self.unmount(vol)
        self.retry(("controller", "DeleteVolume", self.delete_request(vol.id)))

    # snapshots

    def snapshot_request(self, name: str, volume_id: str) -> Any:
        return pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id, secrets=self.profile.secrets)

    def backup_request(self, name: str, volume_id: str) -> Any:
        """CreateSnapshot through a VolumeSnapshotClass of type backup."""
        parameters = {"type": "backup", "repository": self.profile.repository}
        return pb.CreateSnapshotRequest(
            name=name, source_volume_id=volume_id, parameters=parameters, secrets=self.profile.secrets
        )

    def backup(self, name: str, volume_id: str) -> str:
        """A finished backup's ID, asked for as the CO does."""
        return str(self.retry(("co", "CreateSnapshot", self.backup_request(name, volume_id))).snapshot.snapshot_id)

    def from_backup(self, backup: str) -> pb.VolumeContentSource:
        return pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=backup))

    def delete_snapshot_request(self, snapshot_id: str) -> Any:
        return pb.DeleteSnapshotRequest(snapshot_id=snapshot_id, secrets=self.profile.secrets)

    # data

    def write(self, vol: Handle, payload: bytes, sync: bool = True, name: str = "marker") -> None:
        """Write ``name`` in a mounted volume (without a node path: on the server side)."""
        if not self.profile.node:
            assert self.profile.write_data is not None
            self.profile.write_data(vol.context, name, payload)
            return
        with open(os.path.join(vol.target, name), "wb") as handle:
            handle.write(payload)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())

    def read(self, vol: Handle, name: str = "marker") -> bytes:
        """Read ``name`` of a mounted volume (without a node path: on the server side)."""
        if not self.profile.node:
            assert self.profile.read_data is not None
            return self.profile.read_data(vol.context, name)
        with open(os.path.join(vol.target, name), "rb") as handle:
            return handle.read()

    def restored_payload(self, name: str, source: pb.VolumeContentSource) -> bytes:
        """The marker of a new volume made from ``source``, read through a mount (or on the
        server side), after which the new volume is deleted again."""
        vol = self.mount(self.create(name, source=source))
        try:
            return self.read(vol)
        finally:
            self.delete(vol)

    # what exists

    def check_objects(
        self, volumes: dict[str, str], snapshots: dict[str, str], backups: Mapping[str, str] | None = None
    ) -> None:
        """Exactly the given volumes, snapshots and backups (name -> ID) exist: listed once
        each, and the backend holds exactly the pieces of the volumes and snapshots,
        nothing more (what the repository holds is checked on its own)."""
        listed = [
            e.volume.volume_id for e in self.retry(("controller", "ListVolumes", pb.ListVolumesRequest())).entries
        ]
        assert sorted(listed) == sorted(volumes.values()), f"volumes listed {listed}, expected {volumes}"
        request = pb.ListSnapshotsRequest(secrets=self.profile.secrets)
        listed = [e.snapshot.snapshot_id for e in self.retry(("controller", "ListSnapshots", request)).entries]
        wanted = sorted([*snapshots.values(), *(backups or {}).values()])
        assert sorted(listed) == wanted, f"snapshots listed {listed}, expected {snapshots} and backups {backups}"
        held = {o for o in self.profile.backend_objects() if not o.startswith(("trash ", "repository "))}
        expected = backend_pieces(self.profile.name, volumes, snapshots)
        assert held == expected, f"the backend holds {sorted(held - expected)} too, or lacks {sorted(expected - held)}"

    def check_clean(self) -> None:
        assert self.profile.backend_objects() == set(), "the backend still holds something"
        assert host_leftovers(self.profile.root) == []


def tally(answers: list[str]) -> str:
    """Each distinct answer once, with how often it came."""
    return "; ".join(f"{answer} (x{count})" for answer, count in Counter(answers).items())


def backend_pieces(kind: str, volumes: dict[str, str], snapshots: dict[str, str]) -> set[str]:
    """What a backend holds for these volumes and snapshots (name -> CSI ID)."""
    pieces: set[str] = set()
    for what, objects in (("volume", volumes), ("snapshot", snapshots)):
        for name, object_id in objects.items():
            local_id = object_id.split(":", 2)[2]
            if kind == "local":
                folder = "volumes" if what == "volume" else "snapshots"
                pieces |= {f"{folder}/{local_id}.img", f"{folder}/{local_id}.json"}
            elif kind == "nfs":
                # A record in the backend's folder; the data is the volume's folder
                # (named after the volume by the profile's subDir) or the snapshot's copy.
                if what == "volume":
                    pieces |= {f"volumes/{local_id}.json", f"folder {name}"}
                else:
                    pieces |= {f"snapshots/{local_id}.json", f"snapshots/{local_id}.data"}
            elif kind == "lvm":
                pieces.add(f"lv cairn-{local_id.split('@', 1)[1]}")
            elif kind == "local-routed":  # the files, and the object the controller reads
                folder = "volumes" if what == "volume" else "snapshots"
                rest = local_id.split("@", 1)[1]
                pieces |= {f"{folder}/{rest}.img", f"{folder}/{rest}.json", f"nodevolume {rest}"}
            else:
                image_uuid = local_id.rsplit("/", 1)[1]
                prefix = "cairn-vol-" if what == "volume" else "cairn-snap-"
                pieces |= {
                    f"image {prefix}{image_uuid}",
                    f"journal {what}.name.{name}",
                    f"journal {what}.uuid.{image_uuid}",
                }
    return pieces


# -- the freeze defect (local: the rbd backend does not freeze) --------------------------


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[Profile, Driver]]:
    profile = local_profile(tmp_path)
    with profile.driver() as driver:
        try:
            yield profile, driver
        finally:
            thaw(frozen_filesystems(profile.root))
            if host_leftovers(profile.root):
                scrub_profile(profile)


def busy_source(api: Api, payload: bytes) -> Handle:
    """A mounted volume holding a few hundred MiB of real data, so copying it (no reflink
    on ext4) takes long enough to land a kill inside the freeze; then a marker, not
    synced: the freeze must flush it into the copy."""
    vol = api.mount(api.create("busy", 640 * MiB))
    block = random.Random(1).randbytes(MiB)
    with open(os.path.join(vol.target, "fill"), "wb") as handle:
        for _ in range(384):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    api.write(vol, payload, sync=False)
    return vol


def snapshot_killed_in_copy(api: Api, source: Handle, name: str, alone: bool) -> int:
    """Send CreateSnapshot, and kill the driver once ``cp`` runs under it (so inside the
    freeze); returns the pid of that ``cp``."""
    driver = api.driver
    assert driver.process is not None
    pid = driver.process.pid
    call = driver.controller.CreateSnapshot.future(api.snapshot_request(name, source.id), timeout=CALL_TIMEOUT)
    copy = wait_for_child(pid, "cp", call.done)
    assert copy is not None, f"no cp ran under the driver: {call.exception() if call.done() else 'still running'}"
    stop(driver, children=not alone)
    driver.kill(children=not alone)
    return copy


def test_killing_the_driver_alone_while_frozen_thaws_at_once(local: tuple[Profile, Driver]) -> None:
    profile, driver = local
    api = Api(profile, driver)
    payload = os.urandom(4096)
    source = busy_source(api, payload)
    copy = snapshot_killed_in_copy(api, source, "snap", alone=True)
    orphans_left_copying = running(copy)
    thawed = wait_until(lambda: not frozen_filesystems(profile.root), timeout=5)
    settle([copy])
    assert orphans_left_copying, "the copy had ended before the kill; make the source bigger"
    assert thawed, f"still frozen 5 s after the driver died: {frozen_filesystems(profile.root)}"

    restart(driver)
    snapshot = api.retry(("controller", "CreateSnapshot", api.snapshot_request("snap", source.id))).snapshot
    restored = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id))
    assert api.restored_payload("restored", restored) == payload
    api.retry(("controller", "DeleteSnapshot", api.delete_snapshot_request(snapshot.snapshot_id)))
    api.delete(source)
    api.check_clean()


def test_restart_thaws_what_a_killed_driver_froze_and_the_retry_succeeds(local: tuple[Profile, Driver]) -> None:
    profile, driver = local
    api = Api(profile, driver)
    payload = os.urandom(4096)
    source = busy_source(api, payload)
    snapshot_killed_in_copy(api, source, "snap", alone=False)
    assert frozen_filesystems(profile.root), "the kill did not land inside the freeze"

    restart(driver)
    assert frozen_filesystems(profile.root) == [], "the restarted driver left the filesystem frozen"
    snapshot = api.retry(("controller", "CreateSnapshot", api.snapshot_request("snap", source.id))).snapshot
    restored = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id))
    assert api.restored_payload("restored", restored) == payload
    api.check_objects({"busy": source.id}, {"snap": snapshot.snapshot_id})
    api.retry(("controller", "DeleteSnapshot", api.delete_snapshot_request(snapshot.snapshot_id)))
    api.delete(source)
    api.check_clean()


# -- crash and retry on every backend ----------------------------------------------------


@dataclass(frozen=True)
class KillPoint:
    """Where a round kills the driver: after ``delay`` seconds, or once a child process
    named ``milestone`` appears below it; with its children, or ``alone``."""

    delay: float = 0.0
    milestone: str = ""
    alone: bool = False

    def __str__(self) -> str:
        where = f"at {self.milestone}" if self.milestone else f"after {self.delay * 1000:.0f} ms"
        return f"{where}{' (driver alone)' if self.alone else ''}"


class Scenario:
    """One operation, repeated in rounds: ``setup`` makes what it needs and returns the
    steps (requests) the operation sends; ``verify`` checks the outcome once the steps
    succeeded after the kill; ``cleanup`` removes what the round made.

    ``milestones`` names, per profile, the child processes to kill at; a profile not
    named (nfs: its controller runs none) is killed at random delays only."""

    milestones: dict[str, tuple[str, ...]] = {}
    node_path = False
    """Whether the operation exists to exercise the node path (skipped without one)."""
    copies = False
    """Whether the operation makes a snapshot or a clone (skipped without snapshots)."""
    backups = False
    """Whether the operation backs up or restores (skipped without a backup repository)."""
    random_kills: int | None = None
    """At most this many kills at random delays (None: the profile's ``random_kills``)."""

    def __init__(self, api: Api, rng: random.Random) -> None:
        self.api = api
        self.rng = rng
        self.volumes: dict[str, str] = {}  # what lasts across rounds: name -> ID
        self.snapshots: dict[str, str] = {}

    def prepare(self) -> None:
        pass

    def setup(self, round_: int) -> list[Step]:
        raise NotImplementedError

    def verify(self, answers: list[Any]) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def events(self) -> Mapping[str, Callable[[], bool]]:
        """Milestones that are no child process: name -> whether it has happened yet."""
        return {}

    def where(self) -> str:
        """Asked while the driver is stopped for its kill: what the kill hits ("" when
        the kill point says it all)."""
        return ""

    def too_late(self) -> str:
        """Asked while the driver is stopped for its kill: why the kill would land in a
        window that a test of its own covers ("" when it does not). The kill then waits
        until the operation has ended (``ended``)."""
        return ""

    def ended(self) -> None:
        """Return once the operation has ended, after the CO's calls have."""

    def window(self, duration: float) -> float:
        """How long after the first step's start random kills may come, for an operation
        that took ``duration`` when measured."""
        return duration


class Create(Scenario):
    def setup(self, round_: int) -> list[Step]:
        self.name = f"create-{round_}"
        return [("controller", "CreateVolume", self.api.create_request(self.name, 64 * MiB))]

    def verify(self, answers: list[Any]) -> None:
        self.vol = self.api.handle(self.name, answers[0])
        assert answers[0].volume.capacity_bytes >= 64 * MiB
        again = self.api.send(("controller", "CreateVolume", self.api.create_request(self.name, 64 * MiB)))
        assert again.volume.volume_id == self.vol.id, "a second retry made another volume"
        self.api.check_objects({self.name: self.vol.id}, {})

    def cleanup(self) -> None:
        self.api.delete(self.vol)


class Copy(Scenario):
    """A source volume that stays mounted (so the local backend freezes it while it
    copies), with a fresh marker written and synced before each round's copy."""

    copies = True

    def prepare(self) -> None:
        self.source = self.api.mount(self.api.create("source"))
        self.volumes["source"] = self.source.id

    def new_payload(self) -> None:
        self.payload = self.rng.randbytes(4096)
        self.api.write(self.source, self.payload)

    def finish(self) -> None:
        self.api.delete(self.source)


class Clone(Copy):
    milestones = {"local": ("sh", "cp")}

    def setup(self, round_: int) -> list[Step]:
        self.new_payload()
        self.name = f"clone-{round_}"
        source = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=self.source.id))
        return [("controller", "CreateVolume", self.api.create_request(self.name, 64 * MiB, source))]

    def verify(self, answers: list[Any]) -> None:
        self.clone = self.api.mount(self.api.handle(self.name, answers[0]))
        self.api.check_objects({**self.volumes, self.name: self.clone.id}, {})
        assert self.api.read(self.clone) == self.payload, "the clone lacks what was written before it"

    def cleanup(self) -> None:
        self.api.delete(self.clone)


class Snapshot(Copy):
    milestones = {"local": ("sh", "cp")}

    def setup(self, round_: int) -> list[Step]:
        self.new_payload()
        self.round = round_
        self.name = f"snap-{round_}"
        return [("controller", "CreateSnapshot", self.api.snapshot_request(self.name, self.source.id))]

    def verify(self, answers: list[Any]) -> None:
        self.snapshot_id = answers[0].snapshot.snapshot_id
        again = self.api.send(("controller", "CreateSnapshot", self.api.snapshot_request(self.name, self.source.id)))
        assert again.snapshot.snapshot_id == self.snapshot_id, "a second retry made another snapshot"
        self.api.check_objects(self.volumes, {self.name: self.snapshot_id})
        restored = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=self.snapshot_id))
        payload = self.api.restored_payload(f"restored-{self.round}", restored)
        assert payload == self.payload, "the snapshot lacks what was written before it"

    def cleanup(self) -> None:
        self.api.retry(("controller", "DeleteSnapshot", self.api.delete_snapshot_request(self.snapshot_id)))


class Stage(Scenario):
    # blkid: the first process after the loop device is attached (through its ioctls).
    milestones = {"local": ("blkid", "mkfs.ext4", "mount"), "rbd": ("rbd-fuse", "blkid", "mkfs.ext4", "mount")}
    node_path = True

    def setup(self, round_: int) -> list[Step]:
        self.vol = self.api.create(f"stage-{round_}")
        self.api.publish(self.vol)
        return [("node", "NodeStageVolume", self.api.stage_request(self.vol))]

    def verify(self, answers: list[Any]) -> None:
        self.api.node_publish(self.vol)
        payload = self.rng.randbytes(4096)
        self.api.write(self.vol, payload)
        assert self.api.read(self.vol) == payload
        self.api.check_objects({self.vol.name: self.vol.id}, {})

    def cleanup(self) -> None:
        self.api.delete(self.vol)
        assert host_leftovers(self.api.profile.root) == [], "unstaging after the crash left something"


class Expand(Scenario):
    """Online growth (ControllerExpand, then NodeExpand of the staged volume) where this
    host lets ext4 grow while mounted; elsewhere offline growth: ControllerExpand of an
    unstaged volume, then the NodeStage that grows it. Without a node path (nfs: a
    share's size is advisory, no filesystem grows), ControllerExpand alone, after which
    the volume reports the new size and keeps its data."""

    SIZE = 96 * MiB
    online = has_capability(CAP_SYS_RESOURCE)
    milestones = (
        {"local": ("resize2fs",), "rbd": ("resize2fs",)}
        if online
        else {"local": ("blkid", "e2fsck", "resize2fs"), "rbd": ("rbd-fuse", "e2fsck", "resize2fs")}
    )

    def setup(self, round_: int) -> list[Step]:
        self.vol = self.api.mount(self.api.create(f"expand-{round_}"))
        self.payload = self.rng.randbytes(4096)
        # Without a node path and a way to the data on the server side (lvm here: its
        # volumes are never active), the size alone is checked.
        self.data = self.api.profile.node or self.api.profile.write_data is not None
        if self.data:
            self.api.write(self.vol, self.payload)
        size = pb.CapacityRange(required_bytes=self.SIZE)
        controller = pb.ControllerExpandVolumeRequest(
            volume_id=self.vol.id, capacity_range=size, volume_capability=self.api.cap, secrets=self.api.profile.secrets
        )
        if not self.api.profile.node:
            return [("controller", "ControllerExpandVolume", controller)]
        if not self.online:
            self.api.unstage(self.vol)
            return [
                ("controller", "ControllerExpandVolume", controller),
                ("node", "NodeStageVolume", self.api.stage_request(self.vol)),
            ]
        node = pb.NodeExpandVolumeRequest(
            volume_id=self.vol.id,
            volume_path=self.vol.staging,
            capacity_range=size,
            staging_target_path=self.vol.staging,
            volume_capability=self.api.cap,
        )
        return [("controller", "ControllerExpandVolume", controller), ("node", "NodeExpandVolume", node)]

    def verify(self, answers: list[Any]) -> None:
        assert answers[0].capacity_bytes >= self.SIZE
        if not self.api.profile.node:
            request = pb.ControllerGetVolumeRequest(volume_id=self.vol.id)
            got = self.api.retry(("controller", "ControllerGetVolume", request)).volume
            assert got.capacity_bytes >= self.SIZE, "the volume does not keep its new size"
        else:
            if not self.online:
                self.api.node_publish(self.vol)
            st = os.statvfs(self.vol.target)
            assert st.f_blocks * st.f_frsize > 80 * MiB, "the filesystem did not grow"
        if self.data:
            assert self.api.read(self.vol) == self.payload
        self.api.check_objects({self.vol.name: self.vol.id}, {})

    def cleanup(self) -> None:
        self.api.delete(self.vol)


class Delete(Scenario):
    def setup(self, round_: int) -> list[Step]:
        self.vol = self.api.create(f"delete-{round_}")
        if not self.api.profile.snapshots:
            self.api.check_objects({self.vol.name: self.vol.id}, {})
            return [("controller", "DeleteVolume", self.api.delete_request(self.vol.id))]
        answer = self.api.retry(
            ("controller", "CreateSnapshot", self.api.snapshot_request(f"delete-snap-{round_}", self.vol.id))
        )
        self.api.check_objects({self.vol.name: self.vol.id}, {f"delete-snap-{round_}": answer.snapshot.snapshot_id})
        return [
            ("controller", "DeleteSnapshot", self.api.delete_snapshot_request(answer.snapshot.snapshot_id)),
            ("controller", "DeleteVolume", self.api.delete_request(self.vol.id)),
        ]

    def verify(self, answers: list[Any]) -> None:
        self.api.check_objects({}, {})
        self.api.check_clean()


def chunk_names(profile: Profile) -> set[str]:
    """The chunks the profile's repository holds (their digests)."""
    found: set[str] = set()
    with contextlib.suppress(FileNotFoundError), os.scandir(profile.repository_dir / "chunks") as folders:
        for folder in folders:
            with contextlib.suppress(FileNotFoundError), os.scandir(folder.path) as chunks:
                found.update(c.name for c in chunks if not c.name.startswith("."))
    return found


def kept_snapshots(api: Api, volume_id: str) -> list[str]:
    """The backend snapshots (not backups) listed for a volume."""
    request = pb.ListSnapshotsRequest(source_volume_id=volume_id, secrets=api.profile.secrets)
    listed = [e.snapshot.snapshot_id for e in api.retry(("controller", "ListSnapshots", request)).entries]
    return [i for i in listed if i.split(":", 2)[1] != api.profile.repository]


def check_backups(
    api: Api, volumes: dict[str, str], source: str, kept: dict[str, str], newest: str, wait: float = 30.0
) -> None:
    """Exactly the backups ``kept`` (name -> ID) exist, one each, in the repository and
    the listings; the source keeps exactly one backend snapshot, the newest backup's; no
    backup is marked in progress; and once the repository is collected (grace 0), no
    chunk is left that no manifest references."""
    profile = api.profile
    markers = harness.pending_backups(profile, wait)
    assert markers == [], f"markers of backups in progress are left: {markers}"
    saved = harness.manifests(profile)
    assert sorted(saved.values()) == sorted(kept), f"the repository holds backups {saved}, expected {sorted(kept)}"
    assert {f"1:{profile.repository}:{b}" for b in saved} == set(kept.values()), (saved, kept)
    base = harness.BACKUP_SNAPSHOT_PREFIX + kept[newest].rsplit(":", 1)[1]
    assert profile.backup_snapshots() == {base}, (
        f"backend snapshots of backups {sorted(profile.backup_snapshots())}; only the newest's, {base}, may stay"
    )
    bases = kept_snapshots(api, source)
    assert len(bases) == 1, f"the source keeps the backend snapshots {bases}; only the newest backup's may stay"
    api.check_objects(volumes, {base: bases[0]}, kept)
    harness.open_repository(profile).collect(grace=0)
    assert harness.repository_leftovers(profile) == [], "the repository holds what no backup needs"


def write_data(api: Api, vol: Handle, rng: random.Random, size: int, writes: int, largest: int) -> str:
    """Write ``writes`` random runs of bytes at random places in the volume behind the
    driver's back (as a pod writes its device); the digest of its whole content."""
    write, read = api.profile.write_volume, api.profile.read_volume
    assert write is not None and read is not None
    for _ in range(writes):
        length = rng.randint(1, largest)
        write(vol.id, rng.randrange(size - length), rng.randbytes(length))
    return harness.digest(read(vol.id))


class Backup(Scenario):
    """Incremental backups of one volume, which each round changes in a few places first:
    each round's backup reads what changed since the previous one's snapshot, which the
    round before kept. After each round the older backup is deleted, the newest kept."""

    backups = True
    milestones = {"local": ("cp", "chunk"), "rbd": ("chunk",)}  # cp: the backend snapshot
    random_kills = 3
    SIZE = 16 * MiB

    def prepare(self) -> None:
        self.source = self.api.create("backed-up", self.SIZE)
        self.volumes["backed-up"] = self.source.id
        write_data(self.api, self.source, self.rng, self.SIZE, 6, 2 * MiB)
        self.kept = {"backup-first": self.api.backup("backup-first", self.source.id)}

    def setup(self, round_: int) -> list[Step]:
        self.round, self.name = round_, f"backup-{round_}"
        self.expected = write_data(self.api, self.source, self.rng, self.SIZE, 3, MiB)
        self.local_id = backup_id(self.name)
        self.started = time.time()
        self.before = chunk_names(self.api.profile)
        self.new_chunks = self.rng.randint(1, 3)
        return [("co", "CreateSnapshot", self.api.backup_request(self.name, self.source.id))]

    def events(self) -> Mapping[str, Callable[[], bool]]:
        return {"chunk": lambda: len(chunk_names(self.api.profile) - self.before) >= self.new_chunks}

    def saved(self) -> bool:
        return (self.api.profile.repository_dir / "backups" / self.local_id).exists()

    def where(self) -> str:
        stored = len(chunk_names(self.api.profile) - self.before)
        return f"{stored} new chunks stored" if stored else "no new chunk stored yet"

    def window(self, duration: float) -> float:
        """Until the manifest is saved (the CO learns of it only at its next ask)."""
        return max(0.0, min(duration, self.saved_after))

    def ended(self) -> None:
        marker = self.api.profile.repository_dir / "pending" / self.local_id
        assert wait_until(lambda: not marker.exists(), 60), "the backup did not end within 60 s"

    def verify(self, answers: list[Any]) -> None:
        snapshot = answers[0].snapshot
        made = snapshot.snapshot_id
        assert snapshot.ready_to_use and made == f"1:{self.api.profile.repository}:{self.local_id}", snapshot
        again = self.api.send(("controller", "CreateSnapshot", self.api.backup_request(self.name, self.source.id)))
        assert again.snapshot.snapshot_id == made and again.snapshot.ready_to_use, "a second retry made another backup"
        self.kept[self.name] = made
        manifest = self.api.profile.repository_dir / "backups" / self.local_id
        self.saved_after = manifest.stat().st_mtime - self.started
        check_backups(self.api, self.volumes, self.source.id, self.kept, self.name)
        restored = self.api.create(f"restored-{self.round}", self.SIZE, self.api.from_backup(made))
        try:
            assert self.api.profile.read_volume is not None
            content = self.api.profile.read_volume(restored.id)
            assert harness.digest(content) == self.expected, "the backup does not restore the volume as it was"
        finally:
            self.api.delete(restored)

    def cleanup(self) -> None:
        for name in [n for n in self.kept if n != self.name]:
            self.api.retry(("controller", "DeleteSnapshot", self.api.delete_snapshot_request(self.kept.pop(name))))

    def finish(self) -> None:
        for backup in self.kept.values():
            self.api.retry(("controller", "DeleteSnapshot", self.api.delete_snapshot_request(backup)))
        profile = self.api.profile
        assert profile.backup_snapshots() == set(), "deleting every backup leaves their backend snapshots"
        self.api.delete(self.source)
        print(f"gc: {harness.collect_garbage(profile)}")
        assert harness.repository_leftovers(profile) == []


class Restore(Scenario):
    """Restores of one backup onto the profile's backend, a new volume each round."""

    backups = True
    milestones = {"local": ("filling",), "rbd": ("filling",)}
    random_kills = 2  # on rbd, each retry waits for the killed client's lock on the volume
    SIZE = 16 * MiB

    def prepare(self) -> None:
        self.source = self.api.create("restore-source", self.SIZE)
        self.volumes["restore-source"] = self.source.id
        self.expected = write_data(self.api, self.source, self.rng, self.SIZE, 6, 2 * MiB)
        self.backup = self.api.backup("restore-backup", self.source.id)

    def setup(self, round_: int) -> list[Step]:
        self.name = f"restored-{round_}"
        request = self.api.create_request(self.name, self.SIZE, self.api.from_backup(self.backup))
        return [("controller", "CreateVolume", request)]

    def events(self) -> Mapping[str, Callable[[], bool]]:
        return {"filling": lambda: bool(self.api.profile.filling())}

    def where(self) -> str:
        return "mid-fill" if self.api.profile.filling() else "no volume filling"

    def verify(self, answers: list[Any]) -> None:
        profile = self.api.profile
        self.vol = self.api.handle(self.name, answers[0])
        assert answers[0].volume.content_source.snapshot.snapshot_id == self.backup
        request = self.api.create_request(self.name, self.SIZE, self.api.from_backup(self.backup))
        again = self.api.send(("controller", "CreateVolume", request))
        assert again.volume.volume_id == self.vol.id, "a second retry made another volume"
        assert profile.filling() == set(), f"volumes still marked as filling: {profile.filling()}"
        assert profile.read_volume is not None
        assert harness.digest(profile.read_volume(self.vol.id)) == self.expected, "the restore is not the backup"
        kept = {"restore-backup": self.backup}
        check_backups(self.api, {**self.volumes, self.name: self.vol.id}, self.source.id, kept, "restore-backup")

    def cleanup(self) -> None:
        self.api.delete(self.vol)

    def finish(self) -> None:
        self.api.retry(("controller", "DeleteSnapshot", self.api.delete_snapshot_request(self.backup)))
        self.api.delete(self.source)
        print(f"gc: {harness.collect_garbage(self.api.profile)}")


SCENARIOS: dict[str, type[Scenario]] = {
    "create": Create,
    "clone": Clone,
    "snapshot": Snapshot,
    "stage": Stage,
    "expand": Expand,
    "delete": Delete,
    "backup": Backup,
    "restore": Restore,
}


def run_steps(
    api: Api, steps: list[Step], point: KillPoint | None, scenario: Scenario | None = None
) -> tuple[list[Any], str]:
    """Send ``steps`` in order; with a kill point, kill the driver there, restart it
    and send them all again (each is idempotent). Returns the answers and what the
    kill hit. ``scenario`` names the milestones that are events, and may defer a kill
    that falls in a window with a test of its own."""
    if point is None:
        return [api.send(step) for step in steps], "no kill"
    driver = api.driver
    assert driver.process is not None
    pid = driver.process.pid
    finished = threading.Event()

    def send_all() -> None:
        try:
            for step in steps:
                api.send(step)
        except (grpc.RpcError, ValueError, AttributeError):
            # The kill cut it short: a CO's loop finds the channel closed (ValueError), or
            # gone between two steps (the killed driver's handle drops it: AttributeError).
            pass
        finally:
            finished.set()

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    hit = str(point)
    event = scenario.events().get(point.milestone) if scenario is not None and point.milestone else None
    if event is not None:
        if not wait_until(lambda: event() or finished.is_set(), 60, step=0.0005) or not event():
            hit = f"after the operation (no {point.milestone} seen)"
    elif point.milestone:
        if wait_for_child(pid, point.milestone, finished.is_set) is None:
            hit = f"after the operation (no {point.milestone} seen)"
    else:
        finished.wait(point.delay)
        if finished.is_set():
            hit = f"after the operation ({point})"
    children = stop(driver, children=not point.alone)
    late = scenario.too_late() if scenario is not None else ""
    if late:
        for stopped in [pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        finished.wait(CALL_TIMEOUT)
        assert scenario is not None
        scenario.ended()
        children = stop(driver, children=not point.alone)
        hit = f"after the operation ({point}: {late}, so the kill waited for the end)"
    elif scenario is not None:
        where = scenario.where()
        hit = f"{hit}, {where}" if where else hit
    driver.kill(children=not point.alone)
    orphans = children if point.alone else []
    sender.join(CALL_TIMEOUT)
    settle(orphans)
    restart(driver)
    return [api.retry(step) for step in steps], hit


def kill_points(rng: random.Random, duration: float, milestones: tuple[str, ...], kills: int) -> list[KillPoint]:
    points = [KillPoint(delay=rng.uniform(0, duration), alone=rng.random() < ALONE) for _ in range(kills)]
    points += [KillPoint(milestone=name, alone=rng.random() < ALONE) for name in milestones]
    rng.shuffle(points)
    return points


@pytest.mark.parametrize("operation", list(SCENARIOS))
def test_crash_and_retry(profile: Profile, operation: str) -> None:
    if SCENARIOS[operation].node_path:
        profile.require_node(f"crash and retry in {operation}")
    if SCENARIOS[operation].copies:
        profile.require_snapshots(f"crash and retry in {operation}")
    if SCENARIOS[operation].backups:
        profile.require_backups(f"crash and retry in {operation}")
    rng = random.Random(f"{seed(f'crash {profile.name} {operation}')}")
    with profile.driver() as driver:
        api = Api(profile, driver)
        scenario = SCENARIOS[operation](api, rng)
        try:
            scenario.prepare()
            started = time.monotonic()
            answers, _ = run_steps(api, scenario.setup(0), None)
            duration = time.monotonic() - started
            scenario.verify(answers)
            scenario.cleanup()
            window = scenario.window(duration)
            kills = min(profile.random_kills, scenario.random_kills or profile.random_kills)
            points = kill_points(rng, window, scenario.milestones.get(profile.name, ()), kills)
            print(f"{operation} takes {duration * 1000:.0f} ms; kills: {', '.join(map(str, points))}")
            for round_, point in enumerate(points, start=1):
                started = time.monotonic()
                answers, hit = run_steps(api, scenario.setup(round_), point, scenario)
                assert frozen_filesystems(profile.root) == [], f"left frozen by the kill {hit}"
                scenario.verify(answers)
                scenario.cleanup()
                print(f"round {round_}: killed {hit}; {time.monotonic() - started:.1f} s")
            scenario.finish()
            api.check_objects({}, {})
            api.check_clean()
        finally:
            thaw(frozen_filesystems(profile.root))
            if host_leftovers(profile.root):
                scrub_profile(profile)


def test_a_backup_killed_after_its_manifest_is_saved_leaves_nothing_behind(profile: Profile) -> None:
    """Kill the driver once a backup's manifest is saved and before the backup has ended
    (the driver is stopped the moment the manifest shows, with its marker still there),
    restart it and ask again as the CO does: one backup per name, restorable byte for
    byte, one backend snapshot kept for the volume, no marker of a backup in progress,
    nothing unreferenced once collected."""
    profile.require_backups("a crash after a backup's manifest")
    rng = random.Random(seed(f"crash after the manifest {profile.name}"))
    size = 16 * MiB
    with profile.driver() as driver:
        api = Api(profile, driver)
        source = api.create("backed-up", size)
        try:
            write_data(api, source, rng, size, 4, 2 * MiB)
            kept = {"first": api.backup("first", source.id)}
            for attempt in range(3):
                name = f"second-{attempt}"
                expected = write_data(api, source, rng, size, 3, MiB)
                manifest = profile.repository_dir / "backups" / backup_id(name)
                marker = profile.repository_dir / "pending" / backup_id(name)
                api.send(("controller", "CreateSnapshot", api.backup_request(name, source.id)))
                assert wait_until(manifest.exists, 60, step=0.0002), f"backup {name!r} saved no manifest in 60 s"
                assert driver.process is not None
                children = stop(driver, children=True)
                if marker.exists():
                    break
                # Stopped after the backup had ended: let it go on, and try once more.
                for stopped in [driver.process.pid, *children]:
                    os.kill(stopped, signal.SIGCONT)
                kept[name] = api.backup(name, source.id)
            else:
                pytest.skip("the driver could not be stopped between a manifest and the end of its backup")
            previous_base_left = bool(profile.backup_snapshots() - {harness.BACKUP_SNAPSHOT_PREFIX + backup_id(name)})
            driver.kill()
            restart(driver)
            kept[name] = api.backup(name, source.id)
            print(
                f"killed after the manifest of {name}; the previous backup's snapshot was still there: {previous_base_left}"
            )
            restored = api.create("restored", size, api.from_backup(kept[name]))
            assert profile.read_volume is not None
            assert harness.digest(profile.read_volume(restored.id)) == expected, "the backup does not restore"
            api.delete(restored)
            # Nothing runs after the retry: what is marked in progress then is left over.
            check_backups(api, {"backed-up": source.id}, source.id, kept, name, wait=1.0)
        finally:
            for backup in kept.values():
                api.retry(("controller", "DeleteSnapshot", api.delete_snapshot_request(backup)))
            api.delete(source)
            harness.collect_garbage(profile)


# -- a regression the suite found -------------------------------------------------------


def test_a_crash_between_mount_and_record_does_not_wedge_the_stage(local: tuple[Profile, Driver]) -> None:
    """Deterministic form of what the suite's stage rounds hit when the driver dies alone
    while ``mount`` runs: the orphaned mount completes, the record is never written."""
    profile, driver = local
    api = Api(profile, driver)
    vol = api.create("wedged")
    api.publish(vol)
    request = api.stage_request(vol)
    api.send(("node", "NodeStageVolume", request))
    for record in driver.state.glob("*.json"):
        record.unlink()  # as if the driver had died between mounting and recording
    try:
        api.send(("node", "NodeStageVolume", request))
    finally:
        api.delete(vol)


def test_a_mount_copied_into_another_namespace_keeps_unstage_from_answering_ok(local: tuple[Profile, Driver]) -> None:
    """Deterministic form of what the clone rounds hit on a busy host: a process that
    entered a new mount namespace while the source was staged (a container starting)
    holds a copy of its mount, so after NodeUnstage unmounts it the loop device is still
    in use, and ``losetup --detach`` only marks it to detach at its last close. Unstage
    must not answer OK while the device is attached; once the copy is gone, a retry is."""
    require_tools("unshare")
    profile, driver = local
    api = Api(profile, driver)
    vol = api.mount(api.create("held"))
    image = vol.publish_context["image"]  # the local backend's image file
    ours = os.readlink("/proc/self/ns/mnt")
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "120"])
    try:
        assert wait_until(lambda: command_name(holder.pid) == "sleep", 10), "unshare did not start"
        assert os.readlink(f"/proc/{holder.pid}/ns/mnt") != ours
        unpublish = pb.NodeUnpublishVolumeRequest(volume_id=vol.id, target_path=vol.target)
        api.send(("node", "NodeUnpublishVolume", unpublish))
        vol.target = ""
        unstage = pb.NodeUnstageVolumeRequest(volume_id=vol.id, staging_target_path=vol.staging)
        with pytest.raises(grpc.RpcError) as held:
            api.send(("node", "NodeUnstageVolume", unstage))
        assert held.value.code() == grpc.StatusCode.FAILED_PRECONDITION, held.value.details()
        assert f"process {holder.pid} (sleep)" in held.value.details()
        assert loopdev.find(image), "the device was detached after all"
    finally:
        holder.kill()
        holder.wait()
    api.delete(vol)  # the retried unstage detaches it now
    api.check_objects({}, {})
    api.check_clean()
