"""The rbd backend: Ceph RBD images through librbd (controller) and krbd, rbd-nbd or
rbd-fuse (node).

Settings:
    monitors:      list of "host:port" (required)
    pool:          pool for volumes and snapshots (required)
    dataPool:      erasure-coded data pool (optional)
    imageFeatures: comma-separated (default layering,exclusive-lock,object-map,fast-diff,deep-flatten)
    mapper:        krbd (default), rbd-nbd or rbd-fuse
    mapOptions:    options for `rbd device map -o` (krbd and rbd-nbd), for example
                   ms_mode=prefer-crc for a cluster that speaks only msgr v2
    maxCloneDepth: flatten clones deeper than this (default 8)
    fuseDir:       where rbd-fuse mounts images on a node (default /var/lib/cairn-csi/rbd-fuse)
    credentialsDir: a directory holding files userID and userKey (a mounted Secret), used
                   by the calls that carry no CSI secret: GetCapacity, ListVolumes,
                   ControllerGetVolume, and the health check (optional; without it
                   ListVolumes and ControllerGetVolume are refused with FAILED_PRECONDITION,
                   GetCapacity answers 0 and the health check is skipped: a call never
                   borrows the credentials another call brought)
Credentials are never settings: they come from the CSI secrets (userID, userKey).
"""

from __future__ import annotations

from csi.backends.base import Backend, Capabilities
from csi.backends.rbd.common import MAPPERS, RbdSettings, parse_features
from csi.config import BackendConfig
from csi.errors import ConfigError, InvalidArgument
from csi.model import AccessMode, AccessType

# A filesystem mounted read-write on two nodes at once is corrupted; shared raw block
# devices are the application's to coordinate (clustered databases, VMs).
_SINGLE_NODE = frozenset(m for m in AccessMode if not m.multi_node)
_CORRUPTS = (
    "{mode} on a filesystem would corrupt it: ext4 and XFS cannot be mounted read-write by several nodes at "
    "once (use volumeMode: Block, or a read-only mode)"
)
CAPABILITIES = Capabilities(
    access={
        AccessType.MOUNT: _SINGLE_NODE | {AccessMode.MULTI_NODE_READER_ONLY},
        AccessType.BLOCK: frozenset(AccessMode),
    },
    refusals={
        (AccessType.MOUNT, mode): _CORRUPTS.format(mode=mode.value)
        for mode in AccessMode
        if mode.multi_node and not mode.read_only
    },
    blocks=True,
)

SETTINGS = frozenset(
    {
        "monitors",
        "pool",
        "dataPool",
        "imageFeatures",
        "mapper",
        "mapOptions",
        "maxCloneDepth",
        "fuseDir",
        "credentialsDir",
    }
)


def settings_from(config: BackendConfig) -> RbdSettings:
    values = config.settings
    where = f"backend {config.name!r}"
    unknown = set(values) - SETTINGS
    if unknown:
        raise ConfigError(f"{where}: unknown rbd settings {sorted(unknown)}")
    monitors = values.get("monitors")
    if not isinstance(monitors, list) or not monitors or not all(isinstance(m, str) for m in monitors):
        raise ConfigError(f"{where}: 'monitors' must be a list of host:port strings")
    if not isinstance(values.get("pool"), str) or not values["pool"]:
        raise ConfigError(f"{where}: 'pool' is required")
    settings = RbdSettings(
        monitors=tuple(monitors),
        pool=values["pool"],
        data_pool=str(values.get("dataPool", "")),
        image_features=str(values.get("imageFeatures", RbdSettings.image_features)),
        mapper=str(values.get("mapper", RbdSettings.mapper)),
        max_clone_depth=int(values.get("maxCloneDepth", RbdSettings.max_clone_depth)),
        fuse_dir=str(values.get("fuseDir", RbdSettings.fuse_dir)),
        credentials_dir=str(values.get("credentialsDir", "")),
        map_options=str(values.get("mapOptions", "")),
    )
    if settings.mapper not in MAPPERS:
        raise ConfigError(f"{where}: 'mapper' must be one of {', '.join(MAPPERS)}")
    try:
        parse_features(settings.image_features)
    except InvalidArgument as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return settings


def build(config: BackendConfig, node_id: str, controller: bool, node: bool) -> Backend:
    """The halves a process's role needs; librados and librbd are loaded only by a
    controller, and the node tools are needed only by a node."""
    settings = settings_from(config)
    volumes = connector = None
    if controller:
        from csi.backends.rbd.cluster import Clusters
        from csi.backends.rbd.controller import RbdVolumes

        volumes = RbdVolumes(settings, Clusters(settings.monitors, settings.credentials_dir))
    if node:
        from csi.backends.rbd.node import RbdConnector

        connector = RbdConnector(settings)
    return Backend(config.name, "rbd", config.group, CAPABILITIES, volumes, connector)
