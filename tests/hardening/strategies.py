"""Hypothesis strategies for the CSI fuzzer: requests for every RPC of the Identity,
Controller, Node and SnapshotMetadata services, built from the protobuf descriptors.

A request starts valid and coherent (the IDs, paths, capabilities and contexts of volumes
that really exist in the running driver), then a few of its fields, found by walking the
request's descriptor, are replaced or cleared. Each field draws from a pool chosen by its
name and type: mostly valid pieces, the hostile values of ``HOSTILE_*`` (empty, NUL bytes,
a 1 MiB string, out-of-range enums, relative, too long, too deep or escaping paths, extreme
sizes, unparseable quoting) and a little random text. The same hostile values also make
``sweep``: one call per RPC, field and hostile value, run before anything random.

Every path a request may name lies in the sandbox, names something under the test's
root, is relative to the driver's working directory, or ends in ``MARK``: nothing the
fuzzer sends can name a mount point or directory of the host outside the test.

On the nfs backend, StorageClass parameters also name paths on the export (``subDir``
templates, and the claim's names they expand): ``nfs_parameters`` adds attempts to leave
the profile's folder (``..``, absolute paths, NUL, overlong names, the driver's own
folder), and valid variants that all stay inside that folder, so anything the driver
makes elsewhere on the export is a stray. RPCs a profile cannot serve on this host
(``World.excluded``: the node path where the node's kernel client is missing) are
neither swept nor drawn.

Where the profile has a backup repository (``World.repository``), CreateSnapshot also
asks for backups (the VolumeSnapshotClass parameters ``type: backup`` and ``repository``),
valid and hostile (an unknown repository, a type without a repository and the reverse,
extra keys); CreateVolume restores backups (a content source naming one); snapshot IDs,
content sources and the SnapshotMetadata requests draw from the world's backend snapshots
and backups alike, and races start backups and delete them while they run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from csi.generated import csi_pb2 as pb
from csi.model import TOPOLOGY_NODE_KEY

T = TypeVar("T")

MARK = "cairn-fuzz"
"""In every name and path the fuzzer makes up, so strays are easy to find and remove."""
HUGE = "x" * (1 << 20)
MISSING_UUID = "00000000-0000-5000-8000-000000000000"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SERVICES = ("Identity", "Controller", "Node", "SnapshotMetadata")
MiB = 1 << 20
INT64_MAX = (1 << 63) - 1
INT32_MAX = (1 << 31) - 1

HOSTILE_TEXT: tuple[str, ...] = (
    "",
    "\0",
    "a\0b",
    HUGE,
    "\ufffd\ufffe\uffff",
    "\u202etxt.exe",
    "\U0001f4a5" * 64,
    "\x1b[2J\x07",
    "\n\r\t ",
    "%s%n%x{0}{}",
    f"$(touch /tmp/{MARK}-shell)",
    f"`touch /tmp/{MARK}-shell`; true",
    "é" * 200,
    "a" * 4097,
)
HOSTILE_MODES = (99, -1, 8, INT32_MAX, -(1 << 31))
CAPACITIES = (0, 1, 4096, MiB, 64 * MiB, 300 * MiB, 1 << 30)
HOSTILE_CAPACITIES = (-1, -(1 << 63), 1 << 40, 1 << 45, 1 << 62, INT64_MAX, INT64_MAX - MiB + 2)
HOSTILE_MAX_ENTRIES = (-1, INT32_MAX, -(1 << 31))
HOSTILE_OFFSETS = (-1, -(1 << 63), 64 * MiB + 1, 1 << 40, INT64_MAX, INT64_MAX - 4095)
HOSTILE_FS_TYPES = ("ntfs", "EXT4", "ext3", "btrfs", "ext4\0", "../ext4", "ext4 ", HUGE)
MOUNT_FLAGS: tuple[tuple[str, ...], ...] = ((), ("noatime",), ("nosuid", "nodev"), ("discard",), ("sync",))
HOSTILE_MOUNT_FLAGS: tuple[tuple[str, ...], ...] = (
    ("uid=0",),
    ("bind",),
    ("remount",),
    ("loop",),
    ("a,b,,c",),
    ("\0",),
    ("", ""),
    ("rw", "ro"),
    ("noexec,suid",),
    ("x" * 5000,),
    (HUGE,),
    ("context=system_u:object_r:tmp_t:s0",),
)
MKFS_OPTIONS = ("", "-m 0", "-i 65536", "-O ^metadata_csum", "-L fuzz")
HOSTILE_MKFS_OPTIONS = (
    '"unterminated',
    "'",
    "\\",
    "-b 3",
    "-T nosuchtype",
    "--nonsense",
    "-N -1",
    "-E",
    "-L " + "l" * 300,
    "-q\0",
    f"$(touch /tmp/{MARK}-mkfs)",
    f"; touch /tmp/{MARK}-mkfs",
    HUGE,
)
TOKENS = ("", "after:")
HOSTILE_TOKENS = ("garbage", "after:\uffff", "before:x", "after:" + HUGE, HUGE, "\0", "after:\0")
MAPPERS = ("rbd-fuse", "krbd", "rbd-nbd")
NODE_PATH_RPCS = frozenset({"NodeStageVolume", "NodePublishVolume"})
"""The node RPCs that mount (NodeStage) or need what a stage mounted (NodePublish): not
fuzzed on a profile without a node path. The other node RPCs still are: they mount
nothing, and check the requests and IDs of that backend's volumes like any other."""
HOSTILE_PUBLISH_VALUES = {
    "mapper": ("nbd", "", "RBD-FUSE", HUGE, "\0"),
    "mapOptions": ("a,b,=,", "ms_mode=nonsense", HUGE, "\0"),
    "monitors": ("127.0.0.1:1", "", HUGE, "\0"),
    "pool": ("nosuchpool", "", "../cairn", HUGE),
    "image": (f"/tmp/{MARK}-image", "cairn-vol-" + MISSING_UUID, HUGE),
    "user": ("nobody", "", HUGE),
}


@dataclass(frozen=True)
class Fixture:
    """A volume the test made through the API before fuzzing, with what a CO would send
    for it: its capability and contexts, and (when staged) its staging and target paths."""

    volume_id: str
    name: str
    capability: pb.VolumeCapability
    volume_context: dict[str, str]
    publish_context: dict[str, str]
    staging_path: str
    target_path: str
    capacity: int
    published: bool = False
    """ControllerPublished to the node (the staged ones are, and on a profile without a
    node path, those that would have been)."""


@dataclass
class World:
    """The valid pieces: what exists in the running driver, and the sandbox. The lists
    grow as the fuzzer learns IDs and paths from successful calls; strategies index them
    when they draw, so later requests use what earlier ones made."""

    backend: str
    node_id: str
    root: Path
    """The test's root (the sandbox's parent)."""
    sandbox: Path
    secrets: dict[str, str]
    parameters: dict[str, str]
    fixtures: list[Fixture]
    snapshots: list[str]
    volumes: list[str] = field(default_factory=list)
    disposable_volumes: list[str] = field(default_factory=list)
    disposable_snapshots: list[str] = field(default_factory=list)
    stages: list[tuple[str, str]] = field(default_factory=list)
    publishes: list[tuple[str, str]] = field(default_factory=list)
    kind: str = ""
    """The profile's backend kind (local, rbd, nfs)."""
    excluded: frozenset[str] = frozenset()
    """RPCs not fuzzed (see ``NODE_PATH_RPCS``)."""
    repository: str = ""
    """The backup repository of the driver config ("" for none)."""
    backups: list[str] = field(default_factory=list)
    """Backup IDs (snapshots of the repository): made before the fuzz, and learned."""
    pairs: list[tuple[str, str]] = field(default_factory=list)
    """Two backend snapshots of one volume (base, target), for GetMetadataDelta."""

    def __post_init__(self) -> None:
        self.volumes.extend(f.volume_id for f in self.fixtures if f.volume_id not in self.volumes)

    def is_backup(self, snapshot_id: str) -> bool:
        return bool(self.repository) and snapshot_id.split(":", 2)[1:2] == [self.repository]

    def backup_parameters(self) -> dict[str, str]:
        """What a VolumeSnapshotClass of type backup sends."""
        return {"type": "backup", "repository": self.repository or "nosuch"}

    # -- the fixed pools, derived from the fixtures ------------------------------------

    def hostile_volume_ids(self) -> list[str]:
        return [*_hostile_ids(self.fixtures[0].volume_id), *HOSTILE_TEXT[:4]]

    def hostile_snapshot_ids(self) -> list[str]:
        return [*_hostile_ids(self.snapshots[0]), *self.hostile_backup_ids(), *HOSTILE_TEXT[:4]]

    def hostile_backup_ids(self) -> list[str]:
        """IDs in the repository's name: missing, and local IDs that no backup can have
        (the repository's own keys and folders, path tricks, overlong)."""
        if not self.repository:
            return []
        prefix = f"1:{self.repository}:"
        real = self.backups[0] if self.backups else prefix + "b-" + "0" * 40
        return [
            prefix + "b-" + "0" * 40,
            prefix + "config",
            prefix + "..",
            prefix + "../config",
            prefix + "pending",
            prefix + "chunks/00",
            real + "/../" + real.rsplit(":", 1)[1],
            real[:-1],
            prefix + "b" * 250,
            f"1:{self.backend}:" + real.rsplit(":", 1)[1],
        ]

    def fresh_staging_paths(self) -> list[str]:
        return [str(self.sandbox / f"stage-{i}") for i in range(3)]

    def fresh_target_paths(self) -> list[str]:
        return [str(self.sandbox / f"target-{i}") for i in range(3)] + [str(self.sandbox / "pods" / "a" / "mount")]

    def hostile_paths(self) -> list[str]:
        sandbox = str(self.sandbox)
        depth = len(self.sandbox.parts) - 1
        return [
            "",
            f"{MARK}-relative/path",
            f"./{MARK}-relative",
            sandbox + "/" + "n" * 300,
            sandbox + "/d" * 2000,
            sandbox + ("/" + "p" * 200) * 25,
            sandbox + "/nul\0byte",
            sandbox + f"/../{MARK}-escape",
            sandbox + "/.." * depth + f"/tmp/{MARK}-escape",
            sandbox + "//stage-0//",
            sandbox + "/./stage-1/../stage-1",
            str(self.sandbox / "a-file"),
            str(self.sandbox / "a-file" / "below"),
            str(self.sandbox / "a-dir"),
            sandbox + "/" + HUGE,
            sandbox + "/\u202e\ufffd é",
        ]

    def folder(self) -> str:
        """Where the profile puts volumes on the export (nfs): the folder of the first
        fixture's ``subDir``."""
        return self.fixtures[0].volume_context.get("subDir", "").rpartition("/")[0]


HOSTILE_PATH_NAMES = ("..", ".", f"../{MARK}", "./..")
"""Request names that a ``subDir`` template turns into path components (nfs)."""
PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
PV_NAME = "csi.storage.k8s.io/pv/name"


def nfs_parameters(folder: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """StorageClass parameters of the nfs backend, valid and hostile, for a profile whose
    volumes go in ``folder`` on the export. Valid ones keep every volume one folder deep
    in ``folder`` (so each delete leaves nothing there); hostile ones try to leave it:
    ``..`` (in the template, or in a claim's name it expands), absolute paths, empty and
    ``.`` components, NUL, names over NAME_MAX, paths over PATH_MAX, the driver's own
    folder, unknown or broken variables; and broken modes, options and delete policies."""
    pv = "${pv.metadata.name}"
    valid = [
        {"subDir": f"{folder}/other-{pv}"},
        {"subDir": f"{folder}/${{pvc.metadata.namespace}}-{pv}", PVC_NAMESPACE: "ns"},
        {"subDir": f"{folder}/${{pvc.metadata.name}}-{pv}", PVC_NAME: "claim"},
        {"mountPermissions": "0750"},
        {"mountOptions": "nfsvers=4.1,hard,noatime"},
        {"onDelete": "delete"},
    ]
    sub_dirs = [
        "",
        " ",
        ".",
        "..",
        "/",
        "\0",
        f"{folder}/..",
        f"{folder}/../{MARK}-escape",
        f"{folder}/../../{MARK}-escape/{pv}",
        f"{folder}/{pv}/..",
        f"{folder}/{pv}/../../{MARK}-escape",
        f"{folder}/./{pv}",
        f"{folder}//{pv}",
        f"{folder}/{pv}/",
        f"../{MARK}-escape/{pv}",
        f"/{MARK}-absolute/{pv}",
        f"/tmp/{MARK}-absolute",
        f"{folder}/a\0b/{pv}",
        f"{folder}/" + "n" * 256,
        f"{folder}/{pv}-" + "n" * 250,
        f"{folder}/" + "/".join(["d"] * 600),
        f"{folder}/" + HUGE,
        f".cairn/{pv}",
        f".cairn/nfs/volumes/{pv}",
        f".cairn/nfs/../../{MARK}-escape",
        f"{folder}/${{nosuch}}",
        f"{folder}/${{}}",
        f"{folder}/${{pvc.metadata.name}}",  # a claim's name the request does not carry
    ]
    hostile = [{"subDir": value} for value in sub_dirs] + [
        {PV_NAME: ".."},
        {PV_NAME: "."},
        {PV_NAME: f"../{MARK}-escape"},
        {PV_NAME: "\0"},
        {PV_NAME: "n" * 300},
        {"subDir": f"{folder}/${{pvc.metadata.name}}/{MARK}-escape", PVC_NAME: ".."},
        {"subDir": f"{folder}/${{pvc.metadata.name}}", PVC_NAME: "../.."},
        {"subDir": f"{folder}/${{pvc.metadata.namespace}}/{pv}", PVC_NAMESPACE: "/etc"},
        {"subDir": f"{folder}/${{pvc.metadata.namespace}}-{pv}", PVC_NAMESPACE: HUGE},
        {"mountPermissions": "8888"},
        {"mountPermissions": "-1"},
        {"mountPermissions": "77777"},
        {"mountPermissions": "0x1ff"},
        {"mountPermissions": ""},
        {"mountPermissions": "\0"},
        {"mountOptions": "nfsvers=4.1 hard"},
        {"mountOptions": "hard\0"},
        {"mountOptions": HUGE + " x"},
        {"onDelete": "nuke"},
        {"onDelete": ""},
        {"onDelete": "retain\0"},
        {"onDelete": "DELETE"},
    ]
    return valid, hostile


def quick(secrets: dict[str, str], valid: dict[str, str]) -> dict[str, str]:
    """``secrets``, or when it holds a complete credential other than ``valid``, half of
    it: refused at once rather than after the Ceph client's connect timeout."""
    user, key = secrets.get("userID", ""), secrets.get("userKey", "")
    if user and key and (user, key) != (valid.get("userID"), valid.get("userKey")):
        return {k: v for k, v in secrets.items() if k != "userKey"}
    return secrets


def _hostile_ids(real: str) -> list[str]:
    """Variations of a real ID: well-formed but missing, foreign backend or version,
    and malformed."""
    version, backend, local = real.split(":", 2)
    missing = _UUID.sub(MISSING_UUID, real)
    ids = [
        missing,
        f"{version}:nosuch:{local}",
        f"2:{backend}:{local}",
        real + "\0",
        real.upper(),
        real[:-1],
        f"{version}:{backend}:" + "v" * 120,
        f"{version}:{backend}:{local}/../{local}",
        f"{version}:{backend}:" + HUGE,
    ]
    if "/" in local:
        ids.append(f"{version}:{backend}:nosuchpool/{local.split('/', 1)[1]}")
    return ids


# -- small helpers ------------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of ``choices``, each drawn about as often as its weight says (Hypothesis's
    integers are not uniform, and need not be)."""
    branches = [s for weight, s in choices for _ in range(weight)]
    return st.integers(0, len(branches) - 1).flatmap(lambda i: branches[i])


def live(pool: Callable[[], Sequence[T]], fallback: Sequence[T]) -> st.SearchStrategy[T]:
    """An element of a list that grows while the fuzzer runs, read when drawn."""

    def pick(i: int) -> T:
        items = pool() or fallback
        return items[i % len(items)]

    return st.integers(0, 1 << 16).map(pick)


def text() -> st.SearchStrategy[str]:
    return st.text(max_size=24)


def mixed(valid: st.SearchStrategy[T], hostile: Sequence[T], random: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Mostly ``valid``, often a known hostile value, sometimes something random."""
    return weighted((6, valid), (3, st.sampled_from(list(hostile))), (1, random))


# -- field pools --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """What one kind of field takes: a strategy, and the hostile values the sweep tries."""

    strategy: st.SearchStrategy[Any]
    hostile: Sequence[Any]


def capability(
    access: str, mode: int | None, fs_type: str = "", flags: Iterable[str] = (), group: str = ""
) -> pb.VolumeCapability:
    """A capability with raw values: ``mode`` is set as a number, so out-of-range modes
    travel as they are (None: no access_mode at all); ``access`` is "mount", "block" or
    "" (neither)."""
    cap = pb.VolumeCapability()
    if access == "mount":
        cap.mount.fs_type = fs_type
        cap.mount.mount_flags.extend(flags)
        cap.mount.volume_mount_group = group
        cap.mount.SetInParent()
    elif access == "block":
        cap.block.SetInParent()
    if mode is not None:
        cap.access_mode.mode = mode  # type: ignore[assignment]
    return cap


HOSTILE_CAPABILITIES: tuple[pb.VolumeCapability, ...] = (
    capability("mount", 99),
    capability("block", -1),
    capability("mount", 8, "ext4"),
    capability("mount", 0),
    capability("mount", None, "ext4"),
    capability("", 1),
    capability("mount", 1, "ntfs"),
    capability("mount", 1, "ext4", ["uid=0"]),
    capability("mount", 1, "", [HUGE]),
    capability("mount", 3),
    capability("mount", 5, "xfs"),
    capability("mount", 1, "", [], "\0"),
)


class Pools:
    """The pool for each field of every request, by field name and type."""

    def __init__(self, world: World) -> None:
        self.world = world
        w = world
        volume_ids = live(lambda: w.volumes, [f.volume_id for f in w.fixtures])
        snapshot_ids = live(lambda: w.snapshots, w.snapshots)
        self.volume_id = Pool(mixed(volume_ids, w.hostile_volume_ids(), text()), w.hostile_volume_ids())
        self.snapshot_id = Pool(mixed(snapshot_ids, w.hostile_snapshot_ids(), text()), w.hostile_snapshot_ids())
        names = [*(f.name for f in w.fixtures), *(f"{MARK}-{i}" for i in range(6))]
        hostile_names = HOSTILE_TEXT + (HOSTILE_PATH_NAMES if w.kind == "nfs" else ())
        self.name = Pool(mixed(st.sampled_from(names), hostile_names, text()), HOSTILE_TEXT[:4])
        self.node_id = Pool(
            mixed(st.just(w.node_id), ["other-node", *HOSTILE_TEXT], text()), ["other-node", "", "\0", HUGE]
        )
        hostile_paths = w.hostile_paths()
        staging = [f.staging_path for f in w.fixtures if f.staging_path] + w.fresh_staging_paths()
        targets = [f.target_path for f in w.fixtures if f.target_path] + w.fresh_target_paths()
        self.staging_path = Pool(
            mixed(st.sampled_from(staging) | live(lambda: [p for _, p in w.stages], staging), hostile_paths, text()),
            hostile_paths,
        )
        self.target_path = Pool(
            mixed(st.sampled_from(targets) | live(lambda: [p for _, p in w.publishes], targets), hostile_paths, text()),
            hostile_paths,
        )
        self.volume_path = Pool(mixed(st.sampled_from(staging + targets), hostile_paths, text()), hostile_paths)
        self.token = Pool(
            mixed(st.sampled_from(TOKENS) | volume_ids.map(lambda i: "after:" + i), HOSTILE_TOKENS, text()),
            HOSTILE_TOKENS[:3],
        )
        self.fs_type = Pool(mixed(st.sampled_from(["", "ext4", "xfs"]), HOSTILE_FS_TYPES, text()), HOSTILE_FS_TYPES[:3])
        self.mount_flags = Pool(
            mixed(st.sampled_from(MOUNT_FLAGS), HOSTILE_MOUNT_FLAGS, st.lists(text(), max_size=3).map(tuple)),
            HOSTILE_MOUNT_FLAGS[:3],
        )
        self.text = Pool(mixed(text(), HOSTILE_TEXT, text()), HOSTILE_TEXT[1:4])
        self.capacity = Pool(
            mixed(st.sampled_from(CAPACITIES), HOSTILE_CAPACITIES, st.integers(-(1 << 63), INT64_MAX)),
            HOSTILE_CAPACITIES[:6],
        )
        self.max_entries = Pool(
            mixed(st.sampled_from([0, 1, 2, 3]), HOSTILE_MAX_ENTRIES, st.integers(-(1 << 31), INT32_MAX)),
            HOSTILE_MAX_ENTRIES,
        )
        self.mode = Pool(mixed(st.integers(1, 7), HOSTILE_MODES, st.integers(-(1 << 31), INT32_MAX)), (99, -1, 8))
        self.boolean = Pool(st.booleans(), [True])
        self.capability = Pool(self._capabilities(), HOSTILE_CAPABILITIES[:6])
        self.capabilities = Pool(
            weighted(
                (6, self.capability.strategy.map(lambda c: [c])),
                (2, st.lists(self.capability.strategy, max_size=3)),
                (1, self.capability.strategy.map(lambda c: [c] * 64)),
            ),
            [[], [HOSTILE_CAPABILITIES[0]], [capability("mount", 1, "ext4"), HOSTILE_CAPABILITIES[2]]],
        )
        self.secrets = self._secrets()
        self.parameters = self._parameters()
        self.mutable_parameters = Pool(
            weighted((1, st.just({"iops": "100"})), (1, self.generic_map_strategy())), [{"": ""}, {"k": HUGE}]
        )
        self.volume_context = self._volume_context()
        self.publish_context = self._publish_context()
        self.segments = self._segments()
        self.topologies = Pool(
            st.lists(self.segments.strategy.map(lambda s: pb.Topology(segments=s)), max_size=3),
            [[pb.Topology(segments=s)] for s in self.segments.hostile],
        )
        self.topology = Pool(
            self.segments.strategy.map(lambda s: pb.Topology(segments=s)),
            [pb.Topology(segments=s) for s in self.segments.hostile],
        )
        self.offset = Pool(
            mixed(
                st.sampled_from([0, 4096, MiB, 8 * MiB, 64 * MiB]), HOSTILE_OFFSETS, st.integers(-(1 << 63), INT64_MAX)
            ),
            HOSTILE_OFFSETS,
        )
        self.snapshot_parameters = self._snapshot_parameters()
        self.content_source = self._content_source()
        self.generic_map = Pool(
            st.dictionaries(text(), text(), max_size=3), [{"": ""}, {"k": HUGE}, {HUGE: "v"}, {"\0": "\0"}]
        )

    def _capabilities(self) -> st.SearchStrategy[pb.VolumeCapability]:
        real = [f.capability for f in self.world.fixtures] + [
            capability("mount", 1, "xfs"),
            capability("mount", 7, "ext4"),
            capability("mount", 6),
            capability("block", 5),
            capability("mount", 2, "ext4", ["ro"]),
        ]
        built = st.builds(
            capability,
            st.sampled_from(["mount", "mount", "block", ""]),
            self.mode.strategy,
            self.fs_type.strategy,
            self.mount_flags.strategy,
            st.sampled_from(["", "", "1000", "root", "\0", HUGE]),
        )
        return weighted((5, st.sampled_from(real)), (2, st.sampled_from(HOSTILE_CAPABILITIES)), (3, built))

    def _secrets(self) -> Pool:
        """Valid secrets, none, half a credential, odd extra keys, NUL and 1 MiB values.
        Where the backend takes credentials, a complete credential other than the valid
        one is left out: the Ceph client retries a refused key until its 30 s connect
        timeout, so each would cost half a minute (``quick`` makes it half a one)."""
        valid = self.world.secrets
        user = valid.get("userID", "admin")
        hostile = [
            {},
            {"userID": user},
            {"userKey": "AQBfuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzzA=="},
            {**valid, "userKey": "not base64 at all!"},
            {**valid, "userKey": ""},
            {**valid, "userKey": "\0"},
            {**valid, "userID": HUGE},
            {**valid, "extra": HUGE},
            {**valid, "\0": "\0"},
            {"userID": "", "userKey": ""},
        ]
        random = st.dictionaries(st.sampled_from(["userID", "userKey", "x"]), text(), max_size=2).map(
            lambda d: {**valid, **d} if "userID" in d or "userKey" in d else d
        )
        if valid:
            hostile = [quick(h, valid) for h in hostile]
            random = random.map(lambda d: quick(d, valid))
        unique = list({tuple(sorted(h.items())): h for h in hostile}.values())
        return Pool(weighted((7, st.just(valid)), (2, st.sampled_from(unique)), (1, random)), unique)

    def _parameters(self) -> Pool:
        base = self.world.parameters
        additions: list[dict[str, str]] = [
            {},
            {"fsType": "ext4"},
            {"fsType": "xfs"},
            {"mkfsOptions": "-m 0"},
            {"csi.storage.k8s.io/pvc/name": "claim"},
        ]
        if self.world.backend == "local":
            additions.append({"preallocate": "false"})
        elif self.world.kind == "nfs":
            additions += nfs_parameters(self.world.folder())[0]
        else:
            additions += [{"mapper": m} for m in MAPPERS] + [{"imageFeatures": "layering"}]
        hostile: list[dict[str, str]] = [
            {"fsType": "ntfs"},
            {"mkfsOptions": '"unterminated'},
            {"mkfsOptions": HUGE},
            {"nonsense": "1"},
            {"backend": "nosuch"},
            {"backend": self.world.backend, "group": "g"},
            {"group": "nosuch"},
            {"preallocate": "maybe"},
            {"pool": "nosuchpool"},
            {"pool": "../x"},
            {"imageFeatures": "bogus"},
            {"imageFeatures": ""},
            {"dataPool": "nosuch"},
            {"mapper": "nbd"},
            {"mapOptions": HUGE},
            {"": ""},
            {HUGE: "v"},
            {"fsType": "\0"},
        ]
        random = st.dictionaries(st.sampled_from(["fsType", "mkfsOptions", "pool", "mapper", "x"]), text(), max_size=2)
        if self.world.kind == "nfs":
            folder = self.world.folder()
            hostile += nfs_parameters(folder)[1]
            # Random values of its parameters; a random subDir stays one folder inside the
            # profile's (a random path could make folders that outlive their volume).
            one_name = st.text(st.characters(exclude_characters="/"), min_size=1, max_size=24)
            random = random | st.fixed_dictionaries(
                {},
                optional={
                    "subDir": one_name.map(lambda name: f"{folder}/{name}"),
                    "onDelete": text(),
                    "mountOptions": text(),
                    "mountPermissions": text(),
                },
            )
        strategy = weighted(
            (6, st.sampled_from(additions)), (3, st.sampled_from(hostile)), (1, random | self.generic_map_strategy())
        ).map(lambda extra: {**base, **extra})
        return Pool(strategy, [{**base, **h} for h in hostile])

    @staticmethod
    def generic_map_strategy() -> st.SearchStrategy[dict[str, str]]:
        return st.dictionaries(text(), text(), max_size=3)

    def _volume_context(self) -> Pool:
        real = [f.volume_context for f in self.world.fixtures]
        hostile: list[dict[str, str]] = [
            {"fsType": "ntfs"},
            {"fsType": ""},
            *({"mkfsOptions": o} for o in HOSTILE_MKFS_OPTIONS),
            {"fsType": "xfs", "mkfsOptions": "-m crc=2"},
            {"mapper": "nbd"},
            {HUGE: HUGE[:100]},
        ]
        if self.world.kind == "nfs":
            hostile += [{"subDir": p} for p in ("..", f"../{MARK}", f"/tmp/{MARK}", ".cairn/nfs", "a\0b", HUGE)]
        built = st.fixed_dictionaries(
            {}, optional={"fsType": self.fs_type.strategy, "mkfsOptions": st.sampled_from(MKFS_OPTIONS) | text()}
        )
        return Pool(weighted((6, st.sampled_from(real)), (3, st.sampled_from(hostile)), (1, built)), hostile)

    def _publish_context(self) -> Pool:
        real = [f.publish_context for f in self.world.fixtures]
        overrides = [(k, v) for k, values in HOSTILE_PUBLISH_VALUES.items() for v in values]
        hostile = [{**real[0], k: v} for k, v in overrides] + [{}]
        random = st.tuples(st.sampled_from(real), st.sampled_from(sorted(HOSTILE_PUBLISH_VALUES)), text()).map(
            lambda t: {**t[0], t[1]: t[2]}
        )
        return Pool(weighted((6, st.sampled_from(real)), (3, st.sampled_from(hostile)), (1, random)), hostile[::4])

    def _segments(self) -> Pool:
        valid = [{TOPOLOGY_NODE_KEY: self.world.node_id}, {}]
        hostile = [
            {TOPOLOGY_NODE_KEY: "other-node"},
            {"nonsense": "x"},
            {TOPOLOGY_NODE_KEY: HUGE},
            {HUGE: "x"},
            {TOPOLOGY_NODE_KEY: "\0"},
        ]
        return Pool(mixed(st.sampled_from(valid), hostile, self.generic_map_strategy()), hostile)

    def _snapshot_parameters(self) -> Pool:
        """VolumeSnapshotClass parameters: none, a backup into the repository; hostile:
        an unknown repository, a type without a repository and a repository without a
        type, a backend's name as the repository, unknown types and keys."""
        w = self.world
        repository = w.repository or "nosuch"
        valid = [{}, {"type": "snapshot"}, w.backup_parameters()]
        hostile: list[dict[str, str]] = [
            {"type": "backup", "repository": "nosuch"},
            {"type": "backup"},
            {"repository": repository},
            {"type": "snapshot", "repository": repository},
            {"type": "backup", "repository": ""},
            {"type": "backup", "repository": w.backend},
            {"type": "backup", "repository": "../" + repository},
            {"type": "backup", "repository": repository + "\0"},
            {"type": "backup", "repository": HUGE},
            {"type": "BACKUP", "repository": repository},
            {"type": "tape"},
            {"type": ""},
            {"type": "backup", "repository": repository, "nonsense": "1"},
            {"type": "backup", "repository": repository, "pool": "../x"},
            {HUGE: "v"},
        ]
        random = st.dictionaries(st.sampled_from(["type", "repository", "x"]), text(), max_size=2)
        return Pool(weighted((6, st.sampled_from(valid)), (3, st.sampled_from(hostile)), (1, random)), hostile)

    def _content_source(self) -> Pool:
        w = self.world
        snapshot = self.snapshot_id.strategy.map(
            lambda i: pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=i))
        )
        volume = self.volume_id.strategy.map(
            lambda i: pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=i))
        )
        backup = live(lambda: w.backups, w.backups or w.snapshots).map(
            lambda i: pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=i))
        )
        hostile = [
            pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource()),
            pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=HUGE)),
            pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=self.world.volumes[0])),
            pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=self.world.snapshots[0])),
        ]
        # A backup as a volume source, and backup IDs that name no backup.
        hostile += [
            pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=i)) for i in w.backups[:1]
        ] + [
            pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=i))
            for i in w.hostile_backup_ids()[:4]
        ]
        return Pool(weighted((3, snapshot), (3, volume), (2, backup), (2, st.sampled_from(hostile))), hostile)

    def for_field(self, f: FieldDescriptor) -> Pool:
        """The pool of one field, by its name, then its type."""
        name = f.name
        message = f.message_type.full_name if f.message_type is not None else ""
        if message == "csi.v1.VolumeCapability":
            return self.capabilities if f.is_repeated else self.capability
        if message == "csi.v1.VolumeContentSource":
            return self.content_source
        if message == "csi.v1.Topology":
            return self.topologies if f.is_repeated else self.topology
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            request = f.containing_type.full_name if f.containing_type is not None else ""
            if name == "parameters" and request == "csi.v1.CreateSnapshotRequest":
                return self.snapshot_parameters
            pool: Pool = getattr(self, name, self.generic_map)
            return pool
        if f.message_type is not None:  # any other message: present but empty
            empty = [message_factory.GetMessageClass(f.message_type)()]
            value = empty if f.is_repeated else empty[0]
            return Pool(st.just(value), [value])
        if name in ("volume_id", "source_volume_id"):
            return self.volume_id
        if name in ("snapshot_id", "base_snapshot_id", "target_snapshot_id"):
            return self.snapshot_id
        if name == "starting_offset":
            return self.offset
        if name == "max_results":
            return self.max_entries
        if name == "staging_target_path":
            return self.staging_path
        if name in ("target_path", "volume_path"):
            return self.target_path if name == "target_path" else self.volume_path
        if name in ("name", "node_id", "starting_token", "fs_type", "mount_flags", "mode", "max_entries"):
            return {
                "name": self.name,
                "node_id": self.node_id,
                "starting_token": self.token,
                "fs_type": self.fs_type,
                "mount_flags": self.mount_flags,
                "mode": self.mode,
                "max_entries": self.max_entries,
            }[name]
        if name in ("required_bytes", "limit_bytes"):
            return self.capacity
        if f.type == FieldDescriptor.TYPE_BOOL:
            return self.boolean
        if f.type == FieldDescriptor.TYPE_ENUM:
            return self.mode
        if f.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32):
            return self.capacity
        return self.text


# -- requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request to send: a message, or raw bytes sent as the serialized request."""

    service: str
    method: str
    request: Message | bytes
    undo: bool = False
    """Undo it at once when it succeeds (sweep stages and publishes), so the next one
    goes the whole way again."""
    depends: int | None = None
    """Takes its object ID from the answer of that call of the batch's previous step."""
    refuse: bool = False
    """Must not succeed (an attempt to leave the profile's folder on the export)."""

    @property
    def path(self) -> str:
        return f"/csi.v1.{self.service}/{self.method}"

    @property
    def raw(self) -> bool:
        return isinstance(self.request, bytes)


Step = tuple[Call, ...]
"""Calls sent together: one alone, or several at once from as many threads."""
Batch = tuple[Step, ...]
"""Steps sent one after the other."""


def methods() -> list[tuple[str, MethodDescriptor]]:
    """Every RPC of the Identity, Controller and Node services, from the descriptors."""
    return [(s, m) for s in SERVICES for m in pb.DESCRIPTOR.services_by_name[s].methods]


def methods_by_name() -> dict[str, MethodDescriptor]:
    return {m.name: m for _, m in methods()}


def request_class(method: MethodDescriptor) -> type[Message]:
    cls: type[Message] = getattr(pb, method.input_type.name)
    return cls


def field_paths(descriptor: Descriptor, depth: int = 0) -> list[tuple[FieldDescriptor, ...]]:
    """Every field of a request that a mutation may set or clear: each field, and the
    fields of its singular sub-messages, except those with pools of their own."""
    paths: list[tuple[FieldDescriptor, ...]] = []
    for f in descriptor.fields:
        paths.append((f,))
        sub = f.message_type
        own_pool = sub is not None and sub.full_name in ("csi.v1.VolumeCapability", "csi.v1.VolumeContentSource")
        if sub is not None and not f.is_repeated and not sub.GetOptions().map_entry and not own_pool and depth < 3:
            paths += [(f, *rest) for rest in field_paths(sub, depth + 1)]
    return paths


def assign(message: Message, path: Sequence[FieldDescriptor], value: Any) -> None:
    """Set the field at ``path`` to ``value``, or clear it when ``value`` is None."""
    for f in path[:-1]:
        message = getattr(message, f.name)
    f = path[-1]
    if value is None:
        message.ClearField(f.name)
        return
    target = getattr(message, f.name)
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        target.clear()
        target.update(value)
    elif f.is_repeated:
        del target[:]
        target.extend(value)
    elif f.message_type is not None:
        target.CopyFrom(value)
        target.SetInParent()
    else:
        setattr(message, f.name, value)


class Chooser(Protocol):
    """Picks one of some options: a Hypothesis draw, or the first option in the sweep."""

    def __call__(self, options: Sequence[T]) -> T: ...


def drawing(draw: st.DrawFn) -> Chooser:
    """Choices by index into the options as they are now. One draw of the same range
    whatever the options' number, so how much a request draws never depends on what the
    driver holds (Hypothesis insists on that)."""

    class Draw:
        def __call__(self, options: Sequence[T]) -> T:
            return options[draw(st.integers(0, 1 << 16)) % len(options)]

    return Draw()


class First:
    def __call__(self, options: Sequence[T]) -> T:
        return options[0]


def coherent(method: MethodDescriptor, world: World, fx: Fixture, choose: Chooser) -> Message:
    """A well-formed request for ``method`` about fixture ``fx`` (or, for deletes, mostly
    about something the fuzz made itself, so the fixtures last), as a CO would send it."""
    name = method.name
    secrets = dict(world.secrets)
    pv = world.parameters
    volume, snapshot = fx.volume_id, world.snapshots[0]
    if name in ("DeleteVolume", "ControllerUnpublishVolume"):
        volume = choose([volume, *world.disposable_volumes * 9])
    if name == "DeleteSnapshot":
        snapshot = choose([snapshot, *world.disposable_snapshots * 9])
    staged_at = [path for staged, path in world.stages if staged == volume]
    staging = fx.staging_path or choose([*staged_at, *world.fresh_staging_paths()])
    target = fx.target_path or choose(world.fresh_target_paths())
    if name == "CreateVolume":
        # Sometimes a restore of a backup, under names of its own (a volume's name with
        # another source is refused before anything is made).
        restore = choose([None, None, None, *world.backups[:1], *world.backups[-1:]])
        request = pb.CreateVolumeRequest(
            name=choose([f"{MARK}-{i}" for i in range(6)]),
            capacity_range=pb.CapacityRange(required_bytes=choose([64 * MiB, 0, 16 * MiB, 300 * MiB])),
            volume_capabilities=[fx.capability],
            parameters=pv,
            secrets=secrets,
        )
        restored = choose([f"{MARK}-restore-{i}" for i in range(3)])
        if restore is not None:
            request.name = restored
            request.volume_content_source.snapshot.snapshot_id = restore
        return request
    if name == "DeleteVolume":
        return pb.DeleteVolumeRequest(volume_id=volume, secrets=secrets)
    if name == "ControllerPublishVolume":
        return pb.ControllerPublishVolumeRequest(
            volume_id=volume,
            node_id=world.node_id,
            volume_capability=fx.capability,
            secrets=secrets,
            volume_context=fx.volume_context,
        )
    if name == "ControllerUnpublishVolume":
        return pb.ControllerUnpublishVolumeRequest(volume_id=volume, node_id=world.node_id, secrets=secrets)
    if name == "ValidateVolumeCapabilities":
        return pb.ValidateVolumeCapabilitiesRequest(
            volume_id=volume,
            volume_capabilities=[fx.capability],
            volume_context=fx.volume_context,
            parameters=pv,
            secrets=secrets,
        )
    if name == "ListVolumes":
        return pb.ListVolumesRequest(max_entries=choose([0, 1, 2]))
    if name == "ListSnapshots":
        return pb.ListSnapshotsRequest(max_entries=choose([0, 1, 2]), secrets=secrets)
    if name == "GetCapacity":
        return pb.GetCapacityRequest(volume_capabilities=[fx.capability], parameters=pv)
    if name == "CreateSnapshot":
        snapshot_name = choose([f"{MARK}-snapshot-{i}" for i in range(4)])
        backup_name = choose([f"{MARK}-backup-{i}" for i in range(3)])
        if world.repository and choose([False, False, True]):
            return pb.CreateSnapshotRequest(
                source_volume_id=volume, name=backup_name, parameters=world.backup_parameters(), secrets=secrets
            )
        return pb.CreateSnapshotRequest(source_volume_id=volume, name=snapshot_name, secrets=secrets)
    if name == "DeleteSnapshot":
        return pb.DeleteSnapshotRequest(snapshot_id=snapshot, secrets=secrets)
    if name == "GetSnapshot":
        return pb.GetSnapshotRequest(snapshot_id=choose(world.snapshots), secrets=secrets)
    if name == "ControllerExpandVolume":
        return pb.ControllerExpandVolumeRequest(
            volume_id=volume,
            capacity_range=pb.CapacityRange(required_bytes=fx.capacity + choose([MiB, 0, 16 * MiB])),
            volume_capability=fx.capability,
            secrets=secrets,
        )
    if name == "ControllerGetVolume":
        return pb.ControllerGetVolumeRequest(volume_id=volume)
    if name == "GetMetadataAllocated":
        return pb.GetMetadataAllocatedRequest(
            snapshot_id=choose([*(target for _, target in world.pairs[:1]), *world.snapshots]),
            starting_offset=choose([0, 0, 4096, MiB, fx.capacity]),
            max_results=choose([0, 1, 3, 256]),
            secrets=secrets,
        )
    if name == "GetMetadataDelta":
        base, target = choose([*world.pairs, (snapshot, choose(world.snapshots))])
        return pb.GetMetadataDeltaRequest(
            base_snapshot_id=base,
            target_snapshot_id=target,
            starting_offset=choose([0, 0, 4096, MiB, fx.capacity]),
            max_results=choose([0, 1, 3, 256]),
            secrets=secrets,
        )
    if name == "ControllerModifyVolume":
        return pb.ControllerModifyVolumeRequest(volume_id=volume, mutable_parameters={"iops": "100"}, secrets=secrets)
    if name == "NodeStageVolume":
        return pb.NodeStageVolumeRequest(
            volume_id=volume,
            publish_context=fx.publish_context,
            staging_target_path=staging,
            volume_capability=fx.capability,
            secrets=secrets,
            volume_context=fx.volume_context,
        )
    if name == "NodeUnstageVolume":
        volume, staging = choose([(volume, staging), *world.stages])
        return pb.NodeUnstageVolumeRequest(volume_id=volume, staging_target_path=staging)
    if name == "NodePublishVolume":
        return pb.NodePublishVolumeRequest(
            volume_id=volume,
            publish_context=fx.publish_context,
            staging_target_path=staging,
            target_path=choose([*world.fresh_target_paths(), target]),
            volume_capability=fx.capability,
            readonly=choose([False, True]),
            secrets=secrets,
            volume_context=fx.volume_context,
        )
    if name == "NodeUnpublishVolume":
        volume, target = choose([(volume, target), *world.publishes])
        return pb.NodeUnpublishVolumeRequest(volume_id=volume, target_path=target)
    if name == "NodeGetVolumeStats":
        return pb.NodeGetVolumeStatsRequest(
            volume_id=volume, volume_path=choose([target, staging]), staging_target_path=staging
        )
    if name == "NodeExpandVolume":
        return pb.NodeExpandVolumeRequest(
            volume_id=volume,
            volume_path=target,
            capacity_range=pb.CapacityRange(required_bytes=fx.capacity),
            staging_target_path=staging,
            volume_capability=fx.capability,
            secrets=secrets,
        )
    return request_class(method)()  # Identity, the capability calls, NodeGetInfo: no fields


@st.composite
def valid_request(draw: st.DrawFn, method: MethodDescriptor, world: World) -> Message:
    choose = drawing(draw)
    return coherent(method, world, choose(world.fixtures), choose)


@st.composite
def mutated_request(draw: st.DrawFn, method: MethodDescriptor, world: World, pools: Pools) -> Message:
    """A valid request (or an empty one) with a few fields replaced or cleared."""
    empty = draw(st.integers(0, 9)) == 0
    request = request_class(method)() if empty else draw(valid_request(method, world))
    paths = field_paths(method.input_type)
    if not paths:
        return request
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3, 5]))):
        path = draw(st.sampled_from(paths))
        value = None if draw(st.integers(0, 5)) == 0 else draw(pools.for_field(path[-1]).strategy)
        assign(request, path, value)
    return request


CHURN = ("CreateVolume", "DeleteVolume", "ListVolumes", "ListSnapshots", "CreateSnapshot", "DeleteSnapshot")


def fuzzed(world: World) -> list[tuple[str, MethodDescriptor]]:
    """The RPCs the fuzz sends: all, less ``world.excluded``."""
    return [(s, m) for s, m in methods() if m.name not in world.excluded]


def calls(world: World, pools: Pools) -> st.SearchStrategy[Call]:
    by_name = {m.name: (s, m) for s, m in fuzzed(world)}

    def one(name: str) -> st.SearchStrategy[Call]:
        service, method = by_name[name]
        return mutated_request(method, world, pools).map(lambda r: Call(service, name, r))

    return st.sampled_from(sorted(by_name)).flatmap(one)


def churn_calls(world: World, pools: Pools) -> st.SearchStrategy[Call]:
    """Calls that make, list and remove objects, valid or mutated: what races in a batch."""
    by_name = {m.name: m for _, m in methods()}

    def one(name: str) -> st.SearchStrategy[Call]:
        request = weighted((2, valid_request(by_name[name], world)), (1, mutated_request(by_name[name], world, pools)))
        return request.map(lambda r: Call("Controller", name, r))

    return st.sampled_from(CHURN).flatmap(one)


@st.composite
def raw_call(draw: st.DrawFn, world: World) -> Call:
    """Bytes sent as a serialized request: random, or a valid request broken on the wire
    (truncated, invalid UTF-8 in a string, a wrong wire type, a huge length)."""
    service, method = draw(st.sampled_from(fuzzed(world)))
    cls = request_class(method)
    base = draw(valid_request(method, world)).SerializeToString()
    kind = draw(st.sampled_from(["random", "truncated", "utf8", "wiretype", "length", "unknown-field"]))
    if kind == "random":
        data = draw(st.binary(max_size=64))
    elif kind == "truncated":
        data = base[: draw(st.integers(0, 1 << 16)) % len(base)] if base else b"\x0a"
    elif kind == "utf8":
        data = b"\x0a\x04\xff\xfe\xfd\xfc" + base  # field 1 (a string in most requests) as invalid UTF-8
    elif kind == "wiretype":
        data = b"\x08\x01" + base if cls.DESCRIPTOR.fields and cls.DESCRIPTOR.fields[0].type == 9 else b"\x0d\x00"
    elif kind == "length":
        data = b"\x0a\xff\xff\xff\xff\x0f" + base
    else:
        data = base + b"\xfa\xff\x3f\x01x"  # field 1048575, length 1: an unknown field
    return Call(service, method.name, data)


@st.composite
def race(draw: st.DrawFn, world: World) -> Batch:
    """Objects made, then deleted while several listings run: a listing must not fail
    on an object that vanishes under it."""
    count = draw(st.integers(1, 3))
    listings = draw(st.integers(2, 5))
    idle = idle_fixture(world)
    secrets = dict(world.secrets)
    what = draw(st.sampled_from(["volumes", "snapshots", "backups"] if world.repository else ["volumes", "snapshots"]))
    made: Step
    if what == "backups":
        # Backups started, then deleted while they run (or just after), while listed.
        made = tuple(
            Call(
                "Controller",
                "CreateSnapshot",
                pb.CreateSnapshotRequest(
                    source_volume_id=f.volume_id,
                    name=f"{MARK}-race-backup-{i}",
                    parameters=world.backup_parameters(),
                    secrets=secrets,
                ),
            )
            for i, f in zip(range(count), world.fixtures, strict=False)
        )
        removed = tuple(
            Call("Controller", "DeleteSnapshot", pb.DeleteSnapshotRequest(secrets=secrets), depends=i)
            for i in range(len(made))
        )
        listed = tuple(
            Call("Controller", "ListSnapshots", pb.ListSnapshotsRequest(secrets=secrets)) for _ in range(listings)
        )
        return made, listed + removed
    if what == "volumes":
        made = tuple(
            Call(
                "Controller",
                "CreateVolume",
                pb.CreateVolumeRequest(
                    name=f"{MARK}-race-{i}",
                    capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
                    volume_capabilities=[idle.capability],
                    parameters=world.parameters,
                    secrets=secrets,
                ),
            )
            for i in range(count)
        )
        removed = tuple(
            Call("Controller", "DeleteVolume", pb.DeleteVolumeRequest(secrets=secrets), depends=i) for i in range(count)
        )
        listed = tuple(Call("Controller", "ListVolumes", pb.ListVolumesRequest()) for _ in range(listings))
    else:
        made = tuple(
            Call(
                "Controller",
                "CreateSnapshot",
                pb.CreateSnapshotRequest(source_volume_id=idle.volume_id, name=f"{MARK}-race-{i}", secrets=secrets),
            )
            for i in range(count)
        )
        removed = tuple(
            Call("Controller", "DeleteSnapshot", pb.DeleteSnapshotRequest(secrets=secrets), depends=i)
            for i in range(count)
        )
        listed = tuple(
            Call("Controller", "ListSnapshots", pb.ListSnapshotsRequest(secrets=secrets)) for _ in range(listings)
        )
    return made, listed + removed


def idle_fixture(world: World) -> Fixture:
    """The fixture that is neither staged nor published."""
    return next(f for f in world.fixtures if not f.staging_path and not f.published)


def create_request(world: World, name: str, parameters: dict[str, str]) -> pb.CreateVolumeRequest:
    return pb.CreateVolumeRequest(
        name=name,
        capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[idle_fixture(world).capability],
        parameters={**world.parameters, **parameters},
        secrets=dict(world.secrets),
    )


def nfs_escapes(world: World) -> list[Call]:
    """CreateVolume calls that try to leave the profile's folder on the export (each of
    ``nfs_parameters``' hostile sets, and names that a template turns into ``..``), each
    under a name no volume has: for an existing name the driver answers from its record
    before it builds a path, so a sweep under the usual names would not reach the checks.
    Every one must be refused."""
    requests = [(f"{MARK}-escape-{i}", extra) for i, extra in enumerate(nfs_parameters(world.folder())[1])]
    requests += [(name, {}) for name in HOSTILE_PATH_NAMES]
    return [
        Call("Controller", "CreateVolume", create_request(world, name, extra), refuse=True) for name, extra in requests
    ]


@st.composite
def fresh_create(draw: st.DrawFn, world: World, pools: Pools) -> Call:
    """A CreateVolume under a name no volume has yet, with drawn parameters: on nfs, so
    that its ``subDir`` is expanded and checked rather than answered from a record."""
    name = f"{MARK}-fresh-{draw(st.integers(0, 1 << 20))}"
    return Call("Controller", "CreateVolume", create_request(world, name, draw(pools.parameters.strategy)))


def batches(world: World, pools: Pools) -> st.SearchStrategy[Batch]:
    """Mostly one mutated request; some concurrent calls that make, list and remove
    objects; some races; a few raw byte strings; on nfs, also creates under fresh names."""
    single = calls(world, pools).map(lambda c: ((c,),))
    concurrent = st.lists(weighted((3, churn_calls(world, pools)), (1, calls(world, pools))), min_size=2, max_size=4)
    choices: list[tuple[int, st.SearchStrategy[Batch]]] = [
        (82, single),
        (10, concurrent.map(lambda cs: (tuple(cs),))),
        (6, race(world)),
        (2, raw_call(world).map(lambda c: ((c,),))),
    ]
    if world.kind == "nfs":
        choices.append((6, fresh_create(world, pools).map(lambda c: ((c,),))))
    return weighted(*choices)


def sweep(world: World, pools: Pools) -> list[Call]:
    """Deterministic calls: every RPC empty, then for each RPC every field of a valid
    request about the first fixture (for NodeStageVolume: the idle one) set to each of
    its pool's hostile values, one field at a time. Stages and publishes that succeed are
    undone at once, so each goes the whole way. On nfs, then ``nfs_escapes``."""
    found: list[Call] = []
    for service, method in fuzzed(world):
        cls = request_class(method)
        found.append(Call(service, method.name, cls()))
        fixture = idle_fixture(world) if method.name == "NodeStageVolume" else world.fixtures[0]
        base = coherent(method, world, fixture, First())
        undo = method.name in ("NodeStageVolume", "NodePublishVolume")
        for path in field_paths(method.input_type):
            for value in pools.for_field(path[-1]).hostile:
                request = cls()
                request.CopyFrom(base)
                assign(request, path, value)
                found.append(Call(service, method.name, request, undo=undo))
    if world.kind == "nfs" and "CreateVolume" not in world.excluded:
        found += nfs_escapes(world)
    return found
