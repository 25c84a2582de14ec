"""Node half of the nfs backend, with the kernel's NFS client.

- A directory volume is a share: ``attach`` names its source (``server:/share/subDir``)
  and the node service mounts it on the staging path, then binds it to each target.
- An image volume is a file on the export: the export is mounted once per node under
  ``nodeMountDir`` and shared by every image volume of the backend on this node, and the
  image is attached through a loop device, which the node formats and mounts like any
  block device. The export is unmounted when its last loop device is detached, so the
  loop devices themselves are the count; nothing else is recorded.

Where a volume's source is written down: the publish context (what the controller
said), else the volume context (a statically provisioned volume's attributes). The
connector keeps the source of each directory volume it attached in a small file under
``nodeMountDir``, so a restarted node plugin that lost its records still tells its own
mounts from anyone else's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping

from csi import loopdev, mount
from csi.backends.base import Attachment, AttachRequest
from csi.backends.nfs import paths
from csi.backends.nfs.common import NfsSettings
from csi.backends.nfs.controller import STATIC_PREFIX, check_local_id, is_static, parse_mount_options
from csi.errors import InvalidArgument, NotFound
from csi.files import write_atomically

NFS_FSTYPE = "nfs"


class NfsConnector:
    def __init__(self, settings: NfsSettings) -> None:
        self.settings = settings
        self.export_mount = os.path.join(settings.node_mount_dir, "exports", settings.backend)
        self.sources_dir = os.path.join(settings.node_mount_dir, "volumes", settings.backend)

    def health(self) -> str | None:
        if not any(os.access(os.path.join(d, "mount.nfs"), os.X_OK) for d in ("/sbin", "/usr/sbin")):
            return "mount.nfs is not installed on this node (Debian: nfs-common)"
        return None

    # -- attach ---------------------------------------------------------------------

    def attach(self, local_id: str, request: AttachRequest) -> Attachment:
        context = {**request.volume_context, **request.publish_context}
        options = self.settings.mount_options_for(
            parse_mount_options(context["mountOptions"]) if context.get("mountOptions") else self.settings.mount_options
        )
        if self.settings.layout == "image":
            check_local_id("volume", local_id)
            return self._attach_image(local_id, options, request.capability.access_mode.read_only)
        if is_static(local_id):
            sub_dir = self._static_folder(local_id, request.volume_context)
        else:
            sub_dir = context.get("path") or context.get("subDir") or ""
        if not sub_dir:
            raise InvalidArgument(f"volume {local_id}: neither publish nor volume context names its subDir")
        paths.check_relative(sub_dir, f"volume {local_id} subDir")
        source = self.settings.source(sub_dir)
        self._remember(local_id, source)
        return Attachment(source=source, fstype=NFS_FSTYPE, options=options)

    def _static_folder(self, local_id: str, attributes: Mapping[str, str]) -> str:
        """A statically provisioned folder: its handle (``static:<subDir>``) names it; the
        attributes csi-driver-nfs's PersistentVolumes carry (server, share, subDir) are
        accepted when they agree with the handle and the backend, refused otherwise."""
        sub_dir = local_id[len(STATIC_PREFIX) :]
        expected = {"server": self.settings.server, "share": self.settings.share, "subDir": sub_dir}
        for key, value in expected.items():
            given = attributes.get(key)
            if given is not None and given.rstrip("/") != value.rstrip("/"):
                raise InvalidArgument(
                    f"volume {local_id}: attribute {key}={given!r} disagrees with backend "
                    f"{self.settings.backend!r} and the volume handle ({value!r})"
                )
        return sub_dir

    def _attach_image(self, local_id: str, options: tuple[str, ...], read_only: bool) -> Attachment:
        if not mount.is_mounted(self.export_mount):
            os.makedirs(self.export_mount, exist_ok=True)
            mount.mount(self.settings.source(), self.export_mount, NFS_FSTYPE, options)
        image = self._image(local_id)
        if not os.path.exists(image):
            self._release_export()
            raise NotFound(f"volume {local_id} has no image on export {self.settings.source()}")
        try:
            return Attachment(device=loopdev.attach(image, read_only=read_only))
        except BaseException:
            self._release_export()
            raise

    def _image(self, local_id: str) -> str:
        return os.path.join(self.export_mount, self.settings.image_path(local_id))

    # -- detach ---------------------------------------------------------------------

    def detach(self, local_id: str) -> None:
        if self.settings.layout == "image":
            check_local_id("volume", local_id)
            if mount.is_mounted(self.export_mount):
                loopdev.detach(self._image(local_id))
                self._release_export()
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._source_file(local_id))

    def _release_export(self) -> None:
        """Unmount the export once no loop device of this host uses a file on it."""
        if not mount.is_mounted(self.export_mount):
            return
        prefix = os.path.realpath(self.export_mount) + "/"
        if any(back.startswith(prefix) for back in loopdev.attached().values()):
            return
        mount.unmount(self.export_mount)

    def sources(self, local_id: str) -> list[str]:
        if self.settings.layout == "image":
            check_local_id("volume", local_id)
            return loopdev.find(self._image(local_id)) if mount.is_mounted(self.export_mount) else []
        try:
            with open(self._source_file(local_id), encoding="utf-8") as handle:
                return [handle.read().strip()]
        except (FileNotFoundError, ValueError):
            return []

    def _source_file(self, local_id: str) -> str:
        """Where the source of a directory volume attached here is kept: named by a digest
        of the ID (a static volume's ID holds '/')."""
        return os.path.join(self.sources_dir, hashlib.sha256(local_id.encode()).hexdigest())

    def _remember(self, local_id: str, source: str) -> None:
        os.makedirs(self.sources_dir, exist_ok=True)
        write_atomically(self._source_file(local_id), source.encode())

    def refresh_size(self, local_id: str, device: str, size: int) -> None:
        loopdev.refresh_size(device)

    def problem(self, local_id: str) -> str | None:
        """Whether the image is gone from the export; asked only while the export answers
        (a dead server blocks whatever touches its files), else not known: None."""
        if self.settings.layout != "image" or not mount.is_mounted(self.export_mount):
            return None
        if mount.probe(self.export_mount).condition is not mount.Condition.OK:
            return None  # the staged mount's own probe reports the server's condition
        return None if os.path.exists(self._image(local_id)) else "the volume's image is gone from the export"
