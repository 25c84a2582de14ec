"""Orphans: volumes and snapshots Cairn holds that nothing in Kubernetes refers to.

A volume is Kubernetes' when a PersistentVolume of driver ``cairn.csi.io`` names its ID
(``spec.csi.volumeHandle``); a snapshot when a VolumeSnapshotContent does
(``status.snapshotHandle``, or ``spec.source.snapshotHandle`` for one imported by hand).
Anything else is an orphan: a PV deleted by hand while its volume was kept, a claim whose
delete never reached the driver, a snapshot whose content object was removed. Orphans
are reported, never deleted: only an operator can tell a forgotten volume from one kept
on purpose.

A volume is briefly unreferenced between CreateVolume and the provisioner writing its PV,
so an ID counts as an orphan only when two reads at least ``settle`` seconds apart both
found it unreferenced.

``OrphanWatch`` runs in the controller: it checks every ``interval`` seconds, logs each
orphan once when it is found, and exports ``cairn_orphans{backend,kind}``. The client's
``orphans`` command runs the same check over the CSI endpoint's listings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from csi import DRIVER_NAME, ids, kube
from csi.errors import Unavailable
from csi.registry import Registry

log = logging.getLogger(__name__)

API_TIMEOUT = 30.0
INTERVAL = 300.0
SETTLE = 5.0


class References:
    """The volume and snapshot IDs that Kubernetes objects of this driver name."""

    def __init__(self, core: Any, custom: Any, *, timeout: float = API_TIMEOUT) -> None:
        self.core = core
        self.custom = custom
        self.timeout = timeout

    @classmethod
    def connect(cls, configuration: Any, **options: Any) -> References:
        from kubernetes import client

        api_client = kube.api_client(configuration)
        return cls(client.CoreV1Api(api_client), client.CustomObjectsApi(api_client), **options)

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            return call()
        except ApiException as exc:
            if exc.status == 404 and what != "persistentvolumes":
                return None  # the kind is not installed: nothing of it refers to anything
            raise Unavailable(
                f"cannot list {what}: the Kubernetes API answered {exc.status} {exc.reason or ''}"
            ) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(f"cannot list {what}: the Kubernetes API could not be reached: {exc}") from exc

    def volumes(self) -> set[str]:
        found = self._call("persistentvolumes", lambda: self.core.list_persistent_volume(_request_timeout=self.timeout))
        handles = set()
        for pv in found.items or ():
            source = pv.spec.csi if pv.spec else None
            if source is not None and source.driver == DRIVER_NAME and source.volume_handle:
                handles.add(str(source.volume_handle))
        return handles

    def snapshots(self) -> set[str]:
        found = self._call(
            "volumesnapshotcontents",
            lambda: self.custom.list_cluster_custom_object(
                "snapshot.storage.k8s.io", "v1", "volumesnapshotcontents", _request_timeout=self.timeout
            ),
        )
        handles = set()
        for content in (found or {}).get("items") or ():
            spec = content.get("spec") or {}
            if spec.get("driver") != DRIVER_NAME:
                continue
            for handle in (
                (content.get("status") or {}).get("snapshotHandle"),
                (spec.get("source") or {}).get("snapshotHandle"),
            ):
                if handle:
                    handles.add(str(handle))
        return handles

    def node_orphans(self) -> list[tuple[str, str, str]]:
        """(backend, node, local ID) of what node agents found on their nodes with no
        NodeVolume naming it (lvm on many nodes)."""
        found = self._call(
            "nodestorages",
            lambda: self.custom.list_cluster_custom_object(
                "cairn.csi.io", "v1alpha1", "nodestorages", _request_timeout=self.timeout
            ),
        )
        out = []
        for item in (found or {}).get("items") or ():
            spec = item.get("spec") or {}
            for local_id in spec.get("orphans") or ():
                out.append((str(spec.get("backend")), str(spec.get("node")), str(local_id)))
        return sorted(out)


@dataclass(frozen=True)
class Orphan:
    kind: str  # "volume" or "snapshot"
    id: str

    @property
    def backend(self) -> str:
        return ids.decode(self.id, self.kind).backend


def unused(volumes: Iterable[str], snapshots: Iterable[str], references: References) -> set[Orphan]:
    """The IDs among ``volumes`` and ``snapshots`` that no Kubernetes object names now."""
    used_volumes, used_snapshots = references.volumes(), references.snapshots()
    return {Orphan("volume", v) for v in volumes if v not in used_volumes} | {
        Orphan("snapshot", s) for s in snapshots if s not in used_snapshots
    }


def unreferenced(
    listed: Callable[[], tuple[Iterable[str], Iterable[str]]],
    references: References,
    *,
    settle: float = SETTLE,
    earlier: set[Orphan] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> set[Orphan]:
    """The orphans among the volume and snapshot IDs ``listed`` gives: unreferenced in
    this read and in ``earlier`` (or, without it, in a first read ``settle`` seconds
    before)."""

    if earlier is None:
        earlier = unused(*listed(), references)
        if not earlier:
            return set()
        sleep(settle)
    return unused(*listed(), references) & earlier


class OrphanWatch:
    """The controller's periodic check: a companion of the server (``start``/``stop``)
    and a Prometheus collector of ``cairn_orphans``."""

    def __init__(self, registry: Registry, references: References, *, interval: float = INTERVAL) -> None:
        self.registry = registry
        self.references = references
        self.interval = interval
        self._lock = threading.Lock()
        self._seen: set[Orphan] | None = None  # unreferenced at the last check
        self._orphans: set[Orphan] = set()
        self._ok = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def health_name(self) -> str:
        return "orphan-watch"

    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def listed(self) -> tuple[list[str], list[str]]:
        volumes, snapshots = [], []
        for backend in self.registry:
            if backend.controller is None:
                continue
            volumes += [ids.encode(backend.name, v.local_id) for v in backend.volumes.list_volumes()]
            if backend.capabilities.snapshots:
                snapshots += [ids.encode(backend.name, s.local_id) for s in backend.volumes.list_snapshots()]
        return volumes, snapshots

    def check(self) -> set[Orphan]:
        """One check; what it found unreferenced now is the next check's ``earlier``."""
        found = unused(*self.listed(), self.references)
        with self._lock:
            confirmed = found & self._seen if self._seen is not None else set()
            for orphan in sorted(confirmed - self._orphans, key=lambda o: (o.kind, o.id)):
                log.warning(
                    "%s %s is an orphan: no Kubernetes object of driver %s names it (kept; delete it yourself "
                    "if nothing needs it)",
                    orphan.kind,
                    orphan.id,
                    DRIVER_NAME,
                    extra={"backend": orphan.backend},
                )
            self._orphans = confirmed
            self._seen = found
            self._ok = True
        return confirmed

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "cairn_orphans",
            "Volumes and snapshots no Kubernetes object names, as last checked.",
            labels=("backend", "kind"),
        )

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        with self._lock:
            if self._ok:
                counts: dict[tuple[str, str], int] = {}
                for backend in self.registry:
                    if backend.controller is not None:
                        for kind in ("volume", "snapshot"):
                            counts[(backend.name, kind)] = 0
                for orphan in self._orphans:
                    counts[(orphan.backend, orphan.kind)] = counts.get((orphan.backend, orphan.kind), 0) + 1
                for (name, kind), count in sorted(counts.items()):
                    family.add_metric((name, kind), float(count))
        return [family]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="orphan-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as exc:  # the next check tries again
                log.warning("orphan check failed: %s", exc)
