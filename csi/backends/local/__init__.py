"""The local backend: Cinder's generic file-backed volumes, with no dependency beyond
util-linux and the mkfs tools. Volumes live on the node that runs the driver.

Settings:
    path: directory for images and records (required)
    node: node ID that owns the directory (default: the driver's --node-id)
"""

from __future__ import annotations

from csi.backends.base import Backend
from csi.backends.local.controller import LocalVolumes
from csi.backends.local.node import LocalConnector
from csi.config import BackendConfig
from csi.errors import ConfigError

SETTINGS = frozenset({"path", "node"})


def build(config: BackendConfig, node_id: str, controller: bool) -> Backend:
    unknown = set(config.settings) - SETTINGS
    if unknown:
        raise ConfigError(f"backend {config.name!r}: unknown local settings {sorted(unknown)}")
    path = config.settings.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"backend {config.name!r}: 'path' is required")
    owner = str(config.settings.get("node") or node_id)
    volumes = LocalVolumes(path, owner, recover=controller)
    return Backend(config.name, "local", config.group, volumes, LocalConnector(path))
