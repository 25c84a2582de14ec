"""The driver configuration file: which named backends this driver serves.

    backends:
      - name: local            # [a-z0-9-], unique; appears in every volume ID
        kind: local            # local (rbd, nfs and lvm follow)
        group: fast            # optional; a StorageClass may name a group instead
        path: /var/lib/cairn   # settings of the kind, checked by the backend itself

    backupRepositories:        # optional: where VolumeSnapshotClasses of type backup put them
      - name: offsite          # like a backend name: it appears in every backup's ID
        kind: directory        # directory (a local path or a mounted export) or s3
        path: /backups
        credentials: /etc/cairn/backup/offsite   # optional: a mounted Secret (see backup.config)

Without a file the driver serves the embedded default: one local backend named ``local``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from csi.errors import ConfigError

DEFAULT_BACKEND_NAME = "local"
# Backend and group names: they appear in every volume ID (see ids.py).
BACKEND_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


@dataclass(frozen=True)
class BackendConfig:
    name: str
    kind: str
    group: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RepositoryConfig:
    name: str
    kind: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DriverConfig:
    backends: tuple[BackendConfig, ...]
    repositories: tuple[RepositoryConfig, ...] = ()

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(b.group for b in self.backends if b.group)


def embedded_default(data_dir: str) -> DriverConfig:
    return DriverConfig((BackendConfig(DEFAULT_BACKEND_NAME, "local", None, {"path": data_dir}),))


def load(path: str) -> DriverConfig:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    return parse(data, path)


def parse(data: Any, source: str = "config") -> DriverConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'backends' list")
    unknown = set(data) - {"backends", "backupRepositories"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level keys {sorted(unknown)}")
    entries = data.get("backends")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: 'backends' must be a non-empty list")
    backends = tuple(_parse_backend(entry, f"{source}: backends[{i}]") for i, entry in enumerate(entries))
    names = [b.name for b in backends]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: backend names must be unique, repeated: {duplicates}")
    clashes = sorted({b.group for b in backends if b.group} & set(names))
    if clashes:
        raise ConfigError(f"{source}: group names must differ from backend names: {clashes}")
    entries = data.get("backupRepositories") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'backupRepositories' must be a list")
    repositories = tuple(
        _parse_repository(entry, f"{source}: backupRepositories[{i}]") for i, entry in enumerate(entries)
    )
    taken = set(names) | {b.group for b in backends if b.group}
    for repository in repositories:
        # Backup IDs are "1:<repository>:<backup>": a repository and a backend of one name
        # would make an ID that routes to both.
        if repository.name in taken:
            raise ConfigError(
                f"{source}: backup repository {repository.name!r}: names of repositories, backends and groups "
                "must all differ"
            )
        taken.add(repository.name)
    return DriverConfig(backends, repositories)


def _parse_repository(entry: Any, where: str) -> RepositoryConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping")
    name, kind = entry.get("name"), entry.get("kind")
    if not isinstance(name, str) or not BACKEND_NAME.match(name):
        raise ConfigError(f"{where}: 'name' must match {BACKEND_NAME.pattern}, got {name!r}")
    if kind not in ("directory", "s3"):
        raise ConfigError(f"{where} ({name}): 'kind' must be directory or s3, got {kind!r}")
    return RepositoryConfig(name, kind, {k: v for k, v in entry.items() if k not in ("name", "kind")})


def _parse_backend(entry: Any, where: str) -> BackendConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping")
    name, kind, group = entry.get("name"), entry.get("kind"), entry.get("group")
    if not isinstance(name, str) or not BACKEND_NAME.match(name):
        raise ConfigError(f"{where}: 'name' must match {BACKEND_NAME.pattern}, got {name!r}")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"{where} ({name}): 'kind' is required")
    if group is not None and (not isinstance(group, str) or not BACKEND_NAME.match(group)):
        raise ConfigError(f"{where} ({name}): 'group' must match {BACKEND_NAME.pattern}, got {group!r}")
    settings = {k: v for k, v in entry.items() if k not in ("name", "kind", "group")}
    return BackendConfig(name, kind, group, settings)
