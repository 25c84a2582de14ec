"""Node half of the local backend: a volume's image becomes a block device through a
loop device. The device is found again from the image path, so a restarted node plugin
needs no saved state to detach it."""

from __future__ import annotations

import os

from csi import loopdev
from csi.backends.base import Attachment, AttachRequest
from csi.backends.local.layout import Layout
from csi.errors import NotFound


class LocalConnector:
    def __init__(self, root: str) -> None:
        self.layout = Layout(root)

    def health(self) -> str | None:
        if not os.access(self.layout.root, os.R_OK | os.W_OK | os.X_OK):
            return f"directory {self.layout.root} is not usable on this node"
        return None

    def attach(self, local_id: str, request: AttachRequest) -> Attachment:
        image = self.layout.image("volume", local_id)
        if not os.path.exists(image):
            raise NotFound(f"volume {local_id!r} has no image on this node")
        return Attachment(device=loopdev.attach(image))

    def detach(self, local_id: str) -> None:
        loopdev.detach(self.layout.image("volume", local_id))

    def sources(self, local_id: str) -> list[str]:
        return loopdev.find(self.layout.image("volume", local_id))

    def refresh_size(self, local_id: str, device: str, size: int) -> None:
        loopdev.refresh_size(device)

    def problem(self, local_id: str) -> str | None:
        return None if os.path.exists(self.layout.image("volume", local_id)) else "the volume's backing data is gone"
