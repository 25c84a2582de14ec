"""Which node IDs belong to nodes that run the Cairn node plugin.

CSI asks ControllerPublishVolume to answer NOT_FOUND for a node that does not exist. A
backend alone often cannot tell (any node can reach a Ceph cluster); inside Kubernetes the
CSINode objects can. Kubelet registers the node plugin there: the CSINode named after the
node lists driver ``cairn.csi.io`` with the node ID NodeGetInfo reported, which is the
node ID the external-attacher publishes to.

``KubernetesNodes`` accepts a node ID when

1. the CSINode named like the ID lists ``cairn.csi.io`` with that node ID (the chart makes
   the node ID the node's name, so this one GET answers nearly every call), or
2. some CSINode lists ``cairn.csi.io`` with that node ID (a node ID other than the node
   name). The list is kept for ``ttl`` seconds; a miss lists again, at most every
   ``relist`` seconds, so a node that just registered is found and a publish storm to
   unknown nodes costs the API one list every few seconds.

An accepted ID is remembered for ``ttl`` seconds, so a storm of publishes to one node
costs one GET. Only a definite answer refuses a node (NotFound); an API that does not
answer in time, answers with an error, or refuses the controller's token is
``Unavailable``, which the CO retries: an API hiccup never refuses a real node for good.

Outside Kubernetes there is no directory: every node ID is accepted, and a made-up one
fails where it is used, at NodeStage on that node. The ``kubernetes`` client is imported
only when a directory is built, so a node plugin never loads it.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from csi import DRIVER_NAME, kube
from csi.errors import NotFound, Unavailable

if TYPE_CHECKING:
    from kubernetes.client import Configuration

log = logging.getLogger(__name__)

API_TIMEOUT = 5.0  # seconds for one API request (connect and read)
TTL = 30.0  # seconds an accepted node ID, or the list of CSINodes, is trusted
RELIST = 5.0  # seconds between two lists of CSINodes caused by misses
# A Kubernetes object name (DNS subdomain, RFC 1123): other node IDs can only be found by listing.
_OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
T = TypeVar("T")


class NodeDirectory(Protocol):
    def require(self, node_id: str) -> None:
        """Return when ``node_id`` is a node that runs the Cairn node plugin. Raise
        NotFound when it is known not to be, Unavailable when that cannot be told now."""


class KubernetesNodes:
    """The CSINode objects of the cluster, read through a ``kubernetes`` StorageV1Api."""

    def __init__(
        self,
        api: Any,
        *,
        timeout: float = API_TIMEOUT,
        ttl: float = TTL,
        relist: float = RELIST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.timeout = timeout
        self.ttl = ttl
        self.relist = relist
        self.clock = clock
        self._lock = threading.Lock()
        self._accepted: dict[str, float] = {}  # node ID -> when it was last found
        self._list_lock = threading.Lock()  # one list at a time; callers that waited reuse it
        self._listed: dict[str, str] = {}  # node ID -> CSINode name, for every node running Cairn
        self._listed_at = -math.inf

    @classmethod
    def connect(cls, *, kubeconfig: bool = False, **options: Any) -> KubernetesNodes:
        """A directory for the cluster this process runs in (its service account), or,
        with ``kubeconfig``, outside a cluster, the one the current kubeconfig context
        names. ConfigError when neither is available."""
        return cls.from_configuration(kube.configuration(kubeconfig=kubeconfig, purpose="node checks"), **options)

    @classmethod
    def from_configuration(cls, configuration: Configuration, **options: Any) -> KubernetesNodes:
        from kubernetes import client

        # One retry of a failed connection (an API server restarting), no more: every
        # request is bounded by the timeout, and the CO retries the call itself.
        configuration.retries = 1
        return cls(client.StorageV1Api(kube.api_client(configuration)), **options)

    def require(self, node_id: str) -> None:
        with self._lock:
            found_at = self._accepted.get(node_id)
        if found_at is not None and self.clock() - found_at < self.ttl:
            return
        problem = f"node {node_id!r} does not exist: no CSINode lists driver {DRIVER_NAME} with that node ID"
        if _OBJECT_NAME.match(node_id) and len(node_id) <= 253:
            csinode = self._call(node_id, lambda: self.api.read_csi_node(node_id, _request_timeout=self.timeout))
            if csinode is not None:
                registered = _cairn_node_ids(csinode)
                if node_id in registered:
                    self._accept(node_id)
                    return
                if registered:
                    problem = (
                        f"node {node_id!r} is not a Cairn node ID: the Cairn node plugin on node {node_id} "
                        f"registered as {registered[0]!r}, and no CSINode lists that ID"
                    )
                else:
                    problem = (
                        f"node {node_id!r} does not run the Cairn node plugin: "
                        f"its CSINode lists no driver {DRIVER_NAME}"
                    )
        if self._listed_with(node_id):
            self._accept(node_id)
            return
        raise NotFound(problem)

    def _accept(self, node_id: str) -> None:
        with self._lock:
            self._accepted[node_id] = self.clock()

    def _listed_with(self, node_id: str) -> bool:
        """Whether some CSINode lists Cairn with ``node_id``; lists again when the last
        list is older than ``ttl``, or older than ``relist`` and does not have it."""
        with self._list_lock:
            age = self.clock() - self._listed_at
            if age >= self.ttl or (node_id not in self._listed and age >= self.relist):
                # Served from the API server's cache (resourceVersion 0): a few KiB per node.
                found = self._call(
                    node_id,
                    lambda: self.api.list_csi_node(resource_version="0", _request_timeout=self.timeout),
                )
                items = (found.items if found is not None else None) or []
                self._listed = {cairn_id: item.metadata.name for item in items for cairn_id in _cairn_node_ids(item)}
                self._listed_at = self.clock()
            return node_id in self._listed

    def _call(self, node_id: str, call: Callable[[], T]) -> T | None:
        """``call``'s answer, None when the API says the object does not exist (404), or
        Unavailable for any other failure."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        what = f"cannot tell whether node {node_id!r} runs the Cairn node plugin"
        try:
            return call()
        except ApiException as exc:
            if exc.status == 404:
                return None
            hint = ""
            if exc.status in (401, 403):
                hint = " (the controller's ClusterRole must allow get and list on storage.k8s.io csinodes)"
            raise Unavailable(
                f"{what}: the Kubernetes API answered {exc.status} {exc.reason or ''}".rstrip() + hint
            ) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(
                f"{what}: the Kubernetes API could not be reached (timeout {self.timeout:g}s): {exc}"
            ) from exc


def _cairn_node_ids(csinode: Any) -> list[str]:
    """The node IDs under which Cairn's node plugin registered in ``csinode``: each entry
    for the driver, its nodeID (the node's name where an entry has none)."""
    drivers = (csinode.spec.drivers if csinode.spec else None) or []
    return [driver.node_id or csinode.metadata.name for driver in drivers if driver.name == DRIVER_NAME]
