"""The gRPC server: endpoint parsing, one interceptor that logs every call with its
secrets stripped and turns exceptions into status codes, the standard health service,
and a graceful stop that removes the socket."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from csi import status
from csi.errors import ConfigError
from csi.generated import csi_pb2 as pb
from csi.generated import csi_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

STRIPPED = "***stripped***"
# Called every few seconds by the sidecars and kubelet; logged at debug level only.
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


class CallInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Logs each unary call and maps whatever it raises through ``status.to_status``."""

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        rpc = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        level = logging.DEBUG if rpc in _QUIET else logging.INFO

        def call(request: Message, context: grpc.ServicerContext) -> Message:
            started = time.monotonic()
            try:
                log.log(level, "call", extra={"rpc": rpc, "request": _described(request)})
                response: Message = inner(request, context)
                log.log(
                    level,
                    "done",
                    extra={
                        "rpc": rpc,
                        "seconds": round(time.monotonic() - started, 3),
                        "response": _described(response),
                    },
                )
                return response
            except Exception as exc:
                code, message = status.to_status(exc)
                extra = {
                    "rpc": rpc,
                    "code": code.name,
                    "error": message,
                    "seconds": round(time.monotonic() - started, 3),
                }
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("failed", extra=extra)
                else:
                    log.info("failed", extra=extra)
                context.abort(code, message)
                raise  # abort() always raises; this line is never reached

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


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


HEALTH_INTERVAL = 10.0


class Server:
    """The CSI services on ``endpoint``, and the standard gRPC health service there and,
    with ``health_port``, alone on a TCP port for kubelet's gRPC probes. The health status
    follows ``ready`` (checked every HEALTH_INTERVAL seconds): SERVING while it answers
    True, NOT_SERVING otherwise."""

    def __init__(
        self,
        endpoint: str,
        services: Services,
        workers: int = 8,
        health_port: int = 0,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.endpoint = parse_endpoint(endpoint)
        self.health_port = health_port
        self._ready = ready
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=[CallInterceptor()])
        pb_grpc.add_IdentityServicer_to_server(services.identity, self._server)
        if services.controller is not None:
            pb_grpc.add_ControllerServicer_to_server(services.controller, self._server)
        if services.node is not None:
            pb_grpc.add_NodeServicer_to_server(services.node, self._server)
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
            _remove_stale_socket(path)
        if self._server.add_insecure_port(self.endpoint.address) == 0:
            raise ConfigError(f"cannot listen on {self.endpoint.address}")
        if self._health_server is not None and self._health_server.add_insecure_port(f"[::]:{self.health_port}") == 0:
            raise ConfigError(f"cannot listen for health checks on port {self.health_port}")
        self._update_health()
        self._server.start()
        if self._health_server is not None:
            self._health_server.start()
        threading.Thread(target=self._watch_health, name="health", daemon=True).start()
        log.info("serving", extra={"endpoint": self.endpoint.address, "health_port": self.health_port or None})

    def _update_health(self) -> None:
        try:
            ready = self._ready()
        except Exception:
            log.exception("readiness check failed")
            ready = False
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)

    def _watch_health(self) -> None:
        while not self._stopped.wait(HEALTH_INTERVAL):
            self._update_health()

    def stop(self, grace: float = 10.0) -> None:
        """Refuse new calls, let calls in flight finish (up to ``grace`` seconds), then
        remove the socket. Safe to call more than once."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        if self._health_server is not None:
            self._health_server.stop(0).wait()
        if self.endpoint.socket_path:
            _remove_stale_socket(self.endpoint.socket_path)
        log.info("stopped")

    def wait(self) -> None:
        self._stopped.wait()


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to remove it")
    os.unlink(path)
