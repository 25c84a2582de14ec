"""Connections to Ceph clusters, and the one place Ceph errors become domain errors.

A connection (librados handle) costs a monitor session and a thread pool, so it is opened
once per cluster and credential and reused by every call: ``Clusters.ioctx`` hands out an
I/O context per pool from the cached connection. Keys never leave this module: they are
given to librados in memory (no keyring file, nothing on a command line), and connections
are cached under a hash of the credential, not the key itself.

A call runs with the credentials it brought (its CSI secret) or, when it brought none, with
the backend's own (``credentialsDir``); never with those of another call. StorageClasses
may name different Ceph users, and a tenant's call must not borrow another's key.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import rados
import rbd

from csi.backends.rbd.common import USER_ID, USER_KEY, Credentials
from csi.errors import (
    AlreadyExists,
    CairnError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 30
T = TypeVar("T")


def classify(exc: BaseException, what: str) -> CairnError:
    """The domain error for a librados or librbd failure concerning ``what``."""
    if isinstance(exc, (rbd.ImageNotFound, rados.ObjectNotFound)):
        return NotFound(f"{what} does not exist")
    if isinstance(exc, (rbd.ImageExists, rados.ObjectExists)):
        return AlreadyExists(f"{what} already exists")
    if isinstance(exc, (rbd.ImageBusy, rbd.ImageHasSnapshots)):
        return FailedPrecondition(f"{what} is in use: {exc}")
    if isinstance(exc, (rbd.NoSpace, rados.NoSpace)):
        return ResourceExhausted(f"no space for {what}: {exc}")
    if isinstance(exc, (rbd.InvalidArgument, rados.InvalidArgumentError)):
        return InvalidArgument(f"{what}: {exc}")
    if isinstance(exc, (rbd.PermissionError, rados.PermissionError, rados.PermissionDeniedError)):
        return FailedPrecondition(f"the Ceph user may not act on {what}: {exc}")
    if isinstance(exc, (rbd.Timeout, rados.TimedOut)):
        return DeadlineExceeded(f"Ceph did not answer in time about {what}")
    return Unavailable(f"Ceph failed on {what}: {exc}")


def ceph_call(what: str, call: Callable[[], T]) -> T:
    """Run ``call``, turning Ceph's exceptions into domain errors that name ``what``."""
    try:
        return call()
    except (rados.Error, rbd.Error) as exc:
        raise classify(exc, what) from exc


class Clusters:
    """Open connections, one per (monitors, credential); thread-safe."""

    def __init__(self, monitors: Sequence[str], credentials_dir: str = "") -> None:
        self.monitors = ",".join(monitors)
        self.credentials_dir = credentials_dir
        self._connections: dict[str, rados.Rados] = {}
        self._lock = threading.Lock()
        self._connecting: dict[str, threading.Lock] = {}
        self.on_connect: Callable[[rados.Rados], None] | None = None

    def connection(self, credentials: Credentials | None) -> rados.Rados:
        """The connection for ``credentials``. A call that carries no secret (GetCapacity,
        ListVolumes and ControllerGetVolume never do) uses the credentials directory when
        the backend has one, read on each call so a rotated Secret takes effect. Without
        one it is refused: it never runs with the credentials another call brought."""
        credentials = credentials or self._from_directory()
        if credentials is None:
            raise FailedPrecondition(
                f"no Ceph credentials for {self.monitors}: the call carries no CSI secret with "
                f"{USER_ID!r} and {USER_KEY!r} (the StorageClass's csi.storage.k8s.io/*-secret-name "
                "parameters name it), and the backend has no credentialsDir for calls without one"
            )
        # One lock per credential: connecting with a wrong key takes librados' whole timeout,
        # and must hold up only the calls that bring that same key.
        with self._lock:
            cached = self._connections.get(credentials.fingerprint)
            if cached is not None:
                return cached
            connecting = self._connecting.setdefault(credentials.fingerprint, threading.Lock())
        with connecting:
            with self._lock:
                cached = self._connections.get(credentials.fingerprint)
            if cached is None:
                cached = self._connect(credentials)
                with self._lock:
                    self._connections[credentials.fingerprint] = cached
                if self.on_connect is not None:
                    self.on_connect(cached)
            return cached

    def has_default_credentials(self) -> bool:
        """Whether calls without secrets have credentials of their own (credentialsDir)."""
        return bool(self.credentials_dir)

    def _from_directory(self) -> Credentials | None:
        if not self.credentials_dir:
            return None
        try:
            values = {k: Path(self.credentials_dir, k).read_text().strip() for k in (USER_ID, USER_KEY)}
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot read Ceph credentials from {self.credentials_dir}: {exc.strerror}"
            ) from exc
        return Credentials.from_secrets(values)

    def _connect(self, credentials: Credentials) -> rados.Rados:
        conf = {
            "mon_host": self.monitors,
            "key": credentials.key,
            "client_mount_timeout": str(TIMEOUT_SECONDS),
            "rados_mon_op_timeout": str(TIMEOUT_SECONDS),
            "rados_osd_op_timeout": str(TIMEOUT_SECONDS),
            "log_to_stderr": "false",
        }
        handle = rados.Rados(rados_id=credentials.user, conffile=None, conf=conf)
        # librados keeps retrying a refused key until the timeout, so a timeout here
        # means either cause; the message names both.
        what = f"the connection to {self.monitors} as {credentials.user} (monitors unreachable, or the key refused)"
        ceph_call(what, lambda: handle.connect(timeout=TIMEOUT_SECONDS))
        log.info("connected to Ceph", extra={"monitors": self.monitors, "user": credentials.user})
        return handle

    @contextlib.contextmanager
    def ioctx(self, pool: str, credentials: Credentials | None) -> Iterator[Any]:
        connection = self.connection(credentials)
        io = ceph_call(f"pool {pool!r}", lambda: connection.open_ioctx(pool))
        try:
            yield io
        finally:
            io.close()

    def shutdown(self) -> None:
        with self._lock:
            for handle in self._connections.values():
                handle.shutdown()
            self._connections.clear()
