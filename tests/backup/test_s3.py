"""The S3 store against a real S3 server (Ceph's RADOS gateway): the store contract it
shares with the directory store, listing by pages, prefixes kept apart, and each kind of
failure classified with a message that names the bucket but never the secret."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from csi.backup.directory import DirectoryStore
from csi.backup.s3 import S3Settings, S3Store
from csi.backup.store import Store
from csi.errors import ConfigError, FailedPrecondition, NotFound, Unavailable
from tests.backup.conftest import S3Server
from tests.ceph import free_port

integration = pytest.mark.integration
unit = pytest.mark.unit


def s3_store(rgw: S3Server, prefix: str = "", **options: Any) -> S3Store:
    return S3Store(S3Settings(rgw.endpoint, rgw.bucket, prefix=prefix), rgw.access_key, rgw.secret_key, **options)


def empty(store: Store) -> None:
    for stored in list(store.list()):
        store.delete(stored.key)


@pytest.fixture
def store(rgw: S3Server) -> Iterator[S3Store]:
    """A store under a prefix of its own in the session's bucket, emptied afterwards."""
    made = s3_store(rgw, f"test-{uuid.uuid4().hex[:12]}")
    yield made
    empty(made)


@pytest.fixture(
    params=[pytest.param("s3", marks=integration), pytest.param("directory", marks=unit)],
)
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Each kind of store, for the contract they share."""
    if request.param == "directory":
        return DirectoryStore(str(tmp_path / "repository"))
    made: S3Store = request.getfixturevalue("store")
    return made


# Keys a directory can hold too; in key order, with "-" and "." sorting before "/".
KEYS = ["chunks/ab-cd", "chunks/ab.cd", "chunks/ab/cd", "chunks/abc", "manifests/a", "manifests/b", "top"]


def test_the_store_contract(any_store: Store) -> None:
    store = any_store
    assert list(store.list()) == []
    assert not store.exists("manifests/a")
    with pytest.raises(NotFound, match="manifests/a"):
        store.get("manifests/a")
    store.delete("manifests/a")  # a missing object is no error

    before = time.time()
    for key in reversed(KEYS):
        store.put(key, key.encode())
    store.put("top", b"replaced")
    store.put("empty", b"")
    after = time.time()

    listed = list(store.list())
    assert [s.key for s in listed] == sorted([*KEYS, "empty"])
    sizes = {s.key: s.size for s in listed}
    assert sizes["top"] == len(b"replaced") and sizes["empty"] == 0 and sizes["chunks/ab/cd"] == len(b"chunks/ab/cd")
    assert all(before - 5 <= s.modified <= after + 5 for s in listed), listed
    assert store.get("top") == b"replaced"
    assert store.get("empty") == b""
    assert store.get("chunks/ab/cd") == b"chunks/ab/cd"
    assert store.exists("chunks/ab/cd") and store.exists("empty")

    assert [s.key for s in store.list("chunks/")] == KEYS[:4]
    assert [s.key for s in store.list("chunks/ab")] == KEYS[:4]
    assert [s.key for s in store.list("chunks/ab/")] == ["chunks/ab/cd"]
    assert [s.key for s in store.list("manifests/")] == ["manifests/a", "manifests/b"]
    assert list(store.list("nothing/")) == []

    store.delete("chunks/ab/cd")
    assert not store.exists("chunks/ab/cd")
    with pytest.raises(NotFound, match="chunks/ab/cd"):
        store.get("chunks/ab/cd")
    assert "chunks/ab/cd" not in [s.key for s in store.list()]


@integration
def test_a_large_object_round_trips(store: S3Store) -> None:
    data = bytes(range(256)) * (5 * 1024 * 4)  # 5 MiB, in one PutObject
    store.put("chunks/large", data)
    assert store.get("chunks/large") == data
    assert [(s.key, s.size) for s in store.list()] == [("chunks/large", len(data))]


@integration
def test_listing_follows_pages(rgw: S3Server, store: S3Store) -> None:
    paged = s3_store(rgw, store.settings.prefix, page_size=3)
    keys = [f"chunks/{n:02d}" for n in range(10)]
    for key in reversed(keys):
        store.put(key, b"x")
    pages = []
    list_page = paged._client.list_objects_v2

    def counted(**request: Any) -> Any:
        pages.append(request.get("ContinuationToken"))
        return list_page(**request)

    paged._client.list_objects_v2 = counted
    assert [s.key for s in paged.list()] == keys
    assert len(pages) == 4 and pages[0] is None and all(pages[1:])
    assert [s.key for s in paged.list("chunks/0")] == keys


@integration
def test_listing_is_in_key_order_for_any_characters(store: S3Store) -> None:
    """The server's order (UTF-8 bytes) is the order of Python's strings."""
    keys = ["a b", "a-b", "a/b", "a_b", "Z", "z", "ä", "日本", "~"]
    for key in keys:
        store.put(key, b"x")
    assert [s.key for s in store.list()] == sorted(keys)


@integration
def test_prefixes_keep_stores_apart(rgw: S3Server) -> None:
    tag = uuid.uuid4().hex[:8]
    first, second = s3_store(rgw, f"iso-{tag}"), s3_store(rgw, f"iso-{tag}x/")
    whole = s3_store(rgw)
    try:
        assert first.settings.prefix == f"iso-{tag}/"  # a prefix is a folder, so "x" is not under it
        first.put("manifests/m", b"first")
        second.put("manifests/m", b"second")
        second.put("only-second", b"2")
        assert first.get("manifests/m") == b"first" and second.get("manifests/m") == b"second"
        assert [s.key for s in first.list()] == ["manifests/m"]
        assert [s.key for s in second.list()] == ["manifests/m", "only-second"]
        assert not first.exists("only-second")
        with pytest.raises(NotFound):
            first.get("only-second")
        assert [s.key for s in whole.list(f"iso-{tag}")] == [
            f"iso-{tag}/manifests/m",
            f"iso-{tag}x/manifests/m",
            f"iso-{tag}x/only-second",
        ]
        first.delete("only-second")  # not first's: nothing happens to second's
        assert second.exists("only-second")
    finally:
        empty(first)
        empty(second)


@integration
def test_a_missing_key_is_not_found_naming_it_and_the_store(store: S3Store) -> None:
    with pytest.raises(NotFound) as caught:
        store.get("chunks/missing")
    assert "chunks/missing" in str(caught.value) and store.settings.bucket in str(caught.value)
    assert store.settings.prefix in str(caught.value)


def every_operation(store: S3Store) -> list[Callable[[], object]]:
    return [
        lambda: store.put("k", b"data"),
        lambda: store.get("k"),
        lambda: store.exists("k"),
        lambda: store.delete("k"),
        lambda: list(store.list()),
    ]


@integration
@pytest.mark.parametrize("wrong", ["secret", "access"])
def test_wrong_credentials_fail_the_precondition_without_the_secret(rgw: S3Server, wrong: str) -> None:
    secret = "Wrong" + rgw.secret_key[5:] if wrong == "secret" else rgw.secret_key
    access = "NOSUCHACCESSKEY00000" if wrong == "access" else rgw.access_key
    store = S3Store(S3Settings(rgw.endpoint, rgw.bucket, prefix="denied"), access, secret)
    for operation in every_operation(store):
        with pytest.raises(FailedPrecondition) as caught:
            operation()
        message = str(caught.value)
        assert rgw.bucket in message and rgw.endpoint in message and "access denied" in message
        for text in (message, repr(caught.value.__cause__)):
            assert secret not in text and rgw.secret_key not in text


@integration
def test_another_users_bucket_is_access_denied(rgw: S3Server) -> None:
    access, secret = rgw.gateway.create_user(f"other-{uuid.uuid4().hex[:8]}")
    store = S3Store(S3Settings(rgw.endpoint, rgw.bucket), access, secret)
    for operation in every_operation(store):
        with pytest.raises(FailedPrecondition, match="access denied"):
            operation()


@integration
def test_a_missing_bucket_fails_the_precondition(rgw: S3Server) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    store = S3Store(S3Settings(rgw.endpoint, bucket), rgw.access_key, rgw.secret_key)
    for operation in every_operation(store):
        with pytest.raises(FailedPrecondition, match=f"bucket '{bucket}' does not exist at {rgw.endpoint}") as caught:
            operation()
        assert rgw.secret_key not in str(caught.value)


@unit
def test_nothing_listening_is_unavailable() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = S3Store(S3Settings(endpoint, "backups"), "ACCESS", "very-secret", attempts=1)
    for operation in every_operation(store):
        with pytest.raises(Unavailable) as caught:
            operation()
        assert endpoint in str(caught.value) and "s3://backups/" in str(caught.value)
        assert "very-secret" not in str(caught.value)


@unit
def test_unavailable_after_the_retries() -> None:
    store = S3Store(S3Settings(f"http://127.0.0.1:{free_port()}", "backups"), "ACCESS", "SECRET", attempts=2)
    calls = []
    store._client.meta.events.register("before-send.s3.HeadObject", lambda **_: calls.append(1))
    with pytest.raises(Unavailable):
        store.exists("k")
    assert len(calls) == 2


@unit
def test_empty_credentials_are_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="s3://backups/"):
        S3Store(S3Settings("http://127.0.0.1:9", "backups"), "", "secret")


@unit
def test_settings_parse() -> None:
    settings = S3Settings.parse(
        {"endpoint": "https://s3.example.com:8443/", "bucket": "backups", "prefix": "/cluster-a", "region": "eu-1"},
        "repository 'r'",
    )
    assert settings == S3Settings("https://s3.example.com:8443", "backups", "cluster-a/", "eu-1", True)
    assert settings.where == "s3://backups/cluster-a/ at https://s3.example.com:8443"
    assert S3Settings.parse({"bucket": "b.c-d", "caBundle": "/etc/ca.pem"}, "r").verify_tls == "/etc/ca.pem"
    assert S3Settings.parse({"bucket": "bcd", "verifyTLS": False}, "r").verify_tls is False
    bare = S3Settings.parse({"bucket": "bcd", "credentials": "/elsewhere"}, "r")  # other keys are the caller's
    assert bare == S3Settings("", "bcd") and bare.where == "s3://bcd/ at AWS S3"


@unit
@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({}, "'bucket' is required"),
        ({"bucket": ""}, "'bucket' is required"),
        ({"bucket": 7}, "'bucket' must be a string"),
        ({"bucket": "a"}, "not a valid bucket name"),
        ({"bucket": "has space"}, "not a valid bucket name"),
        ({"bucket": "bcd", "endpoint": "ftp://host"}, "http"),
        ({"bucket": "bcd", "endpoint": "host:9000"}, "http"),
        ({"bucket": "bcd", "endpoint": "http://host:99999"}, "not a URL"),
        ({"bucket": "bcd", "endpoint": "http://host/path"}, "without a path"),
        ({"bucket": "bcd", "region": "eu west"}, "'region'"),
        ({"bucket": "bcd", "verifyTLS": "no"}, "'verifyTLS' must be true or false"),
        ({"bucket": "bcd", "caBundle": "ca.pem"}, "absolute path"),
        ({"bucket": "bcd", "caBundle": "/ca.pem", "verifyTLS": False}, "set one of them"),
    ],
)
def test_settings_parse_rejects(settings: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ConfigError, match=r"^repository 'r': ") as caught:
        S3Settings.parse(settings, "repository 'r'")
    assert complaint in str(caught.value)


@unit
def test_an_endpoint_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as caught:
        S3Settings.parse({"bucket": "bcd", "endpoint": "https://user:hunter2@host"}, "r")
    assert "hunter2" not in str(caught.value) and "credentials" in str(caught.value)
