from __future__ import annotations

from pathlib import Path

import pytest

from csi import config
from csi.errors import ConfigError

pytestmark = pytest.mark.unit


def test_load_several_backends(tmp_path: Path) -> None:
    path = tmp_path / "cairn.yaml"
    path.write_text(
        "backends:\n"
        "  - {name: fast, kind: local, group: ssd, path: /srv/fast}\n"
        "  - {name: slow, kind: local, path: /srv/slow}\n"
    )
    loaded = config.load(str(path))
    assert [b.name for b in loaded.backends] == ["fast", "slow"]
    assert loaded.backends[0].group == "ssd"
    assert loaded.backends[0].settings == {"path": "/srv/fast"}
    assert loaded.groups == {"ssd"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "mapping"),
        ({"backends": []}, "non-empty"),
        ({"backends": [{"name": "a", "kind": "local"}], "extra": 1}, "unknown top-level keys"),
        ({"backends": [{"name": "Bad Name", "kind": "local"}]}, "'name' must match"),
        ({"backends": [{"name": "a"}]}, "'kind' is required"),
        ({"backends": [{"name": "a", "kind": "local"}, {"name": "a", "kind": "local"}]}, "repeated: \\['a'\\]"),
        ({"backends": [{"name": "a", "kind": "local", "group": "a"}]}, "group names must differ"),
    ],
)
def test_bad_config_is_refused_with_a_reason(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.parse(data)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(str(tmp_path / "missing.yaml"))


def test_embedded_default() -> None:
    default = config.embedded_default("/data")
    assert default.backends == (config.BackendConfig("local", "local", None, {"path": "/data"}),)


def test_backup_repositories_are_parsed_beside_the_backends() -> None:
    loaded = config.parse(
        {
            "backends": [{"name": "fast", "kind": "local", "group": "ssd", "path": "/srv/fast"}],
            "backupRepositories": [
                {"name": "vault", "kind": "directory", "path": "/backups"},
                {"name": "offsite", "kind": "s3", "bucket": "b", "credentials": "/etc/keys"},
            ],
        }
    )
    assert [(r.name, r.kind) for r in loaded.repositories] == [("vault", "directory"), ("offsite", "s3")]
    assert loaded.repositories[1].settings == {"bucket": "b", "credentials": "/etc/keys"}


@pytest.mark.parametrize(
    ("repository", "message"),
    [
        ({"name": "fast", "kind": "directory", "path": "/b"}, "must all differ"),
        ({"name": "ssd", "kind": "directory", "path": "/b"}, "must all differ"),
        ({"name": "Vault", "kind": "directory"}, "'name' must match"),
        ({"name": "vault", "kind": "tape"}, "directory or s3"),
        ("vault", "expected a mapping"),
    ],
)
def test_bad_backup_repositories_are_refused_by_name(repository: object, message: str) -> None:
    data = {
        "backends": [{"name": "fast", "kind": "local", "group": "ssd", "path": "/srv/fast"}],
        "backupRepositories": [repository],
    }
    with pytest.raises(ConfigError, match=message):
        config.parse(data)


def test_two_repositories_of_one_name_are_refused() -> None:
    entry = {"name": "vault", "kind": "directory", "path": "/b"}
    data = {"backends": [{"name": "fast", "kind": "local", "path": "/f"}], "backupRepositories": [entry, entry]}
    with pytest.raises(ConfigError, match="must all differ"):
        config.parse(data)
