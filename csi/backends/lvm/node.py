"""Node half of the lvm backend: a volume's LV is activated on the node that holds it,
and its device-mapper node is the block device the node service formats and mounts.

Activation is the whole attach: the controller makes every LV inactive (thin snapshots
also flagged to be skipped by activation at boot), so a rebooted node has nothing active
until a volume is staged again. A new thick volume still tagged ``unwiped`` has the
signatures of whatever filesystem used its extents before wiped at its first attach, so
a blank volume never mounts an old volume's filesystem."""

from __future__ import annotations

import os

from csi import ids, proc
from csi.backends.base import Attachment, AttachRequest
from csi.backends.lvm.lvm import LogicalVolume, Lvm, mapper_path
from csi.backends.lvm.volumes import BACKEND_TAG, UNWIPED_TAG, encode, lv_name
from csi.errors import CairnError, NotFound

WIPE_TIMEOUT = 60.0
POOL_ALERT = 90.0
"""Percent of a thin pool's data or metadata in use from which its volumes are reported
abnormal (NodeGetVolumeStats): the kubelet then emits an event on the pods using them."""


class LvmConnector:
    def __init__(self, backend: str, lvm: Lvm, volume_group: str, pool_alert: float = POOL_ALERT) -> None:
        self.backend = backend
        self.lvm = lvm
        self.vg = volume_group
        self.pool_alert = pool_alert

    def health(self) -> str | None:
        try:
            self.lvm.volume_group(self.vg)
        except Exception as exc:  # any failure to read LVM is the answer
            return f"volume group {self.vg}: {exc}"
        return None

    def _name(self, local_id: str) -> str:
        return lv_name(ids.split_node(local_id)[1])

    def _find(self, local_id: str) -> LogicalVolume | None:
        try:
            found = self.lvm.volume(self.vg, self._name(local_id))
        except NotFound:
            return None
        if found is None or BACKEND_TAG + encode(self.backend) not in found.tags:
            return None
        return found

    def attach(self, local_id: str, request: AttachRequest) -> Attachment:
        found = self._find(local_id)
        if found is None:
            raise NotFound(f"volume {local_id!r} has no logical volume in {self.vg} on this node")
        self.lvm.activate(self.vg, found.name)
        device = mapper_path(self.vg, found.name)
        if UNWIPED_TAG in found.tags:
            proc.run(["wipefs", "--all", "--force", device], timeout=WIPE_TIMEOUT)
            self.lvm.delete_tags(self.vg, found.name, [UNWIPED_TAG])
        return Attachment(device=device)

    def detach(self, local_id: str) -> None:
        found = self._find(local_id)
        if found is not None:
            self.lvm.deactivate(self.vg, found.name)

    def sources(self, local_id: str) -> list[str]:
        device = mapper_path(self.vg, self._name(local_id))
        # A filesystem mount shows the mapper name; a bind of the device node the dm-N node.
        return [device, os.path.realpath(device)] if os.path.exists(device) else [device]

    def refresh_size(self, local_id: str, device: str, size: int) -> None:
        """Nothing to do: lvextend reloads an active LV's table on the host that runs it."""

    def problem(self, local_id: str) -> str | None:
        found = self._find(local_id)
        if found is None:
            return f"its logical volume is gone from volume group {self.vg}"
        if not found.pool:
            return None
        try:
            pool = self.lvm.volume(self.vg, found.pool)
        except CairnError:
            return None  # LVM cannot say now; the volume itself is there
        if pool is None:
            return None
        full = [
            f"{what} {percent:.0f}% full"
            for what, percent in (("data", pool.data_percent), ("metadata", pool.metadata_percent))
            if percent is not None and percent >= self.pool_alert
        ]
        if full:
            return (
                f"thin pool {self.vg}/{found.pool} is {' and '.join(full)}: writes fail once it is full "
                f"(extend the pool, or delete volumes or snapshots in it)"
            )
        return None
