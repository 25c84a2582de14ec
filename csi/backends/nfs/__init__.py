"""The nfs backend: volumes on an NFS export, as shared folders (``layout: directory``,
csi-driver-nfs's and Manila's model, ReadWriteMany) or as sparse image files attached
through loop devices (``layout: image``, Cinder's NFS driver: real size, block mode).

Settings:
    server:           the NFS server's host name or address (required)
    share:            the exported path, for example /export (required)
    port:             the server's NFS port (default 2049)
    layout:           directory (default) or image; a backend makes one kind of volume,
                      so what it advertises holds for every volume it makes (only images
                      have blocks to read: backups, restores from them, changed blocks)
    mountOptions:     list of mount options (default nfsvers=4.1, hard)
    subDir:           directory volumes' path under the share, a template with
                      ${pvc.metadata.name}, ${pvc.metadata.namespace}, ${pv.metadata.name}
                      (default ${pv.metadata.name})
    onDelete:         delete (default), retain or archive
    mountPermissions: mode of a new directory volume's folder, octal (default 0777)
    exportRoot:       the exported directory on this host, when the server runs beside the
                      controller: the controller then works on it directly instead of
                      through the user-space client (optional)
    timeout:          seconds before an unanswered call to the server fails (default 30)
    nodeMountDir:     where a node mounts the export for image volumes
                      (default /var/lib/cairn-csi/nfs)
StorageClass parameters: subDir, onDelete, mountOptions (comma-separated), mountPermissions.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from csi import quota
from csi.backends.base import Backend, Capabilities, Expansion
from csi.backends.nfs import paths
from csi.backends.nfs.common import LAYOUTS, NODE_MOUNT_DIR, ON_DELETE, NfsSettings
from csi.backends.nfs.controller import NfsVolumes, parse_mount_options, parse_permissions
from csi.backends.nfs.node import NfsConnector
from csi.config import BackendConfig
from csi.errors import ConfigError, InvalidArgument
from csi.model import AccessMode, AccessType

log = logging.getLogger(__name__)

SETTINGS = frozenset(
    {
        "server",
        "share",
        "port",
        "layout",
        "mountOptions",
        "subDir",
        "onDelete",
        "mountPermissions",
        "exportRoot",
        "timeout",
        "nodeMountDir",
    }
)
_SINGLE_NODE = frozenset(m for m in AccessMode if not m.multi_node)
_CORRUPTS = (
    "{mode} on an image volume's filesystem would corrupt it: ext4 and XFS cannot be mounted read-write by "
    "several nodes at once (use a directory volume, or volumeMode: Block)"
)
DIRECTORY_CAPABILITIES = Capabilities(
    access={AccessType.MOUNT: frozenset(AccessMode)},
    filesystems=frozenset(),
    expansion=Expansion.ONLINE,
    node_expansion=False,
    refusals={
        (AccessType.BLOCK, mode): "a directory volume is a shared folder: it has no block access (use layout: image)"
        for mode in AccessMode
    },
)
IMAGE_CAPABILITIES = Capabilities(
    access={
        AccessType.MOUNT: _SINGLE_NODE | {AccessMode.MULTI_NODE_READER_ONLY},
        AccessType.BLOCK: frozenset(AccessMode),
    },
    blocks=True,  # an image's blocks can be read: backups, restores, changed-block tracking
    refusals={
        (AccessType.MOUNT, mode): _CORRUPTS.format(mode=mode.value)
        for mode in AccessMode
        if mode.multi_node and not mode.read_only
    },
)


def settings_from(config: BackendConfig) -> NfsSettings:
    values: Mapping[str, Any] = config.settings
    where = f"backend {config.name!r}"
    unknown = set(values) - SETTINGS
    if unknown:
        raise ConfigError(f"{where}: unknown nfs settings {sorted(unknown)}")
    for key in ("server", "share"):
        if not isinstance(values.get(key), str) or not values[key]:
            raise ConfigError(f"{where}: {key!r} is required")
    if not str(values["share"]).startswith("/"):
        raise ConfigError(f"{where}: 'share' must be an absolute path on the server, such as /export")
    layout = str(values.get("layout", "directory"))
    if layout not in LAYOUTS:
        raise ConfigError(f"{where}: 'layout' must be one of {', '.join(LAYOUTS)}")
    on_delete = str(values.get("onDelete", "delete"))
    if on_delete not in ON_DELETE:
        raise ConfigError(f"{where}: 'onDelete' must be one of {', '.join(ON_DELETE)}")
    options = values.get("mountOptions", NfsSettings.mount_options)
    if not isinstance(options, list | tuple) or not all(isinstance(o, str) for o in options):
        raise ConfigError(f"{where}: 'mountOptions' must be a list of strings")
    try:
        parsed_options = parse_mount_options(",".join(options))
        paths.check_template(str(values.get("subDir", paths.DEFAULT_TEMPLATE)))
        permissions = parse_permissions(str(values.get("mountPermissions", "0777")), "'mountPermissions'")
    except InvalidArgument as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    try:
        port = int(values.get("port", 2049))
        timeout = float(values.get("timeout", 30))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: 'port' and 'timeout' must be numbers") from exc
    if not 0 < port < 65536 or timeout <= 0:
        raise ConfigError(f"{where}: 'port' must be 1-65535 and 'timeout' positive")
    return NfsSettings(
        backend=config.name,
        server=str(values["server"]),
        share=str(values["share"]),
        port=port,
        layout=layout,
        mount_options=parsed_options,
        sub_dir=str(values.get("subDir", paths.DEFAULT_TEMPLATE)),
        on_delete=on_delete,
        mount_permissions=permissions,
        export_root=str(values.get("exportRoot", "")),
        timeout=timeout,
        node_mount_dir=str(values.get("nodeMountDir", NODE_MOUNT_DIR)),
    )


def controller_for(settings: NfsSettings) -> NfsVolumes:
    """The controller half, on the exported directory itself (``exportRoot``) or through
    the user-space client."""
    if settings.export_root:
        from csi.backends.nfs.fs import LocalTree

        why_not = quota.enforced_at(settings.export_root) if settings.layout == "directory" else None
        if why_not:
            log.warning("backend %s: directory volume sizes are advisory: %s", settings.backend, why_not)
        quota_root = "" if why_not or settings.layout != "directory" else settings.export_root
        return NfsVolumes(settings, LocalTree(settings.export_root), quota_root=quota_root)
    from csi.backends.nfs.libnfs import Client

    def client(uid: int = 0, gid: int = 0) -> Client:
        return Client(settings.server, settings.share, port=settings.port, timeout=settings.timeout, uid=uid, gid=gid)

    where = f"nfs://{settings.server}:{settings.port}{settings.share}"
    return NfsVolumes(settings, LazyClient(client, where), owner_tree=lambda uid, gid: client(uid, gid))


class LazyClient:
    """The user-space client, connected on first use: a server that is down when the
    driver starts does not stop the driver (the client reconnects by itself later)."""

    def __init__(self, connect: Any, where: str) -> None:
        self._connect = connect
        self._where = where
        self._client: Any = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        return self._where

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        with self._lock:
            if self._client is None:
                self._client = self._connect()
        return getattr(self._client, name)


def build(config: BackendConfig, node_id: str, controller: bool, node: bool) -> Backend:
    settings = settings_from(config)
    volumes = connector = None
    if controller:
        volumes = controller_for(settings)
        volumes.recover()
    if node:
        connector = NfsConnector(settings)
    capabilities = DIRECTORY_CAPABILITIES if settings.layout == "directory" else IMAGE_CAPABILITIES
    return Backend(config.name, "nfs", config.group, capabilities, volumes, connector)
