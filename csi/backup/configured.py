"""The backup repositories a driver configuration names, opened: the one place that
picks a store for a repository's kind."""

from __future__ import annotations

import os
from collections.abc import Sequence

from csi.backup.directory import DirectoryStore
from csi.backup.repository import DEFAULT_CHUNK_SIZE, Repository
from csi.backup.store import Store
from csi.config import RepositoryConfig
from csi.errors import CairnError, ConfigError

ACCESS_KEY_FILE = "accessKeyID"
SECRET_KEY_FILE = "secretAccessKey"
ENCRYPTION_KEY_FILE = "encryptionKey"
REPOSITORY_SETTINGS = {
    "directory": {"path", "credentials", "chunkSize"},
    "s3": {"endpoint", "bucket", "prefix", "region", "verifyTLS", "caBundle", "credentials", "chunkSize"},
}


def _secret_file(folder: str, name: str, where: str, required: bool) -> bytes | None:
    path = os.path.join(folder, name)
    try:
        with open(path, "rb") as handle:
            return handle.read().strip()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{where}: the credentials folder {folder} has no {name}") from None
        return None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from exc


def build_repositories(entries: Sequence[RepositoryConfig]) -> dict[str, Repository]:
    """The backup repositories of the configuration. Secrets (S3 keys, the encryption
    key) are files in the entry's ``credentials`` folder, a mounted Kubernetes Secret:
    ``accessKeyID`` and ``secretAccessKey`` for s3, ``encryptionKey`` (32 bytes or more)
    to encrypt what the repository stores."""
    repositories: dict[str, Repository] = {}
    for entry in entries:
        where = f"backup repository {entry.name!r}"
        unknown = set(entry.settings) - REPOSITORY_SETTINGS[entry.kind]
        if unknown:
            raise ConfigError(f"{where}: unknown settings {sorted(unknown)}")
        folder = entry.settings.get("credentials", "")
        if not isinstance(folder, str):
            raise ConfigError(f"{where}: 'credentials' must be a folder")
        key = _secret_file(folder, ENCRYPTION_KEY_FILE, where, required=False) if folder else None
        store: Store
        if entry.kind == "directory":
            path = entry.settings.get("path")
            if not isinstance(path, str) or not os.path.isabs(path):
                raise ConfigError(f"{where}: 'path' must be an absolute path, got {path!r}")
            store = DirectoryStore(path)
        else:
            from csi.backup.s3 import S3Settings, S3Store

            if not folder:
                raise ConfigError(f"{where}: an s3 repository needs 'credentials' (a folder with its keys)")
            access = _secret_file(folder, ACCESS_KEY_FILE, where, required=True) or b""
            secret = _secret_file(folder, SECRET_KEY_FILE, where, required=True) or b""
            settings = {k: v for k, v in entry.settings.items() if k not in ("credentials", "chunkSize")}
            store = S3Store(S3Settings.parse(settings, where), access.decode(), secret.decode())
        chunk_size = entry.settings.get("chunkSize", DEFAULT_CHUNK_SIZE)
        if not isinstance(chunk_size, int) or chunk_size < 4096 or chunk_size % 4096:
            raise ConfigError(f"{where}: 'chunkSize' must be a multiple of 4096 bytes, got {chunk_size!r}")
        try:
            repositories[entry.name] = Repository(entry.name, store, key=key, chunk_size=chunk_size)
        except CairnError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return repositories
