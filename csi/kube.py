"""How the driver reaches the Kubernetes API: the one place that loads its configuration.

Inside a pod the service account is used; outside one, only when asked, the current
kubeconfig context. The ``kubernetes`` client is imported here on use, so a process that
never talks to the API never loads it.
"""

from __future__ import annotations

import os
from typing import Any

from csi.errors import ConfigError


def in_cluster() -> bool:
    """Whether this process runs in a Kubernetes pod (the API's address is in its env)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def configuration(
    *, kubeconfig: bool = False, config_file: str | None = None, purpose: str = "the Kubernetes API"
) -> Any:
    """A ``kubernetes.client.Configuration`` for the cluster this process runs in, or,
    with ``kubeconfig``, outside a cluster, the one the current kubeconfig context names
    (``config_file``, or the default kubeconfig). ConfigError naming ``purpose`` when
    neither is available."""
    try:
        from kubernetes import client
        from kubernetes import config as kubernetes_config
    except ImportError as exc:
        raise ConfigError(f"{purpose} needs the kubernetes Python client: {exc}") from exc
    config: Any = kubernetes_config  # its loaders are untyped
    found = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=found)
    except config.ConfigException as in_cluster_error:
        if not kubeconfig:
            raise ConfigError(f"not running in a Kubernetes cluster: {in_cluster_error}") from in_cluster_error
        try:
            config.load_kube_config(config_file=config_file, client_configuration=found, persist_config=False)
        except Exception as exc:  # the loader raises several kinds for a missing or bad file
            raise ConfigError(
                f"no Kubernetes configuration: not in a cluster ({in_cluster_error}), and no usable kubeconfig ({exc})"
            ) from exc
    # One retry of a failed connection (an API server restarting), no more: every
    # request is bounded by its own timeout, and the CO retries the call itself.
    found.retries = 1
    return found


def api_client(found: Any) -> Any:
    from kubernetes import client

    return client.ApiClient(found)
