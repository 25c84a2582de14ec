"""Prometheus metrics, served over HTTP on ``--metrics-port``.

* ``csi_plugin_operations_seconds`` (histogram): every CSI call, labelled as the CSI
  sidecars label theirs (``driver_name``, ``method_name`` as the full gRPC method,
  ``grpc_status_code``) plus the ``backend`` that served it ("" when none did);
* ``csi_plugin_inflight_operations`` (gauge): calls running now, by ``method_name``;
* ``cairn_backend_healthy`` and ``cairn_backend_free_bytes`` (gauges), in a process that
  serves the controller only: a node plugin has no business asking a storage cluster;
* ``cairn_orphans`` (gauge, ``csi.orphans``) where the controller checks for orphans;
* ``cairn_backups_running``, ``cairn_backup_progress_ratio`` (gauges) and
  ``cairn_backup_read_bytes``, ``cairn_backup_stored_bytes``, ``cairn_backups_ended``
  (counters) from the backup engine (``csi.backup.engine``), in a controller.

The server's interceptor records the calls (``started``/``finished``). Nothing here may
block a scrape: health is each backend's own non-blocking answer (rbd answers from its
background check), and free space is read by a background thread every
``REFRESH_INTERVAL`` seconds and served as last read. This module sits beside
``server.py`` and knows nothing of the services.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
from collections.abc import Iterable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from csi import DRIVER_NAME
from csi.backends.base import Backend
from csi.errors import ConfigError

log = logging.getLogger(__name__)

# csi-lib-utils' buckets, so the plugin's latencies line up with its sidecars'.
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 25.0, 50.0, 120.0, 300.0, 600.0)
REFRESH_INTERVAL = 30.0


class Metrics:
    """The driver's metrics in a registry of their own (with the process, platform and
    GC collectors), served on ``port`` from ``start`` to ``stop``. ``backends`` are the
    ones whose health and free space are exported: pass none in a node plugin."""

    def __init__(
        self,
        port: int,
        backends: Sequence[Backend] = (),
        refresh_interval: float = REFRESH_INTERVAL,
        collectors: Sequence[Collector] = (),
    ) -> None:
        self.port = port
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.operations = Histogram(
            "csi_plugin_operations_seconds",
            "Duration of CSI operations, by method, gRPC status code and backend.",
            ("driver_name", "method_name", "grpc_status_code", "backend"),
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "csi_plugin_inflight_operations",
            "CSI operations running now, by method.",
            ("method_name",),
            registry=self.registry,
        )
        self.backends = BackendGauges(backends, refresh_interval)
        if backends:
            self.registry.register(self.backends)
        for collector in collectors:
            self.registry.register(collector)
        self._http: WSGIServer | None = None

    def started(self, method: str) -> None:
        self.inflight.labels(method_name=method).inc()

    def finished(self, method: str, code: str, backend: str, seconds: float) -> None:
        self.inflight.labels(method_name=method).dec()
        self.operations.labels(
            driver_name=DRIVER_NAME, method_name=method, grpc_status_code=code, backend=backend
        ).observe(seconds)

    def start(self) -> None:
        """Listen on every interface (IPv6 and IPv4 where the host has both)."""
        self._http = listen(self.port, make_wsgi_app(self.registry))
        threading.Thread(target=self._http.serve_forever, name="metrics", daemon=True).start()
        self.backends.start()
        log.info("serving metrics", extra={"port": self._http.server_address[1]})

    def stop(self) -> None:
        self.backends.stop()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class BackendGauges:
    """A collector: ``cairn_backend_healthy{backend,kind}`` asked at each scrape, and
    ``cairn_backend_free_bytes{backend}`` as the refresh thread last read it. A backend
    whose free space could not be read has no value until it can again."""

    def __init__(self, backends: Sequence[Backend], interval: float = REFRESH_INTERVAL) -> None:
        self.watched = list(backends)
        self.interval = interval
        self._lock = threading.Lock()
        self._free: dict[str, float] = {}
        self._failing: dict[str, str] = {}
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        healthy = GaugeMetricFamily(
            "cairn_backend_healthy",
            "Whether the backend reports no problem (1) or one (0).",
            labels=("backend", "kind"),
        )
        free = GaugeMetricFamily(
            "cairn_backend_free_bytes", "Space the backend has for new volumes, as last read.", labels=("backend",)
        )
        return healthy, free

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        healthy, free = self._families()
        for backend in self.watched:
            healthy.add_metric((backend.name, backend.kind), 1.0 if self._healthy(backend) else 0.0)
        with self._lock:
            values = dict(self._free)
        for name, value in values.items():
            free.add_metric((name,), value)
        return healthy, free

    @staticmethod
    def _healthy(backend: Backend) -> bool:
        try:
            return backend.volumes.health() is None
        except Exception:
            log.exception("health check failed", extra={"backend": backend.name})
            return False

    def refresh(self) -> None:
        """Read every backend's free space once; a failure is logged (once until it
        changes) and leaves that backend without a value."""
        for backend in self.watched:
            try:
                value = float(backend.volumes.free_bytes())
            except Exception as exc:
                with self._lock:
                    self._free.pop(backend.name, None)
                problem = str(exc) or type(exc).__name__
                if self._failing.get(backend.name) != problem:
                    log.warning("cannot read free space", extra={"backend": backend.name}, exc_info=True)
                self._failing[backend.name] = problem
                continue
            if self._failing.pop(backend.name, None) is not None:
                log.info("free space readable again", extra={"backend": backend.name})
            with self._lock:
                self._free[backend.name] = value

    def start(self) -> None:
        if self.watched and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="metrics-backends", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # a bug here must not end the thread
                log.exception("refreshing backend metrics failed")
            if self._stopped.wait(self.interval):
                return


class _Quiet(WSGIRequestHandler):
    """No line on stderr for each scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _DualStack(ThreadingWSGIServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def listen(port: int, app: Any) -> WSGIServer:
    """An HTTP server for ``app`` on ``port`` of every interface: IPv6 and IPv4 on one
    socket, or IPv4 alone on a host without IPv6."""
    try:
        try:
            return make_server("::", port, app, _DualStack, handler_class=_Quiet)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
        return make_server("0.0.0.0", port, app, ThreadingWSGIServer, handler_class=_Quiet)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on port {port}: {exc.strerror or exc}") from exc
