"""Node-local volumes on many nodes: the controller's calls reach the node that holds a
volume through the Kubernetes API (see docs/design.md, "Reaching the node that holds a
volume").

Two cluster-scoped kinds of ``cairn.csi.io/v1alpha1`` carry everything:

* A ``NodeVolume`` per volume or snapshot is the controller's intent, written before
  anything is made: what to make (spec) and on which node (``spec.node``, also the
  ``cairn.csi.io/node`` label the node's agent selects on). Its name derives from the
  request name, so a retried create finds it and a second one cannot exist. The node's
  ``NodeAgent`` makes the object with the backend's own controller half pinned to that
  node (which tags what it makes with the request name in the same step), and writes the
  outcome to ``status``. The controller's ``RoutedVolumes`` waits for that status and
  answers from it; a call that runs out of waiting answers ABORTED, and the CO's retry
  finds the same object. Deleting is the object's deletion: the agent's finalizer holds
  it until the volume is gone on the node.
* A ``NodeStorage`` per backend and node, which its agent refreshes: free space, the
  largest volume, health, and a heartbeat. GetCapacity answers per node from it, and the
  nodes with a fresh one are where the backend places volumes.

Either side may stop at any step. The agent re-reads every object at start and every
``resync`` seconds and finishes what it finds, each step being idempotent; the
controller's retry re-reads the object. A create a node cannot satisfy for want of room
moves to the next candidate node, preferred nodes first (Cinder's scheduler retry). When
a node is gone for good (no Node object, no heartbeat), a delete of its volumes releases
their objects instead of waiting for ever: their data went with the node.

Publications of a routed volume are recorded on its object (the node's storage is not
touched by an attach decision); secrets are never written to objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, cast

from csi import errors, ids
from csi.backends.base import (
    Attachment,
    AttachRequest,
    BlockReader,
    BlockWriter,
    NodeConnector,
    SnapshotBlocks,
    VolumeBackend,
    check_publication,
    matching,
    page_of,
)
from csi.errors import (
    Aborted,
    AlreadyExists,
    CairnError,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from csi.model import (
    HEALTHY,
    NO_SECRETS,
    TOPOLOGY_NODE_KEY,
    AccessMode,
    AccessType,
    BackupOrder,
    Capability,
    Extent,
    Secrets,
    Segment,
    Snapshot,
    SourceRef,
    Volume,
    VolumeCondition,
    VolumeSpec,
    reaches,
)
from csi.waiting import Backoff

log = logging.getLogger(__name__)

GROUP = "cairn.csi.io"
VERSION = "v1alpha1"
VOLUMES = "nodevolumes"
STORAGES = "nodestorages"
FINALIZER = "cairn.csi.io/node-volume"
NODE_LABEL = "cairn.csi.io/node"
BACKEND_LABEL = "cairn.csi.io/backend"
KIND_LABEL = "cairn.csi.io/kind"

API_TIMEOUT = 5.0  # seconds for one API request
WAIT = 8.0  # seconds a controller call waits for the node before answering ABORTED
RESYNC = 10.0  # seconds between two full reads of an agent's objects (and heartbeats)
STALE = 60.0  # seconds after which a node's storage report no longer counts
POLL = 0.1  # seconds at most between two reads of an object the controller waits for
ORPHANS_REPORTED = 100  # at most this many orphans on a NodeStorage (all are logged)

PENDING, READY, FAILED = "Pending", "Ready", "Failed"
COPYING, SAVED = "Copying", "Saved"  # a backup's copy on the node (status.backup.phase)
PROGRESS_EVERY = 2.0  # seconds between two writes of a copy's or fill's progress
_LABEL_VALUE = 63
_OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Errors a node answers that another node may not: the create moves on.
_MOVE_ON = ("ResourceExhausted", "Unavailable")

Rest = Callable[[str, str], str]
"""(kind, request name) -> the node-free part of a local ID (``vol-<uuid>``), the same on
every node; it is the object's name."""


class Conflict(Exception):
    """The object changed since it was read (HTTP 409): read it again and redo."""


def node_label(node: str) -> str:
    """The label value that stands for ``node`` (a digest key when the name does not fit)."""
    return ids.node_key(node, _LABEL_VALUE)


def storage_name(backend: str, node: str) -> str:
    return f"{backend}.{hashlib.sha256(node.encode()).hexdigest()[:20]}"


_CODES: dict[str, type[CairnError]] = {
    cls.__name__: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.AlreadyExists,
        errors.OutOfRange,
        errors.ResourceExhausted,
        errors.FailedPrecondition,
        errors.Aborted,
        errors.Unavailable,
        errors.DeadlineExceeded,
        errors.Unimplemented,
        errors.DataLoss,
    )
}


def code_of(exc: CairnError) -> str:
    """The class of the domain tree ``exc`` belongs to, as it travels in an object's
    status (a tool's CommandNoSpace travels as ResourceExhausted); "Internal" for an
    unclassified failure."""
    for cls in type(exc).__mro__:
        if cls.__name__ in _CODES and cls is _CODES[cls.__name__]:
            return cls.__name__
    return "Internal"


def error_of(code: str, message: str) -> CairnError:
    """The domain error a node reported; an unclassified one stays unclassified
    (INTERNAL), as it would have been on the node."""
    return _CODES.get(code, CairnError)(message)


# -- the objects, through the API ------------------------------------------------------


class Objects:
    """The two kinds through a ``kubernetes`` CustomObjectsApi, every request bounded by
    ``timeout``; 404 is None, 409 is Conflict, any other failure Unavailable."""

    def __init__(self, api: Any, core: Any = None, *, timeout: float = API_TIMEOUT) -> None:
        self.api = api
        self.core = core
        self.timeout = timeout

    @classmethod
    def connect(cls, configuration: Any, *, timeout: float = API_TIMEOUT) -> Objects:
        from kubernetes import client

        from csi import kube

        api_client = kube.api_client(configuration)
        return cls(client.CustomObjectsApi(api_client), client.CoreV1Api(api_client), timeout=timeout)

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            return call()
        except ApiException as exc:
            if exc.status == 404:
                return None
            if exc.status == 409:
                raise Conflict(what) from exc
            hint = ""
            if exc.status in (401, 403):
                hint = f" (the service account needs access to {GROUP} {VOLUMES} and {STORAGES})"
            raise Unavailable(
                f"{what}: the Kubernetes API answered {exc.status} {exc.reason or ''}".rstrip() + hint
            ) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(f"{what}: the Kubernetes API could not be reached: {exc}") from exc

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self._call(
            f"reading {plural} {name}",
            lambda: self.api.get_cluster_custom_object(GROUP, VERSION, plural, name, _request_timeout=self.timeout),
        )
        return found

    def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": _KINDS[plural], **body}
        made: dict[str, Any] = self._call(
            f"creating {plural} {body['metadata']['name']}",
            lambda: self.api.create_cluster_custom_object(GROUP, VERSION, plural, body, _request_timeout=self.timeout),
        )
        return made

    def replace(self, plural: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Write ``body`` back; Conflict when it changed since it was read (its
        resourceVersion), None when it is gone."""
        name = body["metadata"]["name"]
        written: dict[str, Any] | None = self._call(
            f"updating {plural} {name}",
            lambda: self.api.replace_cluster_custom_object(
                GROUP, VERSION, plural, name, body, _request_timeout=self.timeout
            ),
        )
        return written

    def delete(self, plural: str, name: str) -> None:
        self._call(
            f"deleting {plural} {name}",
            lambda: self.api.delete_cluster_custom_object(GROUP, VERSION, plural, name, _request_timeout=self.timeout),
        )

    def list(self, plural: str, selector: str) -> tuple[list[dict[str, Any]], str]:
        """The objects ``selector`` picks, and the list's resourceVersion."""
        found = self._call(
            f"listing {plural} ({selector})",
            lambda: self.api.list_cluster_custom_object(
                GROUP, VERSION, plural, label_selector=selector, _request_timeout=self.timeout
            ),
        )
        if found is None:
            return [], ""
        return list(found.get("items") or []), str(found.get("metadata", {}).get("resourceVersion", ""))

    def watch(self, plural: str, selector: str, since: str, seconds: float) -> Iterator[dict[str, Any]]:
        """Objects as they change after resourceVersion ``since``, for about ``seconds``."""
        from kubernetes import watch

        watcher: Any = watch.Watch()  # type: ignore[no-untyped-call]
        stream = watcher.stream(
            self.api.list_cluster_custom_object,
            GROUP,
            VERSION,
            plural,
            label_selector=selector,
            resource_version=since,
            timeout_seconds=max(1, int(seconds)),
            _request_timeout=seconds + self.timeout,
        )
        for event in stream:
            if event.get("type") == "ERROR":
                return  # typically 410 Gone: the caller lists again
            obj = event.get("object")
            if isinstance(obj, dict):
                yield obj

    def node_labels(self, node: str) -> dict[str, str] | None:
        """The labels of Node ``node``; None when there is no such Node. Unavailable when
        the API cannot tell."""
        if self.core is None:
            raise Unavailable(f"cannot read node {node}: no Kubernetes API")
        found = self._call(f"reading node {node}", lambda: self.core.read_node(node, _request_timeout=self.timeout))
        if found is None:
            return None
        return dict(found.metadata.labels or {})

    def node_exists(self, node: str) -> bool | None:
        """Whether the cluster has a Node object ``node`` (None: cannot tell)."""
        try:
            return self.node_labels(node) is not None
        except (Unavailable, Conflict):
            return None


_KINDS = {VOLUMES: "NodeVolume", STORAGES: "NodeStorage"}


def update(objects: Objects, name: str, change: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """Read, change (``change`` says whether it changed anything) and write NodeVolume
    ``name`` until the write is not refused for a concurrent change; None when it is gone."""
    for _ in range(20):
        obj = objects.get(VOLUMES, name)
        if obj is None or not change(obj):
            return obj
        try:
            return objects.replace(VOLUMES, obj)
        except Conflict:
            continue
    raise Aborted(f"{name}: changed by someone else twenty times in a row")


# -- what travels in a NodeVolume ----------------------------------------------------


def _capability_out(capability: Capability) -> dict[str, Any]:
    return {
        "accessType": capability.access_type.value,
        "accessMode": capability.access_mode.value,
        "fsType": capability.fs_type,
        "mountFlags": list(capability.mount_flags),
    }


def _capability_in(raw: Mapping[str, Any]) -> Capability:
    return Capability(
        AccessType(raw["accessType"]),
        AccessMode(raw["accessMode"]),
        str(raw.get("fsType") or ""),
        tuple(raw.get("mountFlags") or ()),
    )


def _source_out(source: SourceRef | None) -> dict[str, str] | None:
    return {"kind": source.kind, "localId": source.local_id} if source else None


def _source_in(raw: Mapping[str, Any] | None) -> SourceRef | None:
    if not raw:
        return None
    return SourceRef(raw["kind"], raw["localId"])


def _order_out(order: BackupOrder) -> dict[str, Any]:
    return {
        "repository": order.repository,
        "backupId": order.backup_id,
        "name": order.name,
        "volumeId": order.volume_id,
        "snapshotId": order.snapshot_id,
        "base": order.base,
        "parent": order.parent,
        "started": order.started,
    }


def _order_in(raw: Mapping[str, Any]) -> BackupOrder:
    return BackupOrder(
        repository=str(raw["repository"]),
        backup_id=str(raw["backupId"]),
        name=str(raw["name"]),
        volume_id=str(raw["volumeId"]),
        snapshot_id=str(raw["snapshotId"]),
        base=str(raw.get("base") or ""),
        parent=str(raw.get("parent") or ""),
        started=float(raw.get("started") or 0.0),
    )


def _fill_failed(obj: Mapping[str, Any] | None) -> bool:
    """Whether the node's last fill of a restored volume failed and nobody answered it yet."""
    if obj is None:
        return False
    status = obj.get("status") or {}
    return int(status.get("fillFailures") or 0) > int(obj["spec"].get("fillRetries") or 0)


def spec_of(obj: Mapping[str, Any]) -> VolumeSpec:
    """The VolumeSpec a NodeVolume asks its node to satisfy (no secrets, no topology:
    the node is the topology)."""
    spec = obj["spec"]
    return VolumeSpec(
        name=spec["name"],
        required_bytes=int(spec.get("requiredBytes") or 0),
        limit_bytes=int(spec.get("limitBytes") or 0),
        capabilities=tuple(_capability_in(c) for c in spec.get("capabilities") or ()),
        parameters=dict(spec.get("parameters") or {}),
        source=_source_in(spec.get("source")),
    )


# -- the controller's half -------------------------------------------------------------


class RoutedVolumes:
    """A VolumeBackend whose volumes live on many nodes, each made by that node's agent."""

    def __init__(
        self,
        backend: str,
        objects: Objects,
        rest: Rest,
        *,
        volume_parameters: frozenset[str] = frozenset(),
        snapshot_parameters: frozenset[str] = frozenset(),
        nodes: Sequence[str] = (),
        wait: float = WAIT,
        stale: float = STALE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.objects = objects
        self.rest = rest
        self.volume_parameters = volume_parameters
        self.snapshot_parameters = snapshot_parameters
        self.nodes = frozenset(nodes)
        self.wait = wait
        self.stale = stale
        self.clock = clock
        self._reports: tuple[float, dict[str, dict[str, Any]]] = (-1e18, {})
        self._reports_lock = threading.Lock()

    # -- where: nodes and their reports ------------------------------------------------

    def reports(self) -> dict[str, dict[str, Any]]:
        """Node -> its fresh storage report, for the nodes that may hold volumes (read
        at most once a second)."""
        with self._reports_lock:
            read_at, found = self._reports
            if time.monotonic() - read_at < 1.0:
                return found
            items, _ = self.objects.list(STORAGES, f"{BACKEND_LABEL}={self.backend}")
            now = self.clock()
            found = {}
            for item in items:
                spec = item.get("spec") or {}
                node = str(spec.get("node") or "")
                if not node or spec.get("backend") != self.backend or (self.nodes and node not in self.nodes):
                    continue
                if now - float(spec.get("heartbeat") or 0) <= self.stale:
                    found[node] = spec
            self._reports = (time.monotonic(), found)
            return found

    @property
    def topology(self) -> tuple[Segment, ...]:
        try:
            reports = self.reports()
        except Unavailable:
            reports = {}
        # Never empty: an empty topology means "usable everywhere".
        return tuple({TOPOLOGY_NODE_KEY: node} for node in sorted(reports)) or ({TOPOLOGY_NODE_KEY: ""},)

    def settle(self) -> None:
        """Nothing to settle here: the nodes keep the storage, and their agents settle it."""

    def health(self) -> str | None:
        try:
            reports = self.reports()
        except Unavailable as exc:
            return str(exc)
        if not reports:
            return f"no node reports backend {self.backend!r}: is the node plugin running where its storage is?"
        problems = [f"node {node}: {r['problem']}" for node, r in sorted(reports.items()) if r.get("problem")]
        if len(problems) == len(reports):
            return "; ".join(problems)
        return None

    def _report_for(self, segment: Segment | None) -> list[dict[str, Any]]:
        return [r for node, r in self.reports().items() if reaches(({TOPOLOGY_NODE_KEY: node},), segment)]

    def free_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        return max((int(r.get("freeBytes") or 0) for r in self._report_for(segment)), default=0)

    def max_volume_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        return max((int(r.get("maxVolumeBytes") or 0) for r in self._report_for(segment)), default=0)

    # -- objects ---------------------------------------------------------------------

    def _name(self, kind: str, request_name: str) -> str:
        return self.rest(kind, request_name)

    def _object(self, kind: str, local_id: str) -> dict[str, Any] | None:
        """The object of a local ID this backend issued, or None."""
        key, rest = ids.split_node(local_id)
        if key is None or not _OBJECT_NAME.match(rest) or len(rest) > 253:
            return None
        obj = self.objects.get(VOLUMES, rest)
        if obj is None or not self._ours(obj, kind):
            return None
        if self._local_id(obj) != local_id:
            return None
        return obj

    def _ours(self, obj: Mapping[str, Any], kind: str) -> bool:
        spec = obj.get("spec") or {}
        return bool(spec.get("backend") == self.backend and spec.get("kind") == kind)

    def _local_id(self, obj: Mapping[str, Any]) -> str:
        return ids.with_node(self.backend, obj["spec"]["node"], obj["metadata"]["name"])

    def _await(self, name: str, done: Callable[[dict[str, Any] | None], bool], what: str) -> dict[str, Any] | None:
        """Read object ``name`` until ``done`` says so, for at most ``self.wait`` seconds;
        ABORTED (the CO retries) when the node has not answered by then."""
        deadline = time.monotonic() + self.wait
        backoff = Backoff(longest=POLL)  # a node answers most steps within milliseconds
        while True:
            obj = self.objects.get(VOLUMES, name)
            if done(obj):
                return obj
            if time.monotonic() >= deadline:
                node = ((obj or {}).get("spec") or {}).get("node", "?")
                filled = ((obj or {}).get("status") or {}).get("filledBytes")
                doing = (
                    f"{int(filled)} bytes of the backup written"
                    if filled is not None
                    else "its node plugin works on it"
                )
                raise Aborted(f"{what}: node {node!r} has not finished it yet ({doing})")
            backoff.sleep()

    def _update(self, name: str, change: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        return update(self.objects, name, change)

    @staticmethod
    def _settled(obj: dict[str, Any] | None) -> bool:
        return obj is None or (obj.get("status") or {}).get("phase") in (READY, FAILED)

    # -- volumes -------------------------------------------------------------------

    def create_volume(self, spec: VolumeSpec) -> Volume:
        name = self._name("volume", spec.name)
        obj = self.objects.get(VOLUMES, name)
        if obj is None:
            obj = self._propose(name, spec)
        elif not self._ours(obj, "volume") or obj["spec"].get("name") != spec.name:
            raise AlreadyExists(f"volume {spec.name!r}: object {name} belongs to another request")
        elif obj["metadata"].get("deletionTimestamp"):
            raise Aborted(f"volume {spec.name!r} is being deleted; retry once it is gone")
        while True:
            obj = self._await(name, lambda o: self._settled(o) or _fill_failed(o), f"creating volume {spec.name!r}")
            if obj is None:
                raise Aborted(f"volume {spec.name!r} was deleted while it was being made; retry")
            status = obj.get("status") or {}
            if status.get("phase") == READY:
                return matching(self._volume(obj), spec)
            if _fill_failed(obj):
                self._report_fill(obj, spec)
            self._next_node(obj, spec)

    def _report_fill(self, obj: dict[str, Any], spec: VolumeSpec) -> None:
        """A restore's fill failed on the node (a damaged chunk, an unreachable
        repository): answer its error, once; the retry has the node write it all again
        (the volume stays marked filling meanwhile)."""
        status = obj["status"]
        error = error_of(str(status.get("fillCode") or ""), str(status.get("fillMessage") or "the restore failed"))
        failures = int(status.get("fillFailures") or 0)

        def again(current: dict[str, Any]) -> bool:
            if int(current["spec"].get("fillRetries") or 0) >= failures:
                return False
            current["spec"]["fillRetries"] = failures
            return True

        self._update(obj["metadata"]["name"], again)
        raise error

    def _candidates(self, spec: VolumeSpec) -> list[str]:
        """Nodes that may hold the new volume, best first: the source's node for a copy of
        a snapshot or volume; otherwise (a restore of a backup too) the preferred nodes in
        order, then the others with the most room first, every one within the requisite
        topology and with room for the size asked."""
        if spec.source is not None and spec.source.kind != "backup":  # a backup restores on any node
            kind = spec.source.kind
            source = self._object(kind, spec.source.local_id)
            if source is None or (source.get("status") or {}).get("phase") != READY:
                raise NotFound(f"source {kind} {spec.source.local_id!r} does not exist")
            node = source["spec"]["node"]
            if spec.requisite and not any(reaches(({TOPOLOGY_NODE_KEY: node},), r) for r in spec.requisite):
                raise ResourceExhausted(
                    f"volume {spec.name!r}: its source {kind} is on node {node!r}, outside the requested topology"
                )
            return [node]
        reports = self.reports()
        allowed = [
            node
            for node in reports
            if not spec.requisite or any(reaches(({TOPOLOGY_NODE_KEY: node},), r) for r in spec.requisite)
        ]
        roomy = [n for n in allowed if int(reports[n].get("freeBytes") or 0) >= spec.required_bytes]
        if not roomy:
            where = ", ".join(sorted(allowed)) or "none within the requested topology"
            raise ResourceExhausted(
                f"volume {spec.name!r}: no node of backend {self.backend!r} has {spec.required_bytes} bytes free "
                f"(nodes: {where})"
            )
        preferred = [n for p in spec.preferred for n in sorted(roomy) if reaches(({TOPOLOGY_NODE_KEY: n},), p)]
        order = list(dict.fromkeys(preferred))
        order += sorted((n for n in roomy if n not in order), key=lambda n: -int(reports[n].get("freeBytes") or 0))
        return order

    def _propose(self, name: str, spec: VolumeSpec) -> dict[str, Any]:
        candidates = self._candidates(spec)
        body = {
            "metadata": {
                "name": name,
                "labels": {
                    BACKEND_LABEL: self.backend,
                    KIND_LABEL: "volume",
                    NODE_LABEL: node_label(candidates[0]),
                },
            },
            "spec": {
                "backend": self.backend,
                "kind": "volume",
                "name": spec.name,
                "node": candidates[0],
                "candidates": candidates[1:],
                "tried": [],
                "requiredBytes": spec.required_bytes,
                "limitBytes": spec.limit_bytes,
                "capabilities": [_capability_out(c) for c in spec.capabilities],
                "parameters": dict(spec.parameters),
                "source": _source_out(spec.source),
                "published": {},
            },
            "status": {"phase": PENDING},
        }
        try:
            return self.objects.create(VOLUMES, body)
        except Conflict:
            found = self.objects.get(VOLUMES, name)
            if found is None:
                raise Aborted(f"volume {spec.name!r}: its object came and went; retry") from None
            return found

    def _next_node(self, obj: dict[str, Any], spec: VolumeSpec) -> None:
        """The node refused the create: give it to the next candidate, or, when none is
        left, remove the object and answer the node's error."""
        status, ospec = obj.get("status") or {}, obj["spec"]
        error = error_of(str(status.get("code") or ""), str(status.get("message") or "the node failed"))
        left = [n for n in ospec.get("candidates") or () if n not in (ospec.get("tried") or ())]
        if status.get("code") not in _MOVE_ON or not left:
            self.objects.delete(VOLUMES, obj["metadata"]["name"])
            raise error
        log.info(
            "volume %r: node %s answered %s; trying node %s", spec.name, ospec["node"], status.get("code"), left[0]
        )
        tried = [*(ospec.get("tried") or ()), ospec["node"]]

        def move(current: dict[str, Any]) -> bool:
            if (current.get("status") or {}).get("phase") != FAILED or current["spec"]["node"] != ospec["node"]:
                return False  # someone (a concurrent retry) moved it already
            current["spec"].update(node=left[0], tried=tried)
            current["metadata"]["labels"][NODE_LABEL] = node_label(left[0])
            current["status"] = {"phase": PENDING}
            return True

        self._update(obj["metadata"]["name"], move)

    def delete_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        obj = self._object("volume", local_id)
        if obj is None:
            return
        published = (obj["spec"].get("published") or {}) if not obj["metadata"].get("deletionTimestamp") else {}
        if published:
            raise FailedPrecondition(f"volume {local_id} is still published to node(s) {', '.join(sorted(published))}")
        self._remove(obj, f"volume {local_id}")

    def _remove(self, obj: dict[str, Any], what: str) -> None:
        name, node = obj["metadata"]["name"], obj["spec"]["node"]
        self.objects.delete(VOLUMES, name)
        try:
            gone = self._await(
                name, lambda o: o is None or bool((o.get("status") or {}).get("deleteCode")), f"deleting {what}"
            )
        except Aborted:
            if self._node_lost(node):
                self._release(name, node, what)
                return
            raise
        if gone is not None:
            status = gone["status"]
            raise error_of(status["deleteCode"], f"deleting {what} on node {node!r}: {status.get('deleteMessage', '')}")

    def _node_lost(self, node: str) -> bool:
        """Whether ``node`` is gone for good: no fresh storage report and no Node object."""
        if node in self.reports():
            return False
        return self.objects.node_exists(node) is False

    def _release(self, name: str, node: str, what: str) -> None:
        log.warning(
            "%s: node %r is gone (no Node object, no heartbeat); releasing its record, its data went with it",
            what,
            node,
        )

        def drop(current: dict[str, Any]) -> bool:
            finalizers = current["metadata"].get("finalizers") or []
            if FINALIZER not in finalizers:
                return False
            current["metadata"]["finalizers"] = [f for f in finalizers if f != FINALIZER]
            return True

        self._update(name, drop)

    def get_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Volume:
        obj = self._object("volume", local_id)
        if obj is None or (obj.get("status") or {}).get("phase") != READY:
            raise NotFound(f"volume {local_id!r} does not exist")
        return self._volume(obj)

    def lookup_volume(self, name: str, *, secrets: Secrets = NO_SECRETS) -> Volume | None:
        obj = self.objects.get(VOLUMES, self._name("volume", name))
        if obj is None or not self._ours(obj, "volume") or (obj.get("status") or {}).get("phase") != READY:
            return None
        return self._volume(obj)

    def _ready(self, kind: str) -> list[dict[str, Any]]:
        items, _ = self.objects.list(VOLUMES, f"{BACKEND_LABEL}={self.backend},{KIND_LABEL}={kind}")
        return [o for o in items if self._ours(o, kind) and (o.get("status") or {}).get("phase") == READY]

    def list_volumes(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Volume]:
        # One list of the API's objects: their names are not local IDs, so no cursor.
        return page_of((self._volume(o) for o in self._ready("volume")), after, limit)

    def _volume(self, obj: Mapping[str, Any]) -> Volume:
        spec, status = obj["spec"], obj.get("status") or {}
        node = spec["node"]
        condition = HEALTHY
        if status.get("abnormal"):
            condition = VolumeCondition(True, str(status["abnormal"]))
        return Volume(
            local_id=self._local_id(obj),
            name=spec["name"],
            capacity_bytes=int(status.get("capacityBytes") or 0),
            source=_source_in(spec.get("source")),
            topology=({TOPOLOGY_NODE_KEY: node},),
            published_nodes=tuple(sorted(spec.get("published") or {})),
            condition=condition,
        )

    def expand_volume(
        self, local_id: str, required_bytes: int, limit_bytes: int, *, secrets: Secrets = NO_SECRETS
    ) -> int:
        obj = self._object("volume", local_id)
        if obj is None or (obj.get("status") or {}).get("phase") != READY:
            raise NotFound(f"volume {local_id!r} does not exist")
        if required_bytes <= int(obj["status"].get("capacityBytes") or 0):
            return int(obj["status"]["capacityBytes"])
        name = obj["metadata"]["name"]

        def ask(current: dict[str, Any]) -> bool:
            if int(current["spec"].get("requiredBytes") or 0) >= required_bytes:
                return False
            current["spec"].update(requiredBytes=required_bytes, limitBytes=limit_bytes)
            (current.setdefault("status", {})).pop("expandCode", None)
            return True

        self._update(name, ask)

        def grown(o: dict[str, Any] | None) -> bool:
            status = (o or {}).get("status") or {}
            return (
                o is None or int(status.get("capacityBytes") or 0) >= required_bytes or bool(status.get("expandCode"))
            )

        done = self._await(name, grown, f"expanding volume {local_id}")
        if done is None:
            raise NotFound(f"volume {local_id!r} does not exist")
        status = done["status"]
        if int(status.get("capacityBytes") or 0) >= required_bytes:
            return int(status["capacityBytes"])
        error = error_of(str(status["expandCode"]), str(status.get("expandMessage") or "expansion failed"))

        def forget(current: dict[str, Any]) -> bool:
            # A refused growth is not asked again at every resync: the CO asks again.
            current["spec"]["requiredBytes"] = int(current["status"].get("capacityBytes") or 0)
            return True

        self._update(name, forget)
        raise error

    # -- snapshots -------------------------------------------------------------------

    def create_snapshot(
        self, name: str, source_local_id: str, parameters: Mapping[str, str], *, secrets: Secrets = NO_SECRETS
    ) -> Snapshot:
        object_name = self._name("snapshot", name)
        obj = self.objects.get(VOLUMES, object_name)
        if obj is None:
            source = self._object("volume", source_local_id)
            if source is None or (source.get("status") or {}).get("phase") != READY:
                raise NotFound(f"source volume {source_local_id!r} does not exist")
            node = source["spec"]["node"]
            body = {
                "metadata": {
                    "name": object_name,
                    "labels": {BACKEND_LABEL: self.backend, KIND_LABEL: "snapshot", NODE_LABEL: node_label(node)},
                },
                "spec": {
                    "backend": self.backend,
                    "kind": "snapshot",
                    "name": name,
                    "node": node,
                    "sourceLocalId": source_local_id,
                    "parameters": dict(parameters),
                },
                "status": {"phase": PENDING},
            }
            with contextlib.suppress(Conflict):
                self.objects.create(VOLUMES, body)
        else:
            if not self._ours(obj, "snapshot") or obj["spec"].get("name") != name:
                raise AlreadyExists(f"snapshot {name!r}: object {object_name} belongs to another request")
            if obj["spec"].get("sourceLocalId") != source_local_id:
                raise AlreadyExists(f"snapshot {name!r} exists for another source volume")
        done = self._await(object_name, self._settled, f"taking snapshot {name!r}")
        if done is None:
            raise Aborted(f"snapshot {name!r} was deleted while it was being taken; retry")
        status = done.get("status") or {}
        if status.get("phase") == FAILED:
            self.objects.delete(VOLUMES, object_name)
            raise error_of(str(status.get("code") or ""), str(status.get("message") or "the node failed"))
        return self._snapshot(done)

    def delete_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        obj = self._object("snapshot", local_id)
        if obj is not None:
            self._remove(obj, f"snapshot {local_id}")

    def get_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Snapshot:
        obj = self._object("snapshot", local_id)
        if obj is None or (obj.get("status") or {}).get("phase") != READY:
            raise NotFound(f"snapshot {local_id!r} does not exist")
        return self._snapshot(obj)

    def list_snapshots(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Snapshot]:
        return page_of((self._snapshot(o) for o in self._ready("snapshot")), after, limit)

    def _snapshot(self, obj: Mapping[str, Any]) -> Snapshot:
        spec, status = obj["spec"], obj.get("status") or {}
        return Snapshot(
            local_id=self._local_id(obj),
            name=spec["name"],
            source_volume_local_id=spec["sourceLocalId"],
            size_bytes=int(status.get("sizeBytes") or 0),
            created_at=float(status.get("createdAt") or 0),
        )

    # -- backups: the node that holds the snapshot copies it ----------------------------

    def _backup_object(self, snapshot_local_id: str) -> dict[str, Any]:
        obj = self._object("snapshot", snapshot_local_id)
        if obj is None or (obj.get("status") or {}).get("phase") != READY:
            raise NotFound(f"snapshot {snapshot_local_id!r} does not exist")
        return obj

    def order_backup(self, snapshot_local_id: str, order: BackupOrder) -> None:
        """Write the order on the snapshot's object for its node's agent (kept when one
        for the same backup is there; a failure already reported is cleared, so the node
        starts again)."""
        obj = self._backup_object(snapshot_local_id)

        def ask(current: dict[str, Any]) -> bool:
            state = (current.get("status") or {}).get("backup") or {}
            if (current["spec"].get("backup") or {}).get("backupId") == order.backup_id:
                if state.get("phase") == FAILED and state.get("reported"):
                    del current["status"]["backup"]
                    return True
                return False
            current["spec"]["backup"] = _order_out(order)
            current.setdefault("status", {}).pop("backup", None)
            return True

        self._update(obj["metadata"]["name"], ask)

    def backup_progress(self, snapshot_local_id: str, backup_id: str) -> int | None:
        obj = self._backup_object(snapshot_local_id)
        state = (obj.get("status") or {}).get("backup") or {}
        if state.get("backupId") != backup_id:
            return 0  # not started on the node yet
        if state.get("phase") == SAVED:
            return None
        if state.get("phase") == FAILED:
            node = obj["spec"]["node"]
            error = error_of(
                str(state.get("code") or ""), f"on node {node!r}: {state.get('message') or 'the copy failed'}"
            )

            def reported(current: dict[str, Any]) -> bool:
                found = (current.get("status") or {}).get("backup") or {}
                if found.get("backupId") != backup_id or found.get("phase") != FAILED or found.get("reported"):
                    return False
                found["reported"] = True
                return True

            self._update(obj["metadata"]["name"], reported)
            raise error
        return int(state.get("doneBytes") or 0)

    # -- publication -----------------------------------------------------------------

    def publish_volume(
        self, local_id: str, node_id: str, capability: Capability, readonly: bool, *, secrets: Secrets = NO_SECRETS
    ) -> dict[str, str]:
        obj = self._object("volume", local_id)
        if obj is None or (obj.get("status") or {}).get("phase") != READY:
            raise NotFound(f"volume {local_id!r} does not exist")
        owner = obj["spec"]["node"]
        if node_id != owner:
            raise NotFound(f"node {node_id!r} cannot reach volume {local_id}: it is local to node {owner!r}")

        def record(current: dict[str, Any]) -> bool:
            published = {str(k): bool(v) for k, v in (current["spec"].get("published") or {}).items()}
            check_publication(local_id, published, node_id, capability, readonly)
            if node_id in published:
                return False
            current["spec"]["published"] = {**published, node_id: readonly}
            return True

        self._update(obj["metadata"]["name"], record)
        return {}

    def unpublish_volume(self, local_id: str, node_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        obj = self._object("volume", local_id)
        if obj is None:
            return

        def forget(current: dict[str, Any]) -> bool:
            published = dict(current["spec"].get("published") or {})
            if published.pop(node_id, None) is None:
                return False
            current["spec"]["published"] = published
            return True

        self._update(obj["metadata"]["name"], forget)


# -- the node's half -------------------------------------------------------------------


class NodeBackupWork(Protocol):
    """The backup work a node agent hands on (``backup.engine.NodeBackups``), with the
    node's own block access to the backend's volumes."""

    def copy(
        self, snapshot_local_id: str, order: BackupOrder, cancelled: threading.Event, progress: Callable[[int], None]
    ) -> object:
        """Copy the snapshot into the order's repository and save the backup."""

    def fill(
        self, volume: Volume, backup_snapshot_id: str, cancelled: threading.Event, progress: Callable[[int], None]
    ) -> object:
        """Write the backup into ``volume`` (made from it, still filling)."""


class NodeAgent:
    """Makes, grows and removes the NodeVolumes of one backend on this node with
    ``executor`` (the backend's controller half pinned to this node), and reports this
    node's storage. Runs in its own thread from ``start`` to ``stop``."""

    def __init__(
        self,
        backend: str,
        node: str,
        objects: Objects,
        executor: VolumeBackend,
        rest: Rest,
        *,
        resync: float = RESYNC,
        clock: Callable[[], float] = time.time,
        backups: NodeBackupWork | None = None,
    ) -> None:
        self.backend = backend
        self.node = node
        self.objects = objects
        self.executor = executor
        self.backups = backups
        self.rest = rest
        self.resync = resync
        self.clock = clock
        self.selector = f"{BACKEND_LABEL}={backend},{NODE_LABEL}={node_label(node)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._synced = False
        self._known_orphans: set[str] = set()
        self._working = threading.RLock()  # held by every step; stop waits for it
        # Copies and fills run in their own threads (hours for a large volume), so the
        # agent goes on with the other objects meanwhile: object name -> thread, cancel.
        self._tasks: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._tasks_lock = threading.Lock()
        self.passes = 0
        """Full passes finished (each reads every object, checks presence, reports)."""
        self.last_problem = ""
        """Why the last pass failed or checked nothing ("" when it did neither), for whoever
        inspects the agent (the routed tests print it when a wait runs out)."""

    @property
    def health_name(self) -> str:
        return f"node-agent-{self.backend}"

    def serving(self) -> bool:
        """Whether the agent runs and its last full pass reached the API."""
        return self._thread is not None and self._thread.is_alive() and self._synced

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"agent-{self.backend}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the agent: return once no step is running (waiting at most ``timeout``
        for one in progress) and none will start. The thread itself ends when its watch
        does (a few seconds), doing nothing more."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        if self._working.acquire(timeout=timeout):
            self._working.release()
        with self._tasks_lock:
            tasks = list(self._tasks.values())
        for _, cancelled in tasks:
            cancelled.set()
        for thread, _ in tasks:
            thread.join(max(0.0, deadline - time.monotonic()))
        if not any(thread.is_alive() for thread, _ in tasks):
            # Nothing runs on the node's storage any more: let it settle what it keeps
            # for a crash (the local backend's journal).
            self.executor.settle()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                since = self.sync()
                deadline = time.monotonic() + self.resync
                while not self._stop.is_set() and time.monotonic() < deadline:
                    for obj in self.objects.watch(VOLUMES, self.selector, since, min(self.resync, 5.0)):
                        self.handle(obj)
                        since = str(obj.get("metadata", {}).get("resourceVersion") or since)
                        if self._stop.is_set():
                            return
            except Exception as exc:  # an agent that stops here stops the node's volumes
                self._synced = False
                self.last_problem = f"{type(exc).__name__}: {exc}"
                log.exception("backend %s: node agent pass failed; retrying", self.backend)
                self._stop.wait(1.0)

    def sync(self) -> str:
        """Handle every object of this node once and report the node's storage; the
        list's resourceVersion, to watch from."""
        items, version = self.objects.list(VOLUMES, self.selector)
        with self._working:
            if self._stop.is_set():
                return version
            for obj in items:
                self.handle(obj)
            held = self._held()
            if held is not None:
                for obj in items:
                    try:
                        self._check_presence(obj, held)
                    except CairnError as exc:  # this object's check waits for the next pass
                        log.warning("backend %s: cannot mark %s: %s", self.backend, obj["metadata"]["name"], exc)
            self.report(self._orphans({obj["metadata"]["name"] for obj in items}, held))
        self._synced = True
        self.passes += 1
        self.last_problem = "" if held is not None else "what this node holds could not be listed"
        return version

    def _held(self) -> set[str] | None:
        """The local IDs of what this backend holds on this node now (None: unreadable)."""
        try:
            found = {v.local_id for v in self.executor.list_volumes()}
            return found | {s.local_id for s in self.executor.list_snapshots()}
        except CairnError as exc:
            log.warning("backend %s: cannot list what this node holds: %s", self.backend, exc)
            return None

    def _check_presence(self, obj: dict[str, Any], held: set[str]) -> None:
        """A Ready object whose volume is gone from this node (an LV removed by hand, a
        disk replaced) is marked abnormal, and healthy again once it is back: the volume
        condition ControllerGetVolume and ListVolumes report."""
        status = obj.get("status") or {}
        if (
            status.get("phase") != READY
            or obj["spec"].get("kind") != "volume"
            or obj["metadata"].get("deletionTimestamp")
        ):
            return
        missing = self._local_id(obj) not in held
        problem = f"its data is missing on node {self.node!r}" if missing else ""
        if str(status.get("abnormal") or "") != problem:
            status["abnormal"] = problem
            with contextlib.suppress(Conflict):
                self.objects.replace(VOLUMES, obj)

    def _orphans(self, names: set[str], held: set[str] | None) -> list[str]:
        """The local IDs of what this backend holds on this node that no NodeVolume names
        (a record released while its node was away, an object deleted by hand): logged
        once, reported on the node's NodeStorage, never deleted."""
        if held is None:
            return sorted(self._known_orphans)[:ORPHANS_REPORTED]
        found = {local_id for local_id in held if ids.split_node(local_id)[1] not in names}
        for local_id in sorted(found - self._known_orphans):
            log.warning(
                "backend %s: %s on this node is an orphan: no NodeVolume names it (kept; delete it yourself if "
                "nothing needs it)",
                self.backend,
                local_id,
            )
        self._known_orphans = found
        return sorted(found)[:ORPHANS_REPORTED]

    def report(self, orphans: Sequence[str] = ()) -> None:
        problem = self.executor.health()
        free = self.executor.free_bytes() if problem is None else 0
        largest = self.executor.max_volume_bytes() if problem is None else 0
        name = storage_name(self.backend, self.node)
        spec = {
            "backend": self.backend,
            "node": self.node,
            "freeBytes": free,
            "maxVolumeBytes": largest,
            "problem": problem or "",
            "orphans": list(orphans),
            "heartbeat": int(self.clock()),
        }
        current = self.objects.get(STORAGES, name)
        if current is None:
            body = {"metadata": {"name": name, "labels": {BACKEND_LABEL: self.backend}}, "spec": spec}
            with contextlib.suppress(Conflict):
                self.objects.create(STORAGES, body)
            return
        current["spec"] = spec
        with contextlib.suppress(Conflict):  # the next report writes it
            self.objects.replace(STORAGES, current)

    def handle(self, obj: dict[str, Any]) -> None:
        """One step on one object; a step cut short is redone by the next pass."""
        spec = obj.get("spec") or {}
        if spec.get("backend") != self.backend or spec.get("node") != self.node:
            return
        with self._working:
            if not self._stop.is_set():
                self._step(obj, spec)

    def _step(self, obj: dict[str, Any], spec: Mapping[str, Any]) -> None:
        """One object's step. A step that fails is logged and tried again at the next pass:
        one object must hold up neither the others nor the node's presence checks and its
        report (a node that stops reporting looks lost to the controller)."""
        name = obj.get("metadata", {}).get("name", "?")
        try:
            phase = (obj.get("status") or {}).get("phase")
            if obj["metadata"].get("deletionTimestamp"):
                self._delete(obj)
            elif phase == PENDING:
                self._create(obj)
            elif phase == READY and spec.get("kind") == "volume":
                self._grow(obj)
            elif phase == READY and spec.get("kind") == "snapshot" and spec.get("backup"):
                self._copy(obj)
        except Conflict:
            pass  # changed meanwhile: the watch brings the new version
        except CairnError as exc:
            log.warning("backend %s: %s: %s; tried again at the next pass", self.backend, name, exc)
        except Exception:
            log.exception("backend %s: the step on %s failed; tried again at the next pass", self.backend, name)

    def _local_id(self, obj: Mapping[str, Any]) -> str:
        return ids.with_node(self.backend, self.node, obj["metadata"]["name"])

    def _create(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if self._running(name):
            return  # a fill of it runs: the volume is made, its content on the way
        if FINALIZER not in (obj["metadata"].get("finalizers") or []):
            # The finalizer first: from here on the object is not gone before the volume.
            # (The write is refused for a version older than the object's.)
            obj["metadata"]["finalizers"] = [*(obj["metadata"].get("finalizers") or []), FINALIZER]
            written = self.objects.replace(VOLUMES, obj)
            if written is None:
                return
            obj = written
        else:
            # A watch may bring an older version after a newer one was handled (events lag
            # under load): read the object again before making anything, or a volume that
            # was made and then removed (deleted, or gone by hand) would be made again.
            fresh = self.objects.get(VOLUMES, name)
            if (
                fresh is None
                or fresh["metadata"].get("deletionTimestamp")
                or (fresh.get("status") or {}).get("phase") != PENDING
                or (fresh.get("spec") or {}).get("node") != self.node
            ):
                return
            obj = fresh
        spec = obj["spec"]
        status: dict[str, Any]
        try:
            if spec["kind"] == "volume":
                volume = self.executor.create_volume(spec_of(obj))
                if volume.filling:
                    self._fill(obj, volume)  # Ready once the backup is written
                    return
                status = {"phase": READY, "capacityBytes": volume.capacity_bytes}
            else:
                snapshot = self.executor.create_snapshot(
                    spec["name"], spec["sourceLocalId"], spec.get("parameters") or {}
                )
                status = {"phase": READY, "sizeBytes": snapshot.size_bytes, "createdAt": snapshot.created_at}
        except CairnError as exc:
            log.info("backend %s: %s %r failed on this node: %s", self.backend, spec["kind"], spec["name"], exc)
            # Nothing was made (every create leaves nothing behind when it fails), so the
            # object may go, or move to another node, without this node's say.
            obj["metadata"]["finalizers"] = [f for f in obj["metadata"].get("finalizers") or [] if f != FINALIZER]
            status = {"phase": FAILED, "code": code_of(exc), "message": str(exc)}
        obj["status"] = status
        self.objects.replace(VOLUMES, obj)

    def _grow(self, obj: dict[str, Any]) -> None:
        status, spec = obj["status"], obj["spec"]
        wanted = int(spec.get("requiredBytes") or 0)
        if wanted <= int(status.get("capacityBytes") or 0) or status.get("expandCode"):
            return
        try:
            status["capacityBytes"] = self.executor.expand_volume(
                self._local_id(obj), wanted, int(spec.get("limitBytes") or 0)
            )
        except CairnError as exc:
            status.update(expandCode=code_of(exc), expandMessage=str(exc))
        self.objects.replace(VOLUMES, obj)

    def _delete(self, obj: dict[str, Any]) -> None:
        finalizers = obj["metadata"].get("finalizers") or []
        if FINALIZER not in finalizers:
            return
        self._cancel(obj["metadata"]["name"])  # a copy reading it, a fill writing it
        try:
            if obj["spec"]["kind"] == "volume":
                self.executor.delete_volume(self._local_id(obj))
            else:
                self.executor.delete_snapshot(self._local_id(obj))
        except CairnError as exc:
            log.warning("backend %s: cannot delete %s yet: %s", self.backend, obj["metadata"]["name"], exc)
            status = obj.setdefault("status", {})
            if status.get("deleteCode") != code_of(exc):
                status.update(deleteCode=code_of(exc), deleteMessage=str(exc))
                self.objects.replace(VOLUMES, obj)
            return
        obj["metadata"]["finalizers"] = [f for f in finalizers if f != FINALIZER]
        self.objects.replace(VOLUMES, obj)

    # -- copies and fills, in their own threads -------------------------------------------

    def _start(self, name: str, what: str, work: Callable[[threading.Event], None]) -> None:
        """Run ``work`` for object ``name`` in a thread of its own, unless one runs."""
        with self._tasks_lock:
            running = self._tasks.get(name)
            if (running is not None and running[0].is_alive()) or self._stop.is_set():
                return
            cancelled = threading.Event()
            thread = threading.Thread(
                target=self._task, args=(name, what, work, cancelled), name=f"{what} {name}", daemon=True
            )
            self._tasks[name] = (thread, cancelled)
            thread.start()

    def _task(self, name: str, what: str, work: Callable[[threading.Event], None], cancelled: threading.Event) -> None:
        try:
            work(cancelled)
        except Exception:  # its outcome is unwritten: the next pass starts it again
            log.exception("backend %s: the %s of %s failed", self.backend, what, name)
        finally:
            with self._tasks_lock:
                if self._tasks.get(name, (None,))[0] is threading.current_thread():
                    del self._tasks[name]

    def _running(self, name: str) -> bool:
        with self._tasks_lock:
            running = self._tasks.get(name)
        return running is not None and running[0].is_alive()

    def _cancel(self, name: str, timeout: float = 60.0) -> None:
        """Stop the copy or fill of object ``name``, if one runs: it ends at its next chunk."""
        with self._tasks_lock:
            running = self._tasks.get(name)
        if running is not None:
            running[1].set()
            running[0].join(timeout)

    def _progress(self, write: Callable[[int], None]) -> Callable[[int], None]:
        """``write`` of the bytes done so far, at most every PROGRESS_EVERY seconds (the
        chunks are done by several threads)."""
        lock = threading.Lock()
        last = [time.monotonic()]

        def told(done: int) -> None:
            with lock:
                if time.monotonic() - last[0] < PROGRESS_EVERY:
                    return
                last[0] = time.monotonic()
            with contextlib.suppress(CairnError):  # progress only: the next one may pass
                write(done)

        return told

    def _copy(self, obj: dict[str, Any]) -> None:
        """Copy a backup's snapshot into its repository, as the controller ordered; the
        outcome goes to ``status.backup``."""
        name = obj["metadata"]["name"]
        if self._running(name):
            return
        fresh = self.objects.get(VOLUMES, name)  # not an older version a lagging watch brought
        if fresh is None or fresh["metadata"].get("deletionTimestamp") or not fresh["spec"].get("backup"):
            return
        order = _order_in(fresh["spec"]["backup"])
        state = (fresh.get("status") or {}).get("backup") or {}
        if state.get("backupId") == order.backup_id and state.get("phase") in (SAVED, FAILED):
            return
        local_id = self._local_id(fresh)

        def tell(**fields: Any) -> None:
            def change(current: dict[str, Any]) -> bool:
                if current["metadata"].get("deletionTimestamp"):
                    return False
                if ((current["spec"].get("backup") or {}).get("backupId")) != order.backup_id:
                    return False
                current.setdefault("status", {})["backup"] = {"backupId": order.backup_id, **fields}
                return True

            update(self.objects, name, change)

        backups = self.backups
        if backups is None:
            tell(phase=FAILED, code="FailedPrecondition", message=f"node {self.node!r} reads no blocks of this backend")
            return

        def work(cancelled: threading.Event) -> None:
            tell(phase=COPYING, doneBytes=0)
            try:
                backups.copy(local_id, order, cancelled, self._progress(lambda d: tell(phase=COPYING, doneBytes=d)))
            except Exception as exc:
                if not cancelled.is_set():
                    code, message = self._failure(f"backup {order.name!r}", exc)
                    tell(phase=FAILED, code=code, message=message)
                return
            tell(phase=SAVED)

        self._start(name, "backup", work)

    def _failure(self, what: str, exc: Exception) -> tuple[str, str]:
        """How a copy's or fill's failure travels to the controller (code, message),
        logged here; anything outside the domain's errors is Internal, with its traceback
        in this node plugin's log."""
        if isinstance(exc, CairnError):
            log.warning("backend %s: %s failed on this node: %s", self.backend, what, exc)
            return code_of(exc), str(exc)
        log.exception("backend %s: %s failed on this node", self.backend, what)
        return "Internal", f"{what} failed on node {self.node!r}: {type(exc).__name__}: {exc}"

    def _fill(self, obj: dict[str, Any], volume: Volume) -> None:
        """Write the backup a volume is restored from; the volume is Ready once written.
        A failure is recorded (``fillFailures``) and waits for the controller to answer
        it and ask again (``spec.fillRetries``): the volume stays marked filling."""
        if _fill_failed(obj):
            return
        name = obj["metadata"]["name"]
        backup = obj["spec"]["source"]["localId"]

        def change_pending(edit: Callable[[dict[str, Any]], None]) -> None:
            def change(current: dict[str, Any]) -> bool:
                status = current.setdefault("status", {})
                if current["metadata"].get("deletionTimestamp") or status.get("phase") != PENDING:
                    return False
                edit(status)
                return True

            update(self.objects, name, change)

        def failed(exc: Exception) -> None:
            code, message = self._failure(f"the restore of {backup} into {volume.local_id}", exc)

            def edit(status: dict[str, Any]) -> None:
                status.update(fillFailures=int(status.get("fillFailures") or 0) + 1, fillCode=code, fillMessage=message)
                status.pop("filledBytes", None)

            change_pending(edit)

        def work(cancelled: threading.Event) -> None:
            try:
                if self.backups is None:
                    raise FailedPrecondition(f"node {self.node!r} fills no volumes of backend {self.backend!r}")
                self.backups.fill(
                    volume,
                    backup,
                    cancelled,
                    self._progress(lambda d: change_pending(lambda s: s.update(filledBytes=d))),
                )
                made = self.executor.get_volume(volume.local_id)
            except Exception as exc:
                if not cancelled.is_set():
                    failed(exc)
                return

            def ready(status: dict[str, Any]) -> None:
                status.clear()
                status.update(phase=READY, capacityBytes=made.capacity_bytes)

            change_pending(ready)

        self._start(name, "restore", work)


# -- backends whose local IDs carry no node --------------------------------------------


class NodeKeyed:
    """A controller half pinned to ``node`` whose local IDs carry no node (the local
    backend's ``vol-<uuid>``), seen with the node in them (``<node>@vol-<uuid>``), as
    routed backends issue them: added on the way out, stripped on the way in."""

    def __init__(self, inner: VolumeBackend, backend: str, node: str) -> None:
        self.inner = inner
        self.backend = backend
        self.node = node
        self.volume_parameters = inner.volume_parameters
        self.snapshot_parameters = inner.snapshot_parameters

    def settle(self) -> None:
        self.inner.settle()

    @property
    def topology(self) -> tuple[Segment, ...]:
        return self.inner.topology

    def _out(self, local_id: str) -> str:
        return ids.with_node(self.backend, self.node, local_id)

    def _in(self, local_id: str) -> str:
        """The inner ID of one of ours; an ID of another node names nothing here."""
        if self._out(ids.split_node(local_id)[1]) != local_id:
            return "not-on-this-node"  # refused by the inner backend as no ID it made
        return ids.split_node(local_id)[1]

    def _volume(self, volume: Volume) -> Volume:
        source = volume.source
        if source is not None and source.kind != "backup":  # a backup's ID is driver-wide
            source = SourceRef(source.kind, self._out(source.local_id))
        return dataclasses.replace(volume, local_id=self._out(volume.local_id), source=source)

    def _snapshot(self, snapshot: Snapshot) -> Snapshot:
        return dataclasses.replace(
            snapshot,
            local_id=self._out(snapshot.local_id),
            source_volume_local_id=self._out(snapshot.source_volume_local_id),
        )

    def health(self) -> str | None:
        return self.inner.health()

    def free_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        return self.inner.free_bytes(segment, secrets=secrets)

    def max_volume_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        return self.inner.max_volume_bytes(segment, secrets=secrets)

    def create_volume(self, spec: VolumeSpec) -> Volume:
        source = spec.source
        if source is not None and source.kind != "backup":
            source = SourceRef(source.kind, self._in(source.local_id))
        return self._volume(self.inner.create_volume(dataclasses.replace(spec, source=source)))

    def delete_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        self.inner.delete_volume(self._in(local_id), secrets=secrets)

    def get_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Volume:
        return self._volume(self.inner.get_volume(self._in(local_id), secrets=secrets))

    def lookup_volume(self, name: str, *, secrets: Secrets = NO_SECRETS) -> Volume | None:
        found = self.inner.lookup_volume(name, secrets=secrets)
        return self._volume(found) if found else None

    def list_volumes(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Volume]:
        return page_of((self._volume(v) for v in self.inner.list_volumes(secrets=secrets)), after, limit)

    def expand_volume(
        self, local_id: str, required_bytes: int, limit_bytes: int, *, secrets: Secrets = NO_SECRETS
    ) -> int:
        return self.inner.expand_volume(self._in(local_id), required_bytes, limit_bytes, secrets=secrets)

    def create_snapshot(
        self, name: str, source_local_id: str, parameters: Mapping[str, str], *, secrets: Secrets = NO_SECRETS
    ) -> Snapshot:
        return self._snapshot(self.inner.create_snapshot(name, self._in(source_local_id), parameters, secrets=secrets))

    def delete_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        self.inner.delete_snapshot(self._in(local_id), secrets=secrets)

    def get_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Snapshot:
        return self._snapshot(self.inner.get_snapshot(self._in(local_id), secrets=secrets))

    def list_snapshots(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Snapshot]:
        return page_of((self._snapshot(s) for s in self.inner.list_snapshots(secrets=secrets)), after, limit)

    def publish_volume(
        self, local_id: str, node_id: str, capability: Capability, readonly: bool, *, secrets: Secrets = NO_SECRETS
    ) -> dict[str, str]:
        return self.inner.publish_volume(self._in(local_id), node_id, capability, readonly, secrets=secrets)

    def unpublish_volume(self, local_id: str, node_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        self.inner.unpublish_volume(self._in(local_id), node_id, secrets=secrets)

    # Block access, for a node's backups (when the inner backend declares it).

    @property
    def _blocks(self) -> SnapshotBlocks:
        return cast(SnapshotBlocks, self.inner)

    def allocated(self, local_id: str, start: int = 0, *, secrets: Secrets = NO_SECRETS) -> Iterator[Extent]:
        return self._blocks.allocated(self._in(local_id), start, secrets=secrets)

    def changed(
        self, base_local_id: str, target_local_id: str, start: int = 0, *, secrets: Secrets = NO_SECRETS
    ) -> Iterator[Extent]:
        return self._blocks.changed(self._in(base_local_id), self._in(target_local_id), start, secrets=secrets)

    def read_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> AbstractContextManager[BlockReader]:
        return self._blocks.read_snapshot(self._in(local_id), secrets=secrets)

    def fill_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> AbstractContextManager[BlockWriter]:
        return self._blocks.fill_volume(self._in(local_id), secrets=secrets)


class NodeKeyedConnector:
    """The node half beside ``NodeKeyed``: the volume IDs the node service hands it carry
    the node; the backend's own connector knows them without."""

    def __init__(self, inner: NodeConnector) -> None:
        self.inner = inner

    @staticmethod
    def _in(local_id: str) -> str:
        return ids.split_node(local_id)[1]

    def health(self) -> str | None:
        return self.inner.health()

    def attach(self, local_id: str, request: AttachRequest) -> Attachment:
        return self.inner.attach(self._in(local_id), request)

    def detach(self, local_id: str) -> None:
        self.inner.detach(self._in(local_id))

    def sources(self, local_id: str) -> list[str]:
        return self.inner.sources(self._in(local_id))

    def refresh_size(self, local_id: str, device: str, size: int) -> None:
        self.inner.refresh_size(self._in(local_id), device, size)

    def problem(self, local_id: str) -> str | None:
        return self.inner.problem(self._in(local_id))
