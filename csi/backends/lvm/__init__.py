"""The lvm backend: Cinder's reference driver. Volumes are logical volumes of a volume
group on one node; with a thin pool, snapshots, restores and clones are thin snapshots.

Settings:
    volumeGroup: the volume group (required)
    thinPool: a thin pool in it; without one volumes are thick, and snapshots, clones and
        block access (backups, restores from backups, changed-block tracking) are not
        offered
    node: node ID that holds the volume group. Without it, in a Kubernetes cluster, every
        node running the node plugin (or those ``nodes`` lists) holds a volume group of
        that name, and the controller reaches them through the API (``backends.routed``);
        outside a cluster, the driver's --node-id
    nodes: the node names that hold the volume group (default: every node plugin's node)
    nodeSelector: labels (name: value) a node must carry to serve the backend
    lvmConfig: LVM configuration given to every LVM command (``--config``), such as a
        device filter
    thinPoolAlert: percent of the thin pool's data or metadata in use from which its
        volumes are reported abnormal by NodeGetVolumeStats (default 90)
"""

from __future__ import annotations

import functools

from csi.backends.base import Backend, Capabilities, Routing
from csi.backends.lvm.lvm import Lvm, valid_name
from csi.backends.lvm.node import POOL_ALERT, LvmConnector
from csi.backends.lvm.volumes import LvmVolumes, rest_of
from csi.config import BackendConfig
from csi.errors import ConfigError
from csi.model import AccessMode, AccessType

SETTINGS = frozenset({"volumeGroup", "thinPool", "node", "lvmConfig", "thinPoolAlert"})
ROUTING = frozenset({"nodes", "nodeSelector"})  # read by the driver when it routes the backend
_SINGLE_NODE = frozenset(m for m in AccessMode if not m.multi_node)
_REFUSALS = {
    (kind, mode): f"the lvm backend keeps volumes on one node and cannot offer {mode.value}"
    for kind in AccessType
    for mode in AccessMode
    if mode.multi_node
}


def capabilities(thin: bool) -> Capabilities:
    return Capabilities(
        access={AccessType.MOUNT: _SINGLE_NODE, AccessType.BLOCK: _SINGLE_NODE},
        node_local=True,
        snapshots=thin,
        clones=thin,
        blocks=thin,
        refusals=_REFUSALS,
    )


def build(config: BackendConfig, node_id: str, controller: bool, node: bool) -> Backend:
    unknown = set(config.settings) - SETTINGS - ROUTING
    if unknown:
        raise ConfigError(f"backend {config.name!r}: unknown lvm settings {sorted(unknown)}")
    settings = {key: config.settings.get(key) for key in SETTINGS}
    for key, value in settings.items():
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"backend {config.name!r}: {key!r} must be a string")
    vg, pool = str(settings["volumeGroup"] or ""), str(settings["thinPool"] or "")
    if not valid_name(vg):
        raise ConfigError(f"backend {config.name!r}: 'volumeGroup' must name a volume group, not {vg!r}")
    if pool and not valid_name(pool):
        raise ConfigError(f"backend {config.name!r}: 'thinPool' {pool!r} is not an LVM name")
    lvm = Lvm(str(settings["lvmConfig"] or ""))
    owner = str(settings["node"] or node_id)
    volumes = LvmVolumes(config.name, lvm, vg, pool, owner) if controller else None
    alert = str(settings["thinPoolAlert"] or POOL_ALERT)
    try:
        pool_alert = float(alert)
    except ValueError:
        pool_alert = -1.0
    if not 0 < pool_alert <= 100:
        raise ConfigError(f"backend {config.name!r}: 'thinPoolAlert' must be a percentage from 1 to 100, not {alert!r}")
    connector = LvmConnector(config.name, lvm, vg, pool_alert) if node else None
    return Backend(
        config.name,
        "lvm",
        config.group,
        capabilities(bool(pool)),
        volumes,
        connector,
        routing=Routing(
            functools.partial(rest_of, config.name), LvmVolumes.volume_parameters, LvmVolumes.snapshot_parameters
        ),
    )
