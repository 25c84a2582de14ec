"""The gRPC server: endpoint parsing, one interceptor that logs every call with its
secrets stripped, tags its log lines with a request ID, records its metrics and turns
exceptions into status codes, the standard health service (readiness, liveness and the
state of companion servers such as the kubelet registration), and a graceful stop that
removes the socket."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from csi import log as calls
from csi import status
from csi.errors import ConfigError
from csi.files import remove_stale_socket
from csi.generated import csi_pb2 as pb
from csi.generated import csi_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

STRIPPED = "***stripped***"
# Called every few seconds by the sidecars and kubelet: their summary line is at debug level.
_QUIET = {
    "Probe",
    "GetPluginInfo",
    "GetPluginCapabilities",
    "ControllerGetCapabilities",
    "NodeGetCapabilities",
    "NodeGetInfo",
    "GetCapacity",
}


# Longest string logged whole; a hostile request may carry megabytes in one field.
LOGGED_CHARS = 512

# gRPC metadata a client may send to name its call in the driver's log; longer is cut.
REQUEST_ID_KEY = "x-request-id"
REQUEST_ID_CHARS = 64
# Request fields naming what a call acts on, in its summary line ("name" is renamed:
# a log record reserves it), each cut to OBJECT_CHARS.
OBJECT_FIELDS = {
    "name": "request_name",
    "volume_id": "volume_id",
    "source_volume_id": "source_volume_id",
    "snapshot_id": "snapshot_id",
    "node_id": "node_id",
}
OBJECT_CHARS = 128


def redacted(message: Message) -> dict[str, Any]:
    """The message as a dict, with every field the spec marks ``csi_secret`` replaced,
    enum values the schema does not know shown as numbers, and long strings shortened."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.GetOptions().Extensions[pb.csi_secret]:  # type: ignore[index]
            out[field.name] = STRIPPED
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = {
                _short(k): (redacted(v) if isinstance(v, Message) else _short(v)) for k, v in value.items()
            }
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            out[field.name] = [redacted(v) for v in value] if _repeated(field) else redacted(value)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            names = field.enum_type.values_by_number
            out[field.name] = [_enum(names, v) for v in value] if _repeated(field) else _enum(names, value)
        else:
            out[field.name] = [_short(v) for v in value] if _repeated(field) else _short(value)
    return out


def _enum(names: Mapping[int, Any], number: int) -> str | int:
    known = names.get(number)
    return str(known.name) if known is not None else number


def _short(value: Any) -> Any:
    if isinstance(value, (str, bytes)) and len(value) > LOGGED_CHARS:
        return f"{value[:LOGGED_CHARS]!r}... ({len(value)} long)"
    return value


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _described(message: Message) -> dict[str, Any]:
    """``redacted``, or a note when even that fails: logging never fails a call."""
    try:
        return redacted(message)
    except Exception as exc:
        log.exception("cannot describe a %s for the log", type(message).__name__)
        return {"unloggable": type(exc).__name__}


def request_id(context: grpc.ServicerContext) -> str:
    """The client's ``x-request-id`` (its printable characters, at most 64), or a new
    random ID."""
    with contextlib.suppress(Exception):
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_KEY and isinstance(value, str):
                given = "".join(c for c in value[:REQUEST_ID_CHARS] if c.isprintable()).strip()
                if given:
                    return given
    return secrets.token_hex(8)


def acted_on(request: Message) -> dict[str, str]:
    """The names and IDs in ``request`` that say what the call acts on."""
    fields = request.DESCRIPTOR.fields_by_name
    found = {}
    for field, key in OBJECT_FIELDS.items():
        value = getattr(request, field) if field in fields else None
        if isinstance(value, str) and value:
            found[key] = value[:OBJECT_CHARS]
    return found


def _log(level: int, message: str, extra: Mapping[str, Any], exc_info: BaseException | None = None) -> None:
    """Log, never raising: a broken handler, filter or formatter must not fail a call."""
    try:
        log.log(level, message, extra=extra, exc_info=exc_info)
    except Exception:
        with contextlib.suppress(Exception):
            log.exception("cannot log %r", message)


def _body(rpc: str, message: str, key: str, body: Message) -> None:
    """A request or response at debug level, secrets stripped; never raising."""
    with contextlib.suppress(Exception):
        if log.isEnabledFor(logging.DEBUG):
            _log(logging.DEBUG, message, {"rpc": rpc, key: _described(body)})


class CallMetrics(Protocol):
    """What records each call's metrics (``csi.metrics.Metrics``), served from ``start``
    to ``stop``."""

    def started(self, method: str) -> None: ...

    def finished(self, method: str, code: str, backend: str, seconds: float) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class CallInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Runs each unary call in its log context (request ID, backend), logs its request
    and response at debug level and one summary line, records its metrics, and maps
    whatever it raises through ``status.to_status``. Neither the log nor the metrics
    can fail a call."""

    def __init__(self, metrics: CallMetrics | None = None) -> None:
        self.metrics = metrics
        self._running: dict[int, tuple[str, str, dict[str, str], float]] = {}
        self._running_lock = threading.Lock()
        self._numbers = itertools.count()

    def running(self) -> list[str]:
        """The calls being served now: each one's RPC, request ID, what it acts on and
        how long it has run."""
        now = time.monotonic()
        with self._running_lock:
            running = sorted(self._running.values(), key=lambda c: c[3])
        return [
            " ".join([rpc, f"request_id={request}", *(f"{k}={v}" for k, v in objects.items()), f"({now - t:.1f}s)"])
            for rpc, request, objects, t in running
        ]

    def _enter(self, rpc: str, request: Message, started: float) -> int:
        number = next(self._numbers)
        try:
            objects = acted_on(request)
        except Exception:
            objects = {}
        with self._running_lock:
            self._running[number] = (rpc, calls.request_id() or "", objects, started)
        return number

    def _leave(self, number: int) -> None:
        with self._running_lock:
            self._running.pop(number, None)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or (handler.unary_unary is None and handler.unary_stream is None):
            return handler
        method: str = details.method
        rpc = method.rsplit("/", 1)[-1]
        if handler.unary_unary is None:
            # A call answered with a stream (SnapshotMetadata): served the same way, its
            # summary once the stream ends or the caller leaves it.
            inner_stream = handler.unary_stream

            def stream(request: Message, context: grpc.ServicerContext) -> Iterator[Message]:
                with self._serving(rpc, method, request, context):
                    for response in inner_stream(request, context):
                        _body(rpc, "answer", "response", response)
                        yield response

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        inner = handler.unary_unary

        def call(request: Message, context: grpc.ServicerContext) -> Message:
            with self._serving(rpc, method, request, context):
                response: Message = inner(request, context)
                _body(rpc, "answer", "response", response)
                return response

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    @contextlib.contextmanager
    def _serving(self, rpc: str, method: str, request: Message, context: grpc.ServicerContext) -> Iterator[None]:
        """One call in its log context, logged, recorded, and ended with the mapped code
        of whatever it raises."""
        started = time.monotonic()
        with calls.call_context(request_id(context)):
            number = self._enter(rpc, request, started)
            self._record(lambda m: m.started(method))
            code, message = grpc.StatusCode.OK, ""
            failure: Exception | None = None
            try:
                _body(rpc, "call", "request", request)
                yield
            except Exception as exc:
                code, message = status.to_status(exc)
                failure = exc
                context.abort(code, message)
                raise  # abort() always raises; this line is never reached
            finally:
                seconds = time.monotonic() - started
                backend = calls.backend()
                self._summary(rpc, request, code, message, failure, seconds, backend)
                self._record(lambda m: m.finished(method, code.name, backend, seconds))
                self._leave(number)

    @staticmethod
    def _summary(
        rpc: str,
        request: Message,
        code: grpc.StatusCode,
        message: str,
        failure: BaseException | None,
        seconds: float,
        backend: str,
    ) -> None:
        """One line per call: at info level (debug for the frequent calls) when it
        succeeded, info when it failed, error with the traceback when it was a bug."""
        try:
            extra: dict[str, Any] = {"rpc": rpc, "code": code.name, "seconds": round(seconds, 3), **acted_on(request)}
        except Exception:
            extra = {"rpc": rpc, "code": code.name, "seconds": round(seconds, 3)}
        if backend:
            extra["backend"] = backend
        if failure is None:
            _log(logging.DEBUG if rpc in _QUIET else logging.INFO, "done", extra)
        elif code is grpc.StatusCode.INTERNAL:
            _log(logging.ERROR, "failed", {**extra, "error": message}, exc_info=failure)
        else:
            _log(logging.INFO, "failed", {**extra, "error": message})

    def _record(self, action: Callable[[CallMetrics], None]) -> None:
        if self.metrics is None:
            return
        try:
            action(self.metrics)
        except Exception as exc:
            _log(logging.WARNING, "cannot record metrics", {}, exc_info=exc)


@dataclass(frozen=True)
class Endpoint:
    address: str
    socket_path: str | None


def parse_endpoint(endpoint: str) -> Endpoint:
    """``unix:///path/csi.sock`` (or ``unix:/path``) or ``tcp://host:port``."""
    if endpoint.startswith("unix:"):
        path = "/" + endpoint.removeprefix("unix:").lstrip("/")
        return Endpoint(f"unix://{path}", path)
    if endpoint.startswith("tcp://"):
        return Endpoint(endpoint.removeprefix("tcp://"), None)
    raise ConfigError(f"endpoint {endpoint!r} must be unix:///path or tcp://host:port")


@dataclass
class Services:
    identity: pb_grpc.IdentityServicer
    controller: pb_grpc.ControllerServicer | None
    node: pb_grpc.NodeServicer | None
    snapshot_metadata: pb_grpc.SnapshotMetadataServicer | None = None


HEALTH_INTERVAL = 10.0
FIRST_HEALTH_CHECK = 0.5
"""Until the first check finds the backends healthy, checks come sooner: after this many
seconds, twice as long each time, up to HEALTH_INTERVAL (a node agent's first report, a
storage cluster still starting: the pod is ready seconds after, not a whole interval)."""
STOP_GRACE = 10.0
"""How long a stop lets the calls in flight finish before it cancels them."""
STOP_STEP = 3.0
"""How long a stop waits for each of its other steps (a companion, the health and metrics
servers) before it goes on without it."""
LIVENESS = "liveness"
"""The health service for the kubelet's liveness probe: SERVING from start to stop, whatever
the backends' health (restarting a node plugin mends no storage cluster, and would kill
the rbd-nbd daemons it runs)."""


class Companion(Protocol):
    """A server beside the CSI endpoint (``csi.registration.RegistrationServer``): started
    once the CSI endpoint serves, stopped before it closes. Its state is served by the
    health service under ``health_name``: SERVING while ``serving()`` answers True."""

    @property
    def health_name(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def serving(self) -> bool: ...


class Server:
    """The CSI services on ``endpoint``, and the standard gRPC health service there and,
    with ``health_port``, alone on a TCP port for kubelet's gRPC probes. The health status
    of service "" follows ``ready`` (checked every HEALTH_INTERVAL seconds): SERVING while
    it answers True, NOT_SERVING otherwise; service "liveness" is SERVING as long as the
    process serves. With ``metrics``, each call is recorded there, and the metrics are
    served from ``start`` to ``stop``; each of ``companions`` runs from ``start`` to
    ``stop`` too, its state a health service of its own. ``closers`` run at a stop that
    cut no call short, once the gRPC server has stopped."""

    def __init__(
        self,
        endpoint: str,
        services: Services,
        workers: int = 8,
        health_port: int = 0,
        ready: Callable[[], bool] = lambda: True,
        metrics: CallMetrics | None = None,
        companions: Sequence[Companion] = (),
        closers: Sequence[tuple[str, Callable[[], object]]] = (),
    ) -> None:
        self.endpoint = parse_endpoint(endpoint)
        self.closers = list(closers)
        self.health_port = health_port
        self._ready = ready
        self.metrics = metrics
        self.companions = list(companions)
        self.interceptor = CallInterceptor(metrics)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=[self.interceptor])
        self.services = services
        pb_grpc.add_IdentityServicer_to_server(services.identity, self._server)
        if services.controller is not None:
            pb_grpc.add_ControllerServicer_to_server(services.controller, self._server)
        if services.node is not None:
            pb_grpc.add_NodeServicer_to_server(services.node, self._server)
        if services.snapshot_metadata is not None:
            pb_grpc.add_SnapshotMetadataServicer_to_server(services.snapshot_metadata, self._server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self._health_server: grpc.Server | None = None
        if health_port:
            self._health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        self._stopped = threading.Event()

    def start(self) -> None:
        path = self.endpoint.socket_path
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            remove_stale_socket(path)
        if self._server.add_insecure_port(self.endpoint.address) == 0:
            raise ConfigError(f"cannot listen on {self.endpoint.address}")
        if self._health_server is not None and self._health_server.add_insecure_port(f"[::]:{self.health_port}") == 0:
            raise ConfigError(f"cannot listen for health checks on port {self.health_port}")
        if self.metrics is not None:
            self.metrics.start()
        self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        ready = self._update_health()
        self._server.start()
        if self._health_server is not None:
            self._health_server.start()
        threading.Thread(target=self._watch_health, args=(ready,), name="health", daemon=True).start()
        log.info("serving", extra={"endpoint": self.endpoint.address, "health_port": self.health_port or None})
        # After the CSI endpoint serves: the kubelet calls NodeGetInfo there as soon as
        # the registration socket appears.
        try:
            for companion in self.companions:
                companion.start()
        except Exception:
            self.stop(grace=0)
            raise

    def _update_health(self) -> bool:
        """Set the health services from ``ready`` and the companions; whether ready."""
        try:
            ready = self._ready()
        except Exception:
            log.exception("readiness check failed")
            ready = False
        self.health.set("", _status(ready))
        for companion in self.companions:
            try:
                serving = companion.serving()
            except Exception:
                log.exception("cannot read the state of %s", companion.health_name)
                serving = False
            self.health.set(companion.health_name, _status(serving))
        return ready

    def _watch_health(self, ready: bool) -> None:
        """Check every HEALTH_INTERVAL seconds, sooner until ``ready`` was seen once."""
        wait = min(FIRST_HEALTH_CHECK, HEALTH_INTERVAL)
        while not self._stopped.wait(HEALTH_INTERVAL if ready else wait):
            ready = self._update_health() or ready
            wait = min(2 * wait, HEALTH_INTERVAL)

    def stop(self, grace: float = STOP_GRACE, step: float = STOP_STEP) -> bool:
        """Refuse new calls, let calls in flight finish (up to ``grace`` seconds), then
        remove the socket. Safe to call more than once. Bounded: a step that has not ended
        after ``step`` seconds (``grace`` more for the gRPC server) is logged and left
        behind, and the calls still running once the server has stopped are logged as cut
        short (their clients see them cancelled; their threads cannot be stopped). True
        when nothing was cut short or left behind; otherwise the process should exit
        without waiting for those threads."""
        if self._stopped.is_set():
            return True
        self._stopped.set()
        started = time.monotonic()
        complete = True
        for companion in reversed(self.companions):
            complete &= _bounded(f"stopping {companion.health_name}", companion.stop, step)
        self.health.enter_graceful_shutdown()
        if not self._server.stop(grace).wait(grace + step):
            log.warning("the gRPC server did not stop in time; going on without it", extra={"seconds": grace + step})
            complete = False
        cut_short = self.interceptor.running()
        if cut_short:
            log.warning("calls cut short by the stop", extra={"calls": cut_short})
            complete = False
        else:
            # Nothing in flight: what the backends keep for a crash is settled (the local
            # backend's journal), so a clean stop leaves nothing to replay.
            for what, close in self.closers:
                complete &= _bounded(what, close, step)
        health_server = self._health_server
        if health_server is not None:
            complete &= _bounded("stopping the health server", lambda: health_server.stop(0).wait(step), step)
        if self.metrics is not None:
            complete &= _bounded("stopping the metrics server", self.metrics.stop, step)
        if self.endpoint.socket_path:
            remove_stale_socket(self.endpoint.socket_path)
        log.info("stopped", extra={"seconds": round(time.monotonic() - started, 3), "complete": complete})
        return complete

    def wait(self) -> None:
        self._stopped.wait()


def _bounded(what: str, step: Callable[[], object], seconds: float) -> bool:
    """Run ``step`` for at most ``seconds``: False, logged, when it has not ended by then
    (it is left running, in a daemon thread). A step that fails is logged, and over."""

    def run() -> None:
        try:
            step()
        except Exception:
            log.exception("%s failed", what)

    worker = threading.Thread(target=run, name=what, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        log.warning("%s did not end in time; going on without it", what, extra={"seconds": seconds})
        return False
    return True


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
