"""StorageClass and VolumeSnapshotClass parameters the services read themselves, and the
split between those and a backend's own."""

from __future__ import annotations

from collections.abc import Mapping

PARAM_BACKEND = "backend"
PARAM_GROUP = "group"
PARAM_FS_TYPE = "fsType"
PARAM_MKFS_OPTIONS = "mkfsOptions"
SERVICE_PARAMETERS = frozenset({PARAM_BACKEND, PARAM_GROUP, PARAM_FS_TYPE, PARAM_MKFS_OPTIONS})
KUBERNETES_PREFIX = "csi.storage.k8s.io/"


def backend_parameters(parameters: Mapping[str, str]) -> dict[str, str]:
    """The parameters meant for the backend: all but the service's own and the ones the
    Kubernetes sidecars add (``csi.storage.k8s.io/...``)."""
    return {k: v for k, v in parameters.items() if k not in SERVICE_PARAMETERS and not k.startswith(KUBERNETES_PREFIX)}
