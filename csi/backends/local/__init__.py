"""The local backend: Cinder's generic file-backed volumes, with no dependency beyond
util-linux and the mkfs tools. Volumes live on the node that runs the driver.

Settings:
    path: directory for images and records (required)
    node: node ID that owns the directory (default: the driver's --node-id)
    nodes: serve the directory on each of these nodes instead, the controller reaching
        each through the Kubernetes API (as lvm does; see ``backends.routed``). Opt-in:
        volumes made by a backend that served one node have IDs without their node.
    nodeSelector: with ``nodes``, labels (name: value) a listed node must also carry
"""

from __future__ import annotations

from csi.backends.base import Backend, Capabilities, Routing
from csi.backends.local.controller import LocalVolumes
from csi.backends.local.layout import Layout
from csi.backends.local.node import LocalConnector
from csi.config import BackendConfig
from csi.errors import ConfigError
from csi.model import AccessMode, AccessType

SETTINGS = frozenset({"path", "node", "nodes", "nodeSelector"})
_SINGLE_NODE = frozenset(m for m in AccessMode if not m.multi_node)
CAPABILITIES = Capabilities(
    access={AccessType.MOUNT: _SINGLE_NODE, AccessType.BLOCK: _SINGLE_NODE},
    node_local=True,
    blocks=True,
    refusals={
        (kind, mode): f"the local backend keeps volumes on one node and cannot offer {mode.value}"
        for kind in AccessType
        for mode in AccessMode
        if mode.multi_node
    },
)


def build(config: BackendConfig, node_id: str, controller: bool, node: bool) -> Backend:
    unknown = set(config.settings) - SETTINGS
    if unknown:
        raise ConfigError(f"backend {config.name!r}: unknown local settings {sorted(unknown)}")
    path = config.settings.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"backend {config.name!r}: 'path' is required")
    owner = str(config.settings.get("node") or node_id)
    # Only the controller removes what crashed creations left (a node plugin on the same
    # host must not, while the controller may be creating).
    volumes = LocalVolumes(path, owner, recover=True) if controller else None
    routing = Routing(_rest, LocalVolumes.volume_parameters, LocalVolumes.snapshot_parameters, node_in_ids=False)
    connector = LocalConnector(path) if node else None
    return Backend(config.name, "local", config.group, CAPABILITIES, volumes, connector, routing=routing)


def _rest(kind: str, name: str) -> str:
    return Layout.local_id("volume" if kind == "volume" else "snapshot", name)
