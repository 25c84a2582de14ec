"""The nfs backend's settings and the names both halves derive from them."""

from __future__ import annotations

from dataclasses import dataclass

from csi.backends.nfs.paths import CONTROL_DIR, DEFAULT_TEMPLATE

LAYOUTS = ("directory", "image")
ON_DELETE = ("delete", "retain", "archive")
DEFAULT_MOUNT_OPTIONS = ("nfsvers=4.1", "hard")
DEFAULT_PERMISSIONS = 0o777
NODE_MOUNT_DIR = "/var/lib/cairn-csi/nfs"


@dataclass(frozen=True)
class NfsSettings:
    backend: str
    server: str
    share: str
    port: int = 2049
    layout: str = "directory"
    mount_options: tuple[str, ...] = DEFAULT_MOUNT_OPTIONS
    sub_dir: str = DEFAULT_TEMPLATE
    on_delete: str = "delete"
    mount_permissions: int = DEFAULT_PERMISSIONS
    export_root: str = ""
    timeout: float = 30.0
    node_mount_dir: str = NODE_MOUNT_DIR

    @property
    def control(self) -> str:
        """The backend's own folder on the export (relative to the export's root)."""
        return f"{CONTROL_DIR}/{self.backend}"

    def image_path(self, local_id: str) -> str:
        """Where an image volume lives, relative to the export: derived from the ID alone,
        so a node finds it without asking the controller."""
        return f"{self.control}/volumes/{local_id}.img"

    def source(self, path: str = "") -> str:
        """The mount source of a path on the export, as the kernel's client names it."""
        share = self.share.rstrip("/") or ""
        full = f"{share}/{path}" if path else (share or "/")
        host = f"[{self.server}]" if ":" in self.server else self.server
        return f"{host}:{full}"

    def mount_options_for(self, options: tuple[str, ...]) -> tuple[str, ...]:
        """Mount options with the server's port added when it is not the standard one."""
        if self.port != 2049 and not any(o.startswith("port=") for o in options):
            return (*options, f"port={self.port}")
        return options
