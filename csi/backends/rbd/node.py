"""Node half of the rbd backend: make an image a block device on this host.

* ``krbd`` (default): the kernel's RBD client, through ``rbd device map``.
* ``rbd-nbd``: librbd in a user-space daemon behind an NBD device, for image features
  or Ceph releases the host's kernel client does not support.
* ``rbd-fuse``: where the kernel has neither the rbd nor the nbd module, the image is
  exposed as a file by rbd-fuse and attached through a loop device.

Mappings are found again from the system (krbd's in sysfs, rbd-nbd's through ``rbd
device list``, loop devices' backing files), so a restarted node plugin needs no saved
state to unmap. The Ceph key goes to
the tools in a private 0600 file that is removed as soon as the tool has read it; it
never appears on a command line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

from csi import loopdev, mount, proc
from csi.backends.base import Attachment, AttachRequest
from csi.backends.rbd.common import MAPPERS, Credentials, RbdSettings, image_name, split_id
from csi.errors import (
    CommandBusy,
    CommandFailed,
    CommandNotFound,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from csi.waiting import Backoff

log = logging.getLogger(__name__)

MAP_TIMEOUT = 120.0
KEY_PREFIX = "cairn-key-"
RELEASE_TIMEOUT = 30.0
RESIZE_WAIT = 30.0  # seconds a krbd or rbd-nbd device may take to show a resize of its image


@contextlib.contextmanager
def client_files(key: str) -> Iterator[tuple[str, str]]:
    """A private key file and an empty config file for the Ceph tools (without a config they
    bury their real error under warnings), both removed on leaving."""
    with tempfile.TemporaryDirectory(prefix=f"{KEY_PREFIX}{os.getpid()}-") as directory:
        path = os.path.join(directory, "key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key)
        conf = os.path.join(directory, "ceph.conf")
        with open(conf, "w") as handle:
            handle.write("[global]\n")
        yield path, conf


def remove_orphaned_keys(parent: str | None = None) -> None:
    """Remove the key directories of processes that died inside ``client_files`` (killed
    while a tool read its key): a Ceph key must not outlive the call that brought it."""
    parent = parent or tempfile.gettempdir()
    for entry in os.listdir(parent):
        owner = entry.removeprefix(KEY_PREFIX).split("-", 1)[0]
        if entry.startswith(KEY_PREFIX) and owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


class RbdConnector:
    def __init__(self, settings: RbdSettings) -> None:
        self.settings = settings
        remove_orphaned_keys()

    def health(self) -> str | None:
        tool = {"krbd": "rbd", "rbd-nbd": "rbd-nbd", "rbd-fuse": "rbd-fuse"}[self.settings.mapper]
        if shutil.which(tool) is None:
            return f"{tool} is not installed on this node (mapper {self.settings.mapper})"
        return None

    def _spec(self, local_id: str) -> tuple[str, str]:
        pool, image_uuid = split_id(local_id, "volume")
        return pool, image_name("volume", image_uuid)

    def _fuse_mountpoint(self, pool: str, image: str) -> str:
        return os.path.join(self.settings.fuse_dir, f"{pool}.{image}")

    def _mapped(self, device_type: str, pool: str, image: str) -> str | None:
        """The device that maps the image's head with ``device_type`` (krbd, nbd), or None.
        krbd's mappings are read from sysfs; rbd-nbd's are asked of the rbd tool (they live
        in its daemons' arguments), and only when some nbd device is connected at all:
        starting the tool costs tens of milliseconds per question."""
        if device_type == "krbd":
            return _krbd_device(pool, image)
        if not _nbd_connected():
            return None
        try:
            listed = proc.run(["rbd", "device", "list", "--device-type", device_type, "--format", "json"]).stdout
        except CommandFailed:
            return None  # the tool or the kernel module is absent: nothing can be mapped
        for entry in json.loads(listed or "[]"):
            # krbd lists the image as "name", rbd-nbd as "image"
            named = entry.get("name", entry.get("image"))
            if entry.get("pool") == pool and named == image and entry.get("snap", "-") in ("-", ""):
                return str(entry["device"])
        return None

    def attach(self, local_id: str, request: AttachRequest) -> Attachment:
        return Attachment(device=self._map(local_id, request))

    def _map(self, local_id: str, request: AttachRequest) -> str:
        """The image's block device, mapping it (read-only for a reader-only capability,
        so not even a bug in a pod can write) when it is not mapped yet."""
        pool, image = self._spec(local_id)
        publish_context, secrets = request.publish_context, request.secrets
        read_only = request.capability.access_mode.read_only
        mapper = publish_context.get("mapper") or self.settings.mapper
        if mapper not in MAPPERS:
            raise InvalidArgument(f"mapper {mapper!r} is not one of {', '.join(MAPPERS)}")
        monitors = publish_context.get("monitors") or ",".join(self.settings.monitors)
        if mapper == "rbd-fuse":
            mountpoint = self._fuse_mountpoint(pool, image)
            if mount.is_mounted(mountpoint):
                if fuse_daemons(mountpoint):
                    return loopdev.attach(os.path.join(mountpoint, image), read_only=read_only)
                # Its rbd-fuse died with an earlier node plugin (a restarted container, a
                # stage cut short): the mount answers nothing. It goes, and a new one comes.
                log.warning("replacing an rbd-fuse mount whose daemon is gone", extra={"mountpoint": mountpoint})
                self._release_fuse(pool, image)
        else:
            existing = self._mapped("krbd" if mapper == "krbd" else "nbd", pool, image)
            if existing:
                return existing
        credentials = Credentials.from_secrets(secrets)
        if credentials is None:
            raise InvalidArgument(f"staging volume {local_id} needs the node-stage secret (userID, userKey)")
        options = publish_context.get("mapOptions", self.settings.map_options)
        with client_files(credentials.key) as (key, conf):
            auth = ["-c", conf, "-m", monitors, "--id", credentials.user, "--keyfile", key]
            if mapper == "rbd-fuse":
                return self._attach_fuse(pool, image, auth, read_only)
            device_type = "krbd" if mapper == "krbd" else "nbd"
            ro = ["--read-only"] if read_only else []
            try:
                out = proc.run(
                    ["rbd", "device", "map", *_rbd_device_args(device_type, options), *ro, *auth, f"{pool}/{image}"],
                    timeout=MAP_TIMEOUT,
                )
            except CommandNotFound as exc:
                raise NotFound(f"image {pool}/{image} does not exist ({exc.stderr})") from exc
            except CommandFailed as exc:
                # rbd-nbd reports only its exit status: ask whether the image is there.
                try:
                    proc.run(["rbd", "info", *auth, f"{pool}/{image}"], timeout=MAP_TIMEOUT)
                except CommandNotFound as missing:
                    raise NotFound(f"image {pool}/{image} does not exist ({missing.stderr})") from exc
                except CommandFailed:
                    pass  # the mapping's own failure says more
                raise FailedPrecondition(
                    f"{mapper} cannot map {pool}/{image} on this node ({exc.stderr}; ran {' '.join(exc.argv)}); "
                    "does the kernel have the "
                    f"{'rbd' if mapper == 'krbd' else 'nbd'} module? The rbd-fuse mapper needs neither"
                ) from exc
            return out.stdout.strip()

    def _attach_fuse(self, pool: str, image: str, auth: list[str], read_only: bool) -> str:
        mountpoint = self._fuse_mountpoint(pool, image)
        os.makedirs(mountpoint, exist_ok=True)
        try:
            proc.run(["rbd-fuse", *auth, "-p", pool, "-r", image, mountpoint], timeout=MAP_TIMEOUT)
        except CommandFailed as exc:
            raise Unavailable(f"rbd-fuse cannot expose {pool}/{image}: {exc.stderr}") from exc
        try:
            if not _exposed(os.path.join(mountpoint, image)):
                raise NotFound(f"image {pool}/{image} does not exist (rbd-fuse exposes no such file)")
            return loopdev.attach(os.path.join(mountpoint, image), read_only=read_only)
        except BaseException:
            mount.unmount(mountpoint)
            raise

    def detach(self, local_id: str) -> None:
        pool, image = self._spec(local_id)
        for device_type in ("krbd", "nbd"):
            device = self._mapped(device_type, pool, image)
            if device:
                proc.run(["rbd", "device", "unmap", *_rbd_device_args(device_type), device], timeout=MAP_TIMEOUT)
                self._wait_until_released(device_type, pool, image, device)
        self._release_fuse(pool, image)

    def _release_fuse(self, pool: str, image: str) -> None:
        """Detach the loop device over the image's rbd-fuse file, unmount it, and wait
        for its rbd-fuse to exit; nothing when it is not mounted."""
        mountpoint = self._fuse_mountpoint(pool, image)
        if mount.is_mounted(mountpoint):
            with proc.Exits(fuse_daemons(mountpoint)) as daemons:
                loopdev.detach(os.path.join(mountpoint, image))
                # The kernel lets go of a detached loop device's file a moment later.
                deadline = time.monotonic() + RELEASE_TIMEOUT
                backoff = Backoff()
                while True:
                    try:
                        mount.unmount(mountpoint)
                        break
                    except CommandBusy:
                        if time.monotonic() > deadline:
                            raise
                        backoff.sleep()
                # rbd-fuse closes the image as it exits, a moment after its unmount; until
                # then Ceph calls the image busy, and a DeleteVolume right after the unstage
                # fails.
                if not daemons.wait(max(0.0, deadline - time.monotonic())):
                    raise Unavailable(f"rbd-fuse still holds {pool}/{image} {RELEASE_TIMEOUT:g}s after its unmount")
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(mountpoint)

    def sources(self, local_id: str) -> list[str]:
        pool, image = self._spec(local_id)
        mapped = [self._mapped(device_type, pool, image) for device_type in ("krbd", "nbd")]
        found = [device for device in mapped if device]
        if mount.is_mounted(self._fuse_mountpoint(pool, image)):
            found += loopdev.find(os.path.join(self._fuse_mountpoint(pool, image), image))
        return found

    def _wait_until_released(self, device_type: str, pool: str, image: str, device: str) -> None:
        """Unmapping returns before an rbd-nbd daemon has exited and closed the image; until
        it has, Ceph calls the image busy. Unstage answers only when the mapping is gone."""
        pid_file = os.path.join(SYSFS_BLOCK, os.path.basename(device), "pid")
        deadline = time.monotonic() + RELEASE_TIMEOUT
        backoff = Backoff()
        while self._mapped(device_type, pool, image) or (device_type == "nbd" and os.path.exists(pid_file)):
            if time.monotonic() > deadline:
                raise Unavailable(f"{device} still maps {pool}/{image} {RELEASE_TIMEOUT:g}s after unmapping")
            backoff.sleep()

    def refresh_size(self, local_id: str, device: str, size: int) -> None:
        # A loop device over rbd-fuse must be told (rbd-fuse reads the new size when the
        # file is opened again). krbd and rbd-nbd follow a resize by themselves, when the
        # image's watch notifies them, a moment after ControllerExpandVolume answered: wait
        # for the size the CO expects (bounded; growing a filesystem first would grow it to
        # the old size).
        if os.path.basename(device).startswith("loop"):
            loopdev.refresh_size(device)
            return
        deadline = time.monotonic() + RESIZE_WAIT
        backoff = Backoff()
        while size and mount.device_size(device) < size and time.monotonic() < deadline:
            backoff.sleep()

    def problem(self, local_id: str) -> str | None:
        pool, image = self._spec(local_id)
        if (
            self._mapped("krbd", pool, image)
            or self._mapped("nbd", pool, image)
            or mount.is_mounted(self._fuse_mountpoint(pool, image))
        ):
            return None
        return f"image {pool}/{image} is no longer mapped on this node"


SYSFS_RBD = "/sys/bus/rbd/devices"
"""The kernel RBD client's mappings: one folder per device (``/dev/rbd<id>``), with the
files ``pool``, ``pool_ns``, ``name`` and ``current_snap`` ("-" for the image's head)."""
SYSFS_BLOCK = "/sys/block"


def _sysfs_value(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return None  # unmapped meanwhile, or an attribute this kernel lacks


def _krbd_device(pool: str, image: str) -> str | None:
    """The krbd device that maps ``pool/image`` (its head, in no namespace), or None."""
    try:
        entries = sorted(os.listdir(SYSFS_RBD))
    except OSError:
        return None  # no rbd module: nothing is mapped by it
    for entry in entries:
        folder = os.path.join(SYSFS_RBD, entry)
        if (
            _sysfs_value(os.path.join(folder, "pool")) == pool
            and _sysfs_value(os.path.join(folder, "name")) == image
            and _sysfs_value(os.path.join(folder, "current_snap")) in ("-", None)
            and not _sysfs_value(os.path.join(folder, "pool_ns"))
        ):
            return f"/dev/rbd{entry}"
    return None


def _nbd_connected() -> bool:
    """Whether any nbd device is connected (its daemon's pid shows in sysfs)."""
    try:
        entries = os.listdir(SYSFS_BLOCK)
    except OSError:
        return False
    return any(e.startswith("nbd") and os.path.exists(os.path.join(SYSFS_BLOCK, e, "pid")) for e in entries)


def fuse_daemons(mountpoint: str) -> list[int]:
    """The rbd-fuse processes serving ``mountpoint`` (read from /proc: rbd-fuse leaves
    no record of its own)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if argv and os.path.basename(argv[0]) == b"rbd-fuse" and mountpoint.encode() in argv:
            found.append(int(entry))
    return found


def _exposed(path: str) -> bool:
    """Whether rbd-fuse exposes ``path``: it starts even for a pool or image that does
    not exist, and then serves nothing (or drops the connection)."""
    try:
        return os.path.isfile(path)
    except OSError:
        return False


def _rbd_device_args(device_type: str, options: str = "") -> list[str]:
    """The rbd tool's arguments for a device type and the operator's map options. krbd is
    the tool's default type. By default it waits for udev to announce the device, which
    hangs where no udev daemon answers (a node plugin's container); the kernel makes the
    device node by itself, so krbd maps and unmaps skip that wait."""
    if device_type == "krbd":
        return ["--options", ",".join(filter(None, ["noudev", options]))]
    return ["--device-type", device_type, *(["--options", options] if options else [])]
