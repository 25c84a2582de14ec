"""StorageClass and VolumeSnapshotClass parameters the services read themselves, and the
split between those and a backend's own."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from typing import Protocol

from csi.errors import InvalidArgument


class Named(Protocol):
    @property
    def name(self) -> str: ...


PARAM_BACKEND = "backend"
PARAM_GROUP = "group"
PARAM_FS_TYPE = "fsType"
PARAM_MKFS_OPTIONS = "mkfsOptions"
MAX_MKFS_OPTIONS = 4096
"""Bytes of mkfsOptions accepted: real options take a few dozen, and parsing megabytes
would hold a call for seconds."""
PARAM_REQUIRES = "requires"
"""Features the StorageClass's backends must offer, comma-separated (snapshots, clones,
expansion, online-expansion, block, shared): a group places only on members that do."""
PARAM_TYPE = "type"
"""VolumeSnapshotClass: ``backup`` copies the snapshot into a repository (``snapshot``,
the default, keeps it in the backend)."""
PARAM_REPOSITORY = "repository"
"""VolumeSnapshotClass of type backup: the configured repository to copy into."""
SNAPSHOT_TYPES = ("snapshot", "backup")
SERVICE_PARAMETERS = frozenset(
    {PARAM_BACKEND, PARAM_GROUP, PARAM_FS_TYPE, PARAM_MKFS_OPTIONS, PARAM_REQUIRES, PARAM_TYPE, PARAM_REPOSITORY}
)
KUBERNETES_PREFIX = "csi.storage.k8s.io/"


def backend_parameters(parameters: Mapping[str, str]) -> dict[str, str]:
    """The parameters meant for the backend: all but the service's own and the ones the
    Kubernetes sidecars add (``csi.storage.k8s.io/...``)."""
    return {k: v for k, v in parameters.items() if k not in SERVICE_PARAMETERS and not k.startswith(KUBERNETES_PREFIX)}


CLAIM_METADATA = frozenset(
    {KUBERNETES_PREFIX + "pvc/name", KUBERNETES_PREFIX + "pvc/namespace", KUBERNETES_PREFIX + "pv/name"}
)


def claim_metadata(parameters: Mapping[str, str]) -> dict[str, str]:
    """The claim's names the external-provisioner adds with --extra-create-metadata."""
    return {k: v for k, v in parameters.items() if k in CLAIM_METADATA}


def check_mkfs_options(value: str, where: str) -> list[str]:
    """mkfsOptions split as a shell would, or INVALID_ARGUMENT naming ``where``."""
    if len(value) > MAX_MKFS_OPTIONS:
        raise InvalidArgument(f"{where} {PARAM_MKFS_OPTIONS!r} is longer than {MAX_MKFS_OPTIONS} bytes")
    try:
        return shlex.split(value)
    except ValueError as exc:
        raise InvalidArgument(f"{where} {PARAM_MKFS_OPTIONS!r} does not parse: {exc}") from exc


def required_features(parameters: Mapping[str, str]) -> list[str]:
    return [f.strip() for f in parameters.get(PARAM_REQUIRES, "").split(",") if f.strip()]


def check_keys(keys: Iterable[str], declared: Iterable[str], backends: Iterable[Named], what: str) -> None:
    """The one check of parameter keys: INVALID_ARGUMENT naming the first key that no
    backend of ``backends`` declares. ``what`` says which object's parameters these are
    (empty for a StorageClass's)."""
    known = set(declared)
    for key in sorted(set(keys) - known):
        names = ", ".join(b.name for b in backends)
        raise InvalidArgument(f"unknown {what + ' ' if what else ''}parameter {key!r} for backend(s) {names}")
