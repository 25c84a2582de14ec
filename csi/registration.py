"""Registration with the kubelet without the node-driver-registrar sidecar: the kubelet's
plugin-registration API (``pluginregistration.Registration`` of k8s.io/kubelet, stubs in
``csi/generated/``) served by the node plugin itself on ``<registration dir>/<driver>-reg.sock``.

How the kubelet uses it: it watches its plugin registry (``<kubelet dir>/plugins_registry``).
When a socket appears there it calls GetInfo, which names the plugin type (CSIPlugin), the
driver, and the path of the CSI socket *as the kubelet sees it on the host* (inside the
pod the same socket has another path, hence ``--kubelet-registration-path``). The kubelet
then calls NodeGetInfo on that socket, records the node in its CSINode object, and tells
the plugin the outcome with NotifyRegistrationStatus; after a refusal it retries by itself.
The socket going away deregisters the plugin, so a clean stop removes it, and a socket a
killed process left behind is replaced at start (the kubelet sees a new socket and
registers the plugin again).

The service sits beside the CSI server and shares nothing with it: it imports no CSI
service and not the server, which starts and stops it as a ``server.Companion`` (after its
own socket serves, before that socket closes). The last outcome the kubelet reported is
kept: the health service answers for it under the name ``registration``, and each report
is logged (a refusal at error level, with the kubelet's message).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc

from csi import DRIVER_NAME
from csi.errors import ConfigError
from csi.files import remove_stale_socket
from csi.generated import pluginregistration_pb2 as pb
from csi.generated import pluginregistration_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

PLUGIN_TYPE = "CSIPlugin"
"""The kubelet's name for a CSI driver's registration (k8s.io/kubelet's ``CSIPlugin``)."""
SUPPORTED_VERSIONS = ("1.0.0",)
"""The versions of the kubelet's CSI plugin API offered: the kubelet accepts 1.0.0 and up."""
HEALTH_NAME = "registration"
"""The health service that answers SERVING once the kubelet reported the plugin registered."""
MESSAGE_CHARS = 1024
"""Longest kubelet message logged whole."""


def socket_path(registration_dir: str) -> str:
    """Where the kubelet looks for this driver's registration socket (the name the
    node-driver-registrar uses too, so switching between the two leaves no stray socket)."""
    return os.path.join(registration_dir, f"{DRIVER_NAME}-reg.sock")


@dataclass(frozen=True)
class Outcome:
    """What the kubelet last reported: registered, or refused with its message."""

    registered: bool
    error: str


class RegistrationService(pb_grpc.RegistrationServicer):
    """Answers the kubelet: who the plugin is and where its CSI socket is, and hears how
    the registration went."""

    def __init__(self, kubelet_endpoint: str) -> None:
        self.kubelet_endpoint = kubelet_endpoint
        self._outcome: Outcome | None = None

    @property
    def outcome(self) -> Outcome | None:
        """The kubelet's last report, or None before the first."""
        return self._outcome

    def GetInfo(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.PluginInfo:
        log.debug("the kubelet asks who the plugin is", extra={"endpoint": self.kubelet_endpoint})
        return pb.PluginInfo(
            type=PLUGIN_TYPE,
            name=DRIVER_NAME,
            endpoint=self.kubelet_endpoint,
            supported_versions=list(SUPPORTED_VERSIONS),
        )

    def NotifyRegistrationStatus(
        self, request: pb.RegistrationStatus, context: grpc.ServicerContext
    ) -> pb.RegistrationStatusResponse:
        error = request.error[:MESSAGE_CHARS]
        self._outcome = Outcome(request.plugin_registered, error)
        if request.plugin_registered:
            log.info("registered with the kubelet", extra={"endpoint": self.kubelet_endpoint})
        else:
            log.error(
                "the kubelet refused the registration",
                extra={"error": error or "(no reason given)", "endpoint": self.kubelet_endpoint},
            )
        return pb.RegistrationStatusResponse()


class RegistrationServer:
    """The registration service on its own gRPC server, bound to the registration socket
    in ``registration_dir``, from ``start`` to ``stop``."""

    health_name = HEALTH_NAME

    def __init__(self, registration_dir: str, kubelet_endpoint: str) -> None:
        self.socket_path = socket_path(registration_dir)
        self.service = RegistrationService(kubelet_endpoint)
        # The kubelet makes two calls per registration: two workers are plenty.
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="registration"))
        pb_grpc.add_RegistrationServicer_to_server(self.service, self._server)
        self._lock = threading.Lock()
        self._state = "new"

    def start(self) -> None:
        """Replace a socket a killed process left, then serve. ConfigError when the
        socket cannot be made."""
        with self._lock:
            if self._state != "new":
                return
            directory = os.path.dirname(self.socket_path)
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot make the registration directory {directory}: {exc}") from exc
            remove_stale_socket(self.socket_path)
            if self._server.add_insecure_port(f"unix://{self.socket_path}") == 0:
                raise ConfigError(f"cannot listen for the kubelet on {self.socket_path}")
            self._server.start()
            self._state = "serving"
        log.info(
            "serving the kubelet's plugin registration",
            extra={"socket": self.socket_path, "endpoint": self.service.kubelet_endpoint},
        )

    def stop(self) -> None:
        """Stop serving and remove the socket, so the kubelet deregisters the plugin.
        Safe to call more than once."""
        with self._lock:
            if self._state != "serving":
                self._state = "stopped"
                return
            self._state = "stopped"
            self._server.stop(1.0).wait()
            remove_stale_socket(self.socket_path)
        log.info("registration socket removed", extra={"socket": self.socket_path})

    def serving(self) -> bool:
        """Whether the kubelet's last report says the plugin is registered."""
        outcome = self.service.outcome
        return outcome is not None and outcome.registered
