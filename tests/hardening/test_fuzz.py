"""A structure-aware fuzzer over every RPC of the Identity, Controller, Node and
SnapshotMetadata services (SnapshotMetadata's two RPCs answer with a stream, which is read
to its end: an error in mid-stream counts like any other answer).

Per backend: make a few real volumes (one staged and published on a filesystem, one as a
raw block device, one idle; where the backend has no block access, a second filesystem
volume shared by many nodes) and a snapshot through the API, then send the deterministic
``sweep`` (each field of each request set to each hostile value, one at a time) and a
seeded run of Hypothesis batches (mostly single mutated requests; some sent concurrently;
a few raw byte strings). Then undo through the API everything the run made, and check.

Where the profile has a backup repository, the world also holds two more snapshots of
the idle volume (written to in between, behind the driver's back, so the two differ) for
the SnapshotMetadata requests, and a finished backup of it; the fuzz starts more backups (some deleted while they run) and
restores them. The clean-up deletes the backups first, and fails the run for a backend
snapshot a backup made (``cairn-backup-*``) that outlives them; it then collects the
repository (``gc --grace 0``, as an operator would), and whatever the repository still
holds (a manifest, a chunk, a marker of a backup in progress) is left in the backend.

A run fails on: UNKNOWN; INTERNAL for a request that parses; a call that hangs (no answer
within CALL_TIMEOUT); an error message over MAX_DETAILS bytes or a RESOURCE_EXHAUSTED about
metadata size; a node call that succeeds with a relative path; on nfs, a CreateVolume of
the sweep's attempts to leave the profile's folder that succeeds; a file made outside the
test's root (driver's working directory, /, /tmp) or outside the sandbox and the driver's
directory within it; a mount outside them; the driver dying or not answering Probe; and,
after the clean-up, a mount or loop device more than before, or an object left in the
backend (its backup repository included); a SnapshotMetadata stream whose ranges are
not sorted, overlap, lie outside the volume or before ``starting_offset``, or come in
messages of more than ``max_results``; on a backend whose profile names where it may write (nfs: the profile's folder
and the backend's own on the export), anything it made elsewhere, after every batch.

On a profile without a node path (nfs: the node mounts with the kernel's NFS client, which
this host lacks; the vm tier runs that path), the fixtures are ControllerPublished but
not staged, and the node RPCs that mount or need a mount (``fz.NODE_PATH_RPCS``) are
neither swept nor drawn, which the run prints with the reason; every controller RPC, and
the other node RPCs, are fuzzed as everywhere.

Failures are collected, not raised at once: the report lists each distinct class (RPC,
kind, code, message shape) with the smallest request that showed it, after a bounded
minimisation by re-sending it with fields cleared. The run is bounded (EXAMPLES batches,
no shrinking phase, BUDGET seconds at most) and seeded: the seed is printed, and
CAIRN_TEST_SEED replays the same requests (concurrent batches may interleave differently).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import hypothesis
import pytest
from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, Phase, Verbosity, example, given, settings

from csi import mount
from csi.generated import csi_pb2 as pb
from tests.ceph import POOL, CephCluster
from tests.hardening import harness
from tests.hardening import strategies as fz
from tests.hardening.harness import HostState, Profile
from tests.support import NODE_ID, Driver, block_capability, mount_capability, scrub

pytestmark = pytest.mark.integration

EXAMPLES = 800
"""Hypothesis batches per backend, after the sweep."""
CALL_TIMEOUT = 60.0
"""A call with no answer by then hangs."""
BUDGET = 105.0
"""Seconds of fuzzing per backend at most; a slower run stops early and says so. With
set-up, minimising and clean-up, a backend stays under two minutes."""
MAX_DETAILS = 4096
"""Longest error message a client should get: the message travels in a trailer, and
clients with a 16 KiB metadata limit refuse longer trailers."""
MAX_HANGS = 2
SHRINK_CALLS = 25
"""Re-sends per failure class when minimising its request..."""
SHRINK_BUDGET = 15.0
"""...and seconds for minimising them all."""
MiB = 1 << 20
PATH_FIELDS = ("staging_target_path", "target_path", "volume_path")
CACHES = {".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"}
"""Entries the tools make in the driver's working directory (the repository)."""
STRAY = "made outside its folders on the backend"
PLACES = (
    "file made outside the sandbox",
    "mount outside the sandbox",
    "a failed call left a mount or device",
    STRAY,
)
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# -- outcomes and failures ------------------------------------------------------------------


@dataclass
class Failure:
    kind: str
    rpc: str
    code: str
    message: str
    call: fz.Call | None = None
    concurrent: bool = False

    @property
    def key(self) -> tuple[str, str, str, str]:
        if self.kind in PLACES:  # where a stray is tells one defect from another
            return self.kind, self.rpc, self.code, UUID.sub("UUID", re.sub(r"/dev/loop\d+", "/dev/loopN", self.message))
        return self.kind, self.rpc, self.code, shape(self.message)


def shape(message: str) -> str:
    """A message with what varies between requests (quoted values, paths, numbers) taken
    out, so one defect seen with many values counts once."""
    lines = [line.strip() for line in message.splitlines() if line.strip()] or [""]
    tool = re.match(r"^(\S+) exited with \d+: (.*)", lines[0])
    if tool:  # a host tool failed: its name and the last line it wrote say why
        last = lines[-1] if len(lines) > 1 and not lines[-1].startswith("dmesg") else tool.group(2)
        return f"{tool.group(1)} failed: {_normalised(last)[:80]}"
    return _normalised(lines[0])[:100]


def _normalised(text: str) -> str:
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"/[^\s:,;)']*", "PATH", text)
    return re.sub(r"\d+", "N", text)


def abbreviated(message: Message) -> Message:
    """A copy with long strings cut and Ceph keys hidden, for the report."""
    copy = type(message)()
    copy.CopyFrom(message)
    _abbreviate(copy)
    return copy


def _cut(value: str) -> str:
    if len(value) <= 80:
        return value
    return f"<{len(value)} chars: {value[:24]!r}...{value[-12:]!r}>"


def _abbreviate(message: Message) -> None:
    for f, value in message.ListFields():
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            items = dict(value)
            value.clear()
            for k, v in items.items():
                if isinstance(v, str):
                    value[_cut(k)] = "***" if k == "userKey" else _cut(v)
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            for sub in value if f.is_repeated else [value]:
                _abbreviate(sub)
        elif f.type == FieldDescriptor.TYPE_STRING:
            if f.is_repeated:
                cut = [_cut(v) for v in value]
                del value[:]
                value.extend(cut)
            else:
                setattr(message, f.name, _cut(value))


def describe(call: fz.Call) -> str:
    if isinstance(call.request, bytes):
        return f"{call.method} raw bytes {call.request[:64]!r}{'...' if len(call.request) > 64 else ''}"
    body = text_format.MessageToString(abbreviated(call.request), as_one_line=True, as_utf8=True)
    return f"{call.method} {{{body}}}"


def size(call: fz.Call) -> int:
    return len(call.request) if isinstance(call.request, bytes) else call.request.ByteSize()


# -- the host around the driver ------------------------------------------------------------


class Watch:
    """What the driver may not touch: directory entries outside the test's root and
    mounts outside the sandbox and the driver's own directories. Checked after every
    batch, so a stray is blamed on the calls that made it."""

    def __init__(self, profile: Profile, sandbox: Path, driver_cwd: Path) -> None:
        root = profile.root.resolve()
        self.root = root
        self.allowed = [str(sandbox.resolve()), str(root / "driver"), str(root / "fuse")]
        self.allowed_in_root = {"driver", "fuse", "sandbox"}
        self.dirs = sorted({driver_cwd, Path("/"), Path("/tmp"), root})
        self.entries = {d: self._list(d) for d in self.dirs}
        self.mounts = {m.target for m in mount.mounts()}

    @staticmethod
    def _list(directory: Path) -> set[str]:
        try:
            return set(os.listdir(directory))
        except OSError:
            return set()

    def new_entries(self) -> list[str]:
        """New entries: any in the test's root but the driver's, the sandbox and the fuse
        directory; any in the driver's working directory but the tools' caches; in / and
        /tmp, which other programs (and tests running at the same time) use too, those with
        the fuzzer's mark: every path the fuzzer sends outside the test's root has it."""
        found = []
        for directory in self.dirs:
            now = self._list(directory)
            for name in sorted(now - self.entries[directory]):
                if directory == self.root:
                    ours = name not in self.allowed_in_root
                elif directory in (Path("/"), Path("/tmp")):
                    ours = fz.MARK in name
                else:
                    ours = name not in CACHES
                if ours:
                    found.append(str(directory / name))
            self.entries[directory] = now  # report each stray once
        return found

    def new_mounts(self) -> list[str]:
        found = []
        for entry in mount.mounts():
            target = entry.target
            if target in self.mounts:
                continue
            self.mounts.add(target)
            inside = any(target == a or target.startswith(a + "/") for a in self.allowed)
            if not inside and not self.other_session(target):
                found.append(f"{target} ({entry.source})")
        return found

    def other_session(self, text: str) -> bool:
        """Whether ``text`` names a path under /tmp outside this test's root: another test
        session's. The fuzzer names no such path, but those with its mark."""
        return "/tmp/" in text and str(self.root) not in text and fz.MARK not in text

    def ours(self, change: str, uuids: set[str]) -> bool:
        """Whether a new mount or loop device may be this driver's: tests running at the
        same time on this host make their own, under their directories, for their
        images."""
        other_images = bool(set(UUID.findall(change)) - uuids) and str(self.root) not in change
        return not (self.other_session(change) or other_images)

    def host_changes(self, before: HostState, uuids: set[str]) -> list[str]:
        """Mounts and loop devices since ``before`` that may be this driver's."""
        return [c for c in HostState.now().changes_since(before) if self.ours(c, uuids)]


def remove_strays(watch: Watch) -> None:
    """Unmount and remove what the fuzz made outside the test's root: entries whose
    names carry the fuzzer's mark, in the watched directories."""
    for entry in reversed(mount.mounts()):
        if fz.MARK in entry.target and not entry.target.startswith(str(watch.root)):
            subprocess.run(["umount", "-l", entry.target], check=False)
    for directory in watch.dirs:
        if directory == watch.root:
            continue
        for name in Watch._list(directory):
            if fz.MARK in name:
                subprocess.run(["rm", "-rf", "--one-file-system", str(directory / name)], check=False)


# -- the fuzzer ---------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    seconds: float
    response: bytes | None = None
    stream: list[bytes] | None = None
    """The messages of a streamed answer, read to its end (or to its error)."""


@dataclass
class Fuzzer:
    driver: Driver
    profile: Profile
    watch: Watch
    world: fz.World | None = None
    failures: list[Failure] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    stopped: str = ""
    hangs: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)
    created_volumes: list[str] = field(default_factory=list)
    created_snapshots: list[str] = field(default_factory=list)
    staged: list[tuple[str, str]] = field(default_factory=list)
    published: list[tuple[str, str]] = field(default_factory=list)
    tried_stages: list[tuple[str, str]] = field(default_factory=list)
    tried_publishes: list[tuple[str, str]] = field(default_factory=list)
    strays: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        assert self.driver.channel is not None
        channel = self.driver.channel
        self.stubs: dict[str, Any] = {}
        for service, method in fz.methods():
            path = f"/csi.v1.{service}/{method.name}"
            stub = channel.unary_stream if method.server_streaming else channel.unary_unary
            self.stubs[path] = stub(path)
        self.pool = ThreadPoolExecutor(max_workers=8)

    # -- sending ----------------------------------------------------------------------

    def send(self, call: fz.Call) -> Outcome:
        data = call.request if isinstance(call.request, bytes) else call.request.SerializeToString()
        started = time.monotonic()
        stream: list[bytes] | None = [] if fz.methods_by_name()[call.method].server_streaming else None
        try:
            if stream is None:
                response = self.stubs[call.path](data, timeout=CALL_TIMEOUT)
            else:
                # Read to the end: an error raised in mid-stream is the call's answer.
                for message in self.stubs[call.path](data, timeout=CALL_TIMEOUT):
                    stream.append(message)
                response = b""
            outcome = Outcome(grpc.StatusCode.OK, "", time.monotonic() - started, response, stream)
        except grpc.RpcError as exc:
            outcome = Outcome(exc.code(), exc.details() or "", time.monotonic() - started, None, stream)
        with self.lock:
            self.counts[call.method] += 1
            self.codes[(call.method, outcome.code.name)] += 1
        return outcome

    def call(self, call: fz.Call, concurrent: bool = False) -> Outcome:
        """Send, judge and learn from one call; a failed node call sent alone must leave
        no mount or loop device behind; an ``undo`` call that succeeded is undone."""
        node = not concurrent and call.method in ("NodeStageVolume", "NodePublishVolume")
        before = HostState.now() if node else None
        self.tried(call)
        outcome = self.send(call)
        found = self.verdicts(call, outcome)
        if before is not None and outcome.code is not grpc.StatusCode.OK:
            changes = HostState.now().changes_since(before)
            for change in [c for c in changes if self.watch.ours(c, self.uuids())]:
                found.append(
                    Failure("a failed call left a mount or device", call.method, outcome.code.name, change, call)
                )
        for failure in found:
            failure.concurrent = concurrent
        with self.lock:
            self.failures += found
            acted = parsed(call)  # raw bytes that parse (an unknown field added) act too
            if outcome.code is grpc.StatusCode.OK and acted is not None:
                self.learn(call.method, acted, outcome.response or b"")
        if call.undo and outcome.code is grpc.StatusCode.OK and isinstance(call.request, Message):
            self.check_host((call,))  # before the undo hides where it mounted
            request: Any = call.request
            if call.method == "NodeStageVolume":
                unstage = pb.NodeUnstageVolumeRequest(
                    volume_id=request.volume_id, staging_target_path=request.staging_target_path
                )
                self.call(fz.Call("Node", "NodeUnstageVolume", unstage))
            elif call.method == "NodePublishVolume":
                unpublish = pb.NodeUnpublishVolumeRequest(volume_id=request.volume_id, target_path=request.target_path)
                self.call(fz.Call("Node", "NodeUnpublishVolume", unpublish))
        return outcome

    def uuids(self) -> set[str]:
        """The UUIDs in the IDs of every volume and snapshot this run knows."""
        known = [*self.created_volumes, *self.created_snapshots]
        if self.world is not None:
            known += [*self.world.volumes, *self.world.snapshots]
        return {u for i in known for u in UUID.findall(i)}

    def tried(self, call: fz.Call) -> None:
        """Remember every stage and publish asked for, done or not, for the clean-up."""
        request: Any = parsed(call)
        if request is None:
            return
        if call.method == "NodeStageVolume" and request.volume_id and request.staging_target_path:
            pair = (request.volume_id, request.staging_target_path)
            with self.lock:
                if pair not in self.tried_stages:
                    self.tried_stages.append(pair)
        elif call.method == "NodePublishVolume" and request.volume_id and request.target_path:
            pair = (request.volume_id, request.target_path)
            with self.lock:
                if pair not in self.tried_publishes:
                    self.tried_publishes.append(pair)

    def expect_ok(self, call: fz.Call) -> Message:
        """A set-up call that must succeed; its answer, parsed."""
        outcome = self.call(call)
        assert outcome.code is grpc.StatusCode.OK, (
            f"set-up call {describe(call)}: {outcome.code.name} {outcome.details}"
        )
        output = fz.methods_by_name()[call.method].output_type.name
        response: Message = getattr(pb, output).FromString(outcome.response or b"")
        return response

    def verdicts(self, call: fz.Call, outcome: Outcome) -> list[Failure]:
        code, details = outcome.code, outcome.details
        found: list[Failure] = []

        def fail(kind: str, message: str = details) -> None:
            found.append(Failure(kind, call.method, code.name, message, call))

        parses = True
        if isinstance(call.request, bytes):
            try:
                fz.request_class(fz.methods_by_name()[call.method]).FromString(call.request)
            except DecodeError:
                parses = False
        if code is grpc.StatusCode.UNKNOWN:
            fail("UNKNOWN status")
        elif code is grpc.StatusCode.INTERNAL and parses:
            fail("INTERNAL")
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED and outcome.seconds >= CALL_TIMEOUT * 0.9:
            # Where the call is held, while it still is: the driver's threads.
            fail(
                "hang",
                f"no answer within {CALL_TIMEOUT:g}s; the driver's threads:\n{self.driver.thread_stacks()[-8000:]}",
            )
            self.hangs += 1
        elif code is grpc.StatusCode.RESOURCE_EXHAUSTED and re.search("metadata|header", details, re.I):
            fail("error message over the client's metadata limit")
        elif code is grpc.StatusCode.UNAVAILABLE and not self.alive():
            fail("driver died")
        if len(details.encode()) > MAX_DETAILS:
            fail("oversized error message", f"{len(details.encode())} bytes: {details[:120]}")
        if call.refuse and code is grpc.StatusCode.OK:
            fail("an attempt to leave the profile's folder succeeded", "OK")
        if code is grpc.StatusCode.OK and not isinstance(call.request, bytes):
            request = call.request
            output = fz.methods_by_name()[call.method].output_type.name
            try:
                answers = [
                    getattr(pb, output).FromString(m) for m in [outcome.response or b"", *(outcome.stream or [])]
                ]
            except DecodeError as exc:
                fail("unparseable response", str(exc))
            else:
                if outcome.stream is not None:
                    for problem in block_metadata_problems(request, answers[1:]):
                        fail("inconsistent block metadata", problem)
            for name in PATH_FIELDS:
                value = getattr(request, name, "")
                if call.service == "Node" and value and not value.startswith("/"):
                    fail("relative path accepted", f"{name} {value!r} accepted")
        return found

    def alive(self) -> bool:
        return self.driver.process is not None and self.driver.process.poll() is None

    def learn(self, method: str, request: Any, response: bytes) -> None:
        """Remember what a successful call made, for later requests and the clean-up."""
        world = self.world
        if method == "CreateVolume":
            volume_id = pb.CreateVolumeResponse.FromString(response).volume.volume_id
            if volume_id not in self.created_volumes:
                self.created_volumes.append(volume_id)
                if world is not None:
                    world.volumes.append(volume_id)
                    world.disposable_volumes.append(volume_id)
        elif method == "CreateSnapshot":
            snapshot_id = pb.CreateSnapshotResponse.FromString(response).snapshot.snapshot_id
            if snapshot_id not in self.created_snapshots:
                self.created_snapshots.append(snapshot_id)
                if world is not None:
                    world.snapshots.append(snapshot_id)
                    world.disposable_snapshots.append(snapshot_id)
                    if world.is_backup(snapshot_id):
                        world.backups.append(snapshot_id)
        elif method == "DeleteVolume" and world is not None and request.volume_id in world.disposable_volumes:
            world.disposable_volumes.remove(request.volume_id)
        elif method == "DeleteSnapshot" and world is not None and request.snapshot_id in world.disposable_snapshots:
            world.disposable_snapshots.remove(request.snapshot_id)
        elif method == "NodeStageVolume":
            pair = (request.volume_id, request.staging_target_path)
            if pair not in self.staged:
                self.staged.append(pair)
                if world is not None:
                    world.stages.append(pair)
        elif method == "NodePublishVolume":
            pair = (request.volume_id, request.target_path)
            if pair not in self.published:
                self.published.append(pair)
                if world is not None:
                    world.publishes.append(pair)

    # -- batches ------------------------------------------------------------------------

    def run(self, batch: fz.Batch) -> None:
        """Send a batch step by step, the calls of a step at once; a call that depends
        on the previous step takes the ID that step's call made."""
        if self.stopped:
            return
        if time.monotonic() - self.started > BUDGET:
            self.stopped = f"the budget of {BUDGET:g}s ran out after {self.batches} batches"
            return
        self.batches += 1
        made: list[str] = []
        for step in batch:
            calls = [c for c in (self.filled(c, made) for c in step) if c is not None]
            if not calls:
                continue
            if len(calls) == 1:
                outcomes = [self.call(calls[0])]
            else:
                outcomes = list(self.pool.map(lambda c: self.call(c, concurrent=True), calls))
            made = [made_id(c, o) for c, o in zip(calls, outcomes, strict=True)]
            self.check_host(tuple(calls))
            if not self.alive():
                self.stopped = "the driver died"
                self.failures.append(Failure("driver died", calls[-1].method, "", "process exited", calls[-1]))
                return
        if self.hangs >= MAX_HANGS:
            self.stopped = f"{self.hangs} calls hung"

    @staticmethod
    def filled(call: fz.Call, made: list[str]) -> fz.Call | None:
        if call.depends is None:
            return call
        if call.depends >= len(made) or not made[call.depends] or not isinstance(call.request, Message):
            return None  # what it depends on was not made
        request = type(call.request)()
        request.CopyFrom(call.request)
        name = "snapshot_id" if "snapshot_id" in request.DESCRIPTOR.fields_by_name else "volume_id"
        setattr(request, name, made[call.depends])
        return fz.Call(call.service, call.method, request)

    def check_host(self, calls: fz.Step, label: str = "") -> None:
        """Blame new strays outside the sandbox on ``calls`` (or on ``label``)."""
        rpc = label or "+".join(c.method for c in calls)
        first = calls[0] if calls else None
        for entry in self.watch.new_entries():
            self.failures.append(Failure("file made outside the sandbox", rpc, "", entry, first, len(calls) > 1))
        for target in self.watch.new_mounts():
            self.failures.append(Failure("mount outside the sandbox", rpc, "", target, first, len(calls) > 1))
        for stray in sorted(self.profile.strays() - self.strays):
            self.failures.append(Failure(STRAY, rpc, "", stray, first, len(calls) > 1))
            self.strays.add(stray)  # report each once

    # -- minimising -----------------------------------------------------------------------

    def minimise(self, failure: Failure, deadline: float) -> fz.Call | None:
        """The request of ``failure`` with every field that is not needed to show the same
        failure class cleared, and long strings cut where that keeps it."""
        call = failure.call
        if call is None or isinstance(call.request, bytes) or failure.concurrent:
            return call
        if failure.kind not in ("INTERNAL", "UNKNOWN status", "oversized error message", "relative path accepted"):
            return call
        best: Message = call.request
        tries = 0
        changed = True
        while changed and tries < SHRINK_CALLS:
            changed = False
            for candidate in smaller(best):
                if tries >= SHRINK_CALLS or time.monotonic() > deadline:
                    break
                tries += 1
                attempt = fz.Call(call.service, call.method, candidate)
                self.tried(attempt)  # what it stages or publishes is cleaned up too
                outcome = self.send(attempt)
                if outcome.code is grpc.StatusCode.OK:
                    with self.lock:
                        self.learn(call.method, candidate, outcome.response or b"")
                if any(f.key == failure.key for f in self.verdicts(attempt, outcome)):
                    best, changed = candidate, True
                    break
        return fz.Call(call.service, call.method, best)


def block_metadata_problems(request: Any, answers: list[Any]) -> list[str]:
    """What is wrong with the messages of a SnapshotMetadata stream: ranges out of order
    or overlapping (across messages too), outside the volume or before the offset asked
    for, empty; more ranges in a message than ``max_results``; a capacity that changes."""
    problems: list[str] = []
    end = request.starting_offset
    capacities = {a.volume_capacity_bytes for a in answers}
    if len(capacities) > 1:
        problems.append(f"volume_capacity_bytes changes within the stream: {sorted(capacities)}")
    for number, answer in enumerate(answers):
        if request.max_results > 0 and len(answer.block_metadata) > request.max_results:
            problems.append(
                f"message {number} has {len(answer.block_metadata)} ranges, max_results {request.max_results}"
            )
        for block in answer.block_metadata:
            where = f"range ({block.byte_offset}, {block.size_bytes}) of message {number}"
            if block.size_bytes <= 0:
                problems.append(f"{where} is empty")
            if block.byte_offset < end:
                problems.append(f"{where} begins before {end} (the offset asked for, or the previous range's end)")
            if block.byte_offset + block.size_bytes > answer.volume_capacity_bytes:
                problems.append(f"{where} ends past the volume ({answer.volume_capacity_bytes} bytes)")
            end = max(end, block.byte_offset + block.size_bytes)
    return problems[:3]


def parsed(call: fz.Call) -> Message | None:
    """The request of ``call``; raw bytes parsed, or None where they do not parse."""
    if isinstance(call.request, Message):
        return call.request
    try:
        return fz.request_class(fz.methods_by_name()[call.method]).FromString(call.request)
    except DecodeError:
        return None


def made_id(call: fz.Call, outcome: Outcome) -> str:
    """The ID of the volume or snapshot a successful create made, else ''."""
    if outcome.code is not grpc.StatusCode.OK or not outcome.response:
        return ""
    if call.method == "CreateVolume":
        return pb.CreateVolumeResponse.FromString(outcome.response).volume.volume_id
    if call.method == "CreateSnapshot":
        return pb.CreateSnapshotResponse.FromString(outcome.response).snapshot.snapshot_id
    return ""


def smaller(message: Message) -> Iterator[Message]:
    """Copies of ``message`` with one field cleared (deepest fields last), one map entry
    removed, or one long string cut."""
    for f, value in message.ListFields():
        copy = type(message)()
        copy.CopyFrom(message)
        copy.ClearField(f.name)
        yield copy
        if f.message_type is not None and f.message_type.GetOptions().map_entry and len(value) > 1:
            for key in list(value):
                copy = type(message)()
                copy.CopyFrom(message)
                del getattr(copy, f.name)[key]
                yield copy
        if f.type == FieldDescriptor.TYPE_STRING and not f.is_repeated and len(value) > 300:
            copy = type(message)()
            copy.CopyFrom(message)
            setattr(copy, f.name, value[:300])
            yield copy
        if f.message_type is not None and not f.is_repeated and not f.message_type.GetOptions().map_entry:
            for sub in smaller(value):
                copy = type(message)()
                copy.CopyFrom(message)
                getattr(copy, f.name).CopyFrom(sub)
                yield copy


# -- the world the fuzz starts from ---------------------------------------------------------


def make_world(fuzzer: Fuzzer, profile: Profile, sandbox: Path) -> fz.World:
    """Three volumes and a snapshot, made as a CO would: one staged and published on ext4,
    one staged and published as a raw block device (without block access: a filesystem
    shared by many nodes), one idle. Without a node path, ControllerPublished only."""
    sandbox.mkdir()
    (sandbox / "a-file").write_text("data the driver must not remove\n")
    (sandbox / "a-dir").mkdir()
    (sandbox / "a-dir" / "content").write_text("data\n")
    secrets = dict(profile.secrets)
    fixtures = []
    second = (
        ("block", block_capability()) if profile.block else ("shared", mount_capability("", "MULTI_NODE_MULTI_WRITER"))
    )
    for kind, cap, published in (
        ("mount", mount_capability(profile.fs_type), True),
        (*second, True),
        ("idle", mount_capability(), False),
    ):
        name = f"{fz.MARK}-fixture-{kind}"
        created = fuzzer.expect_ok(
            fz.Call(
                "Controller",
                "CreateVolume",
                pb.CreateVolumeRequest(
                    name=name,
                    capacity_range=pb.CapacityRange(required_bytes=64 * MiB),
                    volume_capabilities=[cap],
                    parameters=profile.parameters,
                    secrets=secrets,
                ),
            )
        )
        volume = created.volume  # type: ignore[attr-defined]
        publish_context: dict[str, str] = {}
        staging = target = ""
        if published:
            answer = fuzzer.expect_ok(
                fz.Call(
                    "Controller",
                    "ControllerPublishVolume",
                    pb.ControllerPublishVolumeRequest(
                        volume_id=volume.volume_id, node_id=NODE_ID, volume_capability=cap, secrets=secrets
                    ),
                )
            )
            publish_context = dict(answer.publish_context)  # type: ignore[attr-defined]
        if published and profile.node:
            staging, target = str(sandbox / f"fixture-stage-{kind}"), str(sandbox / f"fixture-target-{kind}")
            fuzzer.expect_ok(
                fz.Call(
                    "Node",
                    "NodeStageVolume",
                    pb.NodeStageVolumeRequest(
                        volume_id=volume.volume_id,
                        publish_context=publish_context,
                        staging_target_path=staging,
                        volume_capability=cap,
                        secrets=secrets,
                        volume_context=volume.volume_context,
                    ),
                )
            )
            fuzzer.expect_ok(
                fz.Call(
                    "Node",
                    "NodePublishVolume",
                    pb.NodePublishVolumeRequest(
                        volume_id=volume.volume_id,
                        publish_context=publish_context,
                        staging_target_path=staging,
                        target_path=target,
                        volume_capability=cap,
                        secrets=secrets,
                        volume_context=volume.volume_context,
                    ),
                )
            )
        fixtures.append(
            fz.Fixture(
                volume_id=volume.volume_id,
                name=name,
                capability=cap,
                volume_context=dict(volume.volume_context),
                publish_context=publish_context,
                staging_path=staging,
                target_path=target,
                capacity=volume.capacity_bytes,
                published=published,
            )
        )
    idle = fixtures[2].volume_id
    if profile.repository:
        assert profile.write_volume is not None
        profile.write_volume(idle, MiB, os.urandom(MiB))  # so that its backup has chunks to store
    if profile.snapshots:
        snapshot_id = take_snapshot(fuzzer, idle, f"{fz.MARK}-fixture-snapshot")
    else:
        # A backend without snapshots still gets requests naming one: an ID in its own
        # format (its volume's, made a snapshot's) that names nothing.
        snapshot_id = fixtures[2].volume_id.replace("vol-", "snap-")
    snapshots, pairs, backups = [snapshot_id], [], []
    if profile.repository:
        assert profile.write_volume is not None
        # Two more for SnapshotMetadata, which the deletes of the sweep (of the first
        # snapshot) leave alone, with a change in between.
        base = take_snapshot(fuzzer, idle, f"{fz.MARK}-fixture-snapshot-base")
        profile.write_volume(idle, 8 * MiB, os.urandom(MiB))
        later = take_snapshot(fuzzer, idle, f"{fz.MARK}-fixture-snapshot-later")
        pairs = [(base, later), (later, base), (later, later), (snapshot_id, later)]
        backups = [finished_backup(fuzzer, idle, f"{fz.MARK}-fixture-backup", profile.repository)]
        snapshots += [later, base, *backups]
    backend = fixtures[0].volume_id.split(":")[1]
    world = fz.World(
        backend=backend,
        node_id=NODE_ID,
        root=profile.root,
        sandbox=sandbox,
        secrets=secrets,
        parameters=dict(profile.parameters),
        fixtures=fixtures,
        snapshots=snapshots,
        kind=profile.name,
        excluded=frozenset() if profile.node else fz.NODE_PATH_RPCS,
        repository=profile.repository,
        backups=backups,
        pairs=pairs,
    )
    fuzzer.world = world
    return world


def take_snapshot(fuzzer: Fuzzer, volume_id: str, name: str) -> str:
    request = pb.CreateSnapshotRequest(source_volume_id=volume_id, name=name, secrets=fuzzer.profile.secrets)
    answer = fuzzer.expect_ok(fz.Call("Controller", "CreateSnapshot", request))
    snapshot_id: str = answer.snapshot.snapshot_id  # type: ignore[attr-defined]
    return snapshot_id


def finished_backup(fuzzer: Fuzzer, volume_id: str, name: str, repository: str) -> str:
    """A backup of the volume, asked for again (as the CO does) until it is ready."""
    request = pb.CreateSnapshotRequest(
        source_volume_id=volume_id,
        name=name,
        parameters={"type": "backup", "repository": repository},
        secrets=fuzzer.profile.secrets,
    )
    deadline = time.monotonic() + 60
    while True:
        snapshot: Any = fuzzer.expect_ok(fz.Call("Controller", "CreateSnapshot", request)).snapshot  # type: ignore[attr-defined]
        if snapshot.ready_to_use:
            return str(snapshot.snapshot_id)
        assert time.monotonic() < deadline, f"the backup {name!r} was not ready within 60 s"
        time.sleep(0.05)


# -- clean-up through the API ---------------------------------------------------------------


def clean_up(fuzzer: Fuzzer, world: fz.World | None) -> list[str]:
    """Undo through the API everything the run made; what the driver refuses to undo,
    and what is still there afterwards, is returned."""
    problems: list[str] = []
    secrets = dict(fuzzer.profile.secrets)
    fixtures = world.fixtures if world else []

    def undo(call: fz.Call, must: bool = True) -> None:
        """Send a clean-up call; one that undoes something done must succeed."""
        outcome = fuzzer.call(call)
        if must and outcome.code is not grpc.StatusCode.OK:
            problems.append(f"clean-up {describe(call)}: {outcome.code.name} {outcome.details[:300]}")

    # Every publish and stage asked for, in reverse: a failed one may have left something.
    done_publishes = {(f.volume_id, f.target_path) for f in fixtures if f.target_path} | set(fuzzer.published)
    published = [(f.volume_id, f.target_path) for f in fixtures if f.target_path] + fuzzer.tried_publishes
    for volume_id, target in reversed(list(dict.fromkeys(published))):
        unpublish = pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target)
        undo(fz.Call("Node", "NodeUnpublishVolume", unpublish), (volume_id, target) in done_publishes)
    done_stages = {(f.volume_id, f.staging_path) for f in fixtures if f.staging_path} | set(fuzzer.staged)
    staged = [(f.volume_id, f.staging_path) for f in fixtures if f.staging_path] + fuzzer.tried_stages
    for volume_id, staging in reversed(list(dict.fromkeys(staged))):
        unstage = pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging)
        undo(fz.Call("Node", "NodeUnstageVolume", unstage), (volume_id, staging) in done_stages)
    volumes = list(dict.fromkeys([*(f.volume_id for f in fixtures), *fuzzer.created_volumes, *listed_volumes(fuzzer)]))
    snapshots = list(
        dict.fromkeys([*(world.snapshots if world else []), *fuzzer.created_snapshots, *listed_snapshots(fuzzer)])
    )
    for volume_id in volumes:
        undo(
            fz.Call(
                "Controller",
                "ControllerUnpublishVolume",
                pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, secrets=secrets),
            )
        )
    profile = fuzzer.profile
    # Backups first: deleting the last backup of a volume removes the snapshot it kept.
    backups = [s for s in snapshots if profile.repository and s.split(":", 2)[1:2] == [profile.repository]]

    def delete_snapshots(ids: list[str]) -> None:
        for snapshot_id in ids:
            request = pb.DeleteSnapshotRequest(snapshot_id=snapshot_id, secrets=secrets)
            undo(fz.Call("Controller", "DeleteSnapshot", request))

    delete_snapshots(backups)
    problems += [
        f"backend snapshot {name} outlives the deletion of every backup" for name in sorted(profile.backup_snapshots())
    ]
    delete_snapshots([s for s in snapshots if s not in backups])
    for volume_id in volumes:
        undo(fz.Call("Controller", "DeleteVolume", pb.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets)))
    problems += [f"volume {v} is still listed after the clean-up" for v in listed_volumes(fuzzer)]
    problems += [f"snapshot {s} is still listed after the clean-up" for s in listed_snapshots(fuzzer)]
    if profile.repository:
        # What no manifest references goes only with a collection: run one, as an operator
        # would; whatever is left then is a leak (the test counts it with the backend's).
        try:
            print(f"gc after the clean-up: {harness.collect_garbage(profile)}")
        except AssertionError as exc:
            problems.append(str(exc))
    return problems


def listed_volumes(fuzzer: Fuzzer) -> list[str]:
    outcome = fuzzer.call(fz.Call("Controller", "ListVolumes", pb.ListVolumesRequest()))
    if outcome.code is not grpc.StatusCode.OK:
        return []
    return [e.volume.volume_id for e in pb.ListVolumesResponse.FromString(outcome.response or b"").entries]


def listed_snapshots(fuzzer: Fuzzer) -> list[str]:
    request = pb.ListSnapshotsRequest(secrets=fuzzer.profile.secrets)
    outcome = fuzzer.call(fz.Call("Controller", "ListSnapshots", request))
    if outcome.code is not grpc.StatusCode.OK:
        return []
    return [e.snapshot.snapshot_id for e in pb.ListSnapshotsResponse.FromString(outcome.response or b"").entries]


# -- the test ---------------------------------------------------------------------------------


def fuzz(fuzzer: Fuzzer, world: fz.World, seed: int) -> int:
    """The sweep, then EXAMPLES seeded batches; returns how many sweep calls there were."""
    pools = fz.Pools(world)
    sweep = fz.sweep(world, pools)

    @settings(
        max_examples=EXAMPLES,
        database=None,
        deadline=None,
        derandomize=False,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        print_blob=False,
    )
    @hypothesis.seed(seed)
    @given(fz.batches(world, pools))
    def batches(batch: fz.Batch) -> None:
        fuzzer.run(batch)

    for call in reversed(sweep):
        batches = example(((call,),))(batches)
    batches()
    return len(sweep)


def distinct(failures: list[Failure]) -> dict[tuple[str, str, str, str], Failure]:
    """One failure per class: the one with the smallest request."""
    classes: dict[tuple[str, str, str, str], Failure] = {}
    for failure in failures:
        held = classes.get(failure.key)
        if held is None or (failure.call and held.call and size(failure.call) < size(held.call)):
            classes[failure.key] = failure
    return classes


@contextmanager
def thawed(root: Path) -> Iterator[None]:
    try:
        yield
    finally:
        harness.thaw(harness.frozen_filesystems(root))


def test_fuzz_every_rpc(profile: Profile) -> None:
    seed = harness.seed(f"fuzz[{profile.name}]")
    sandbox = profile.root / "sandbox"
    before = HostState.now()
    objects_before = profile.backend_objects()
    started = time.monotonic()
    problems: list[str] = []
    reproducers: dict[tuple[str, str, str, str], fz.Call | None] = {}
    with thawed(profile.root), profile.driver() as driver:
        assert driver.process is not None
        watch = Watch(profile, sandbox, Path(os.readlink(f"/proc/{driver.process.pid}/cwd")))
        fuzzer = Fuzzer(driver, profile, watch)
        world = None
        try:
            world = make_world(fuzzer, profile, sandbox)
            fuzz_started, set_up_requests = time.monotonic(), sum(fuzzer.counts.values())
            swept = fuzz(fuzzer, world, seed)
            fuzz_seconds = time.monotonic() - fuzz_started
            fuzz_requests = sum(fuzzer.counts.values()) - set_up_requests
            if fuzzer.alive():
                probe = fuzzer.call(fz.Call("Identity", "Probe", pb.ProbeRequest()))
                if probe.code is not grpc.StatusCode.OK:
                    problems.append(f"Probe after the fuzz: {probe.code.name} {probe.details}")
            if fuzzer.alive():
                deadline = time.monotonic() + SHRINK_BUDGET
                reproducers = {key: fuzzer.minimise(f, deadline) for key, f in distinct(fuzzer.failures).items()}
        finally:
            if fuzzer.alive():
                problems += clean_up(fuzzer, world)
            fuzzer.check_host((), "the clean-up")
            fuzzer.pool.shutdown()
        problems += [f"left on the host: {item}" for item in harness.host_leftovers(profile.root)]
        problems += [f"host changed: {change}" for change in watch.host_changes(before, fuzzer.uuids())]
        leaked = profile.backend_objects() - objects_before
        problems += [f"left in the backend: {item}" for item in sorted(leaked)]
        if not fuzzer.alive():
            problems.append("the driver is not running after the fuzz")
        else:
            probe = fuzzer.call(fz.Call("Identity", "Probe", pb.ProbeRequest()))
            if probe.code is not grpc.StatusCode.OK:
                problems.append(f"Probe after the clean-up: {probe.code.name} {probe.details}")
        scrub(profile.root)
        remove_strays(watch)
        subprocess.run(["rm", "-rf", "--one-file-system", str(sandbox)], check=False)
        if not fuzzer.alive():
            driver.process = None  # it died: nothing to stop, and its socket is left over
            driver.socket.unlink(missing_ok=True)
    total = sum(fuzzer.counts.values())
    print(
        f"fuzz[{profile.name}]: {swept} sweep calls and {fuzzer.batches - swept} batches, {fuzz_requests} requests "
        f"in {fuzz_seconds:.1f}s; {total} requests and {time.monotonic() - started:.1f}s with set-up and clean-up"
    )
    print("requests per RPC: " + ", ".join(f"{m} {n}" for m, n in sorted(fuzzer.counts.items())))
    answers = Counter[str]()
    for (_, code), n in fuzzer.codes.items():
        answers[code] += n
    print("answers: " + ", ".join(f"{code} {n}" for code, n in answers.most_common()))
    excluded = world.excluded if world else frozenset()
    if excluded:
        print(f"fuzz[{profile.name}] sends no {', '.join(sorted(excluded))}: {profile.node_missing}")
    missing = [m.name for _, m in fz.methods() if not fuzzer.counts[m.name] and m.name not in excluded]
    if missing:
        problems.append(f"RPCs the fuzz never reached: {', '.join(missing)}")
    if fuzzer.stopped:
        print(f"fuzz[{profile.name}] stopped early: {fuzzer.stopped}")
    classes = distinct(fuzzer.failures)  # with those the clean-up found
    report = [
        f"{failure.kind}: {failure.rpc} -> {failure.code} {failure.message[:300]!r}"
        + (" (in a concurrent batch)" if failure.concurrent else "")
        + (f"\n    request: {describe(reproducers.get(key) or failure.call)}" if failure.call else "")
        for key, failure in sorted(classes.items())
    ]
    assert not (report or problems), (
        f"fuzz[{profile.name}] (replay with {harness.SEED_VARIABLE}={seed}): {len(classes)} failure classes, "
        f"{len(problems)} problems\n" + "\n".join(report + problems)
    )


# -- defects the fuzz found, pinned -------------------------------------------------------


def test_an_rbd_volume_made_under_a_huge_name_is_refused_or_deletable(
    ceph: CephCluster, clean_pool: None, tmp_path: Path
) -> None:
    """Either CreateVolume refuses the name (INVALID_ARGUMENT), or the volume it makes
    can be deleted again."""
    profile = harness.rbd_profile(tmp_path, ceph)
    request = pb.CreateVolumeRequest(
        name=fz.HUGE,
        capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[mount_capability()],
        secrets=profile.secrets,
    )
    with profile.driver() as driver:
        try:
            volume = driver.controller.CreateVolume(request, timeout=60).volume
        except grpc.RpcError as exc:
            refused: Any = exc
            assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.details()
            return
        try:
            delete = pb.DeleteVolumeRequest(volume_id=volume.volume_id, secrets=profile.secrets)
            driver.controller.DeleteVolume(delete, timeout=60)
            assert profile.backend_objects() == set()
        finally:
            # What the driver could not delete goes by hand, so the pool is left clean.
            for image in ceph.rbd("ls", POOL).split():
                ceph.rbd("rm", f"{POOL}/{image}")
            with contextlib.suppress(RuntimeError):
                ceph._run("rados", "-c", str(ceph.conf), "-p", POOL, "rm", "cairn.journal")
