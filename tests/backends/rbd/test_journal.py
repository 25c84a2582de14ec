"""The reservation journal against a real Ceph cluster: a reservation is made once and
found afterwards, concurrent reservers of one name agree on one UUID (the check and the
write are one compound operation), and releasing a reservation removes its name only
while the name still maps to it."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
import rados

from csi.backends.rbd import journal as journal_module
from csi.backends.rbd.journal import JOURNAL, Journal, Reservation
from tests.ceph import POOL, CephCluster

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_pool")]


def keys(io: Any) -> dict[str, bytes]:
    with rados.ReadOpCtx() as op:
        values, _ = io.get_omap_vals(op, "", "", 10_000)
        try:
            io.operate_read_op(op, JOURNAL)
        except rados.ObjectNotFound:
            return {}
        return dict(values)


@pytest.fixture
def journal(pool_io: Any) -> Journal:
    """The pool's journal; each test releases what it reserved (clean_pool checks)."""
    return Journal(pool_io)


def test_a_name_is_reserved_once_and_found_afterwards(journal: Journal, pool_io: Any) -> None:
    first = journal.reserve("snapshot", "snap-a", source="cairn/some-volume")
    assert first.new and first.record == {"name": "snap-a", "source": "cairn/some-volume"}
    again = journal.reserve("snapshot", "snap-a", source="cairn/another-volume")
    assert again == Reservation(first.uuid, first.record, False), "the reservation made first holds"
    assert set(keys(pool_io)) == {"snapshot.name.snap-a", f"snapshot.uuid.{first.uuid}"}
    journal.release("snapshot", first.uuid)
    assert keys(pool_io) == {}


def test_a_release_given_the_name_removes_exactly_what_reading_the_record_would(journal: Journal, pool_io: Any) -> None:
    kept = journal.reserve("volume", "kept")
    named = journal.reserve("volume", "named")
    journal.release("volume", named.uuid, name="named")
    assert set(keys(pool_io)) == {"volume.name.kept", f"volume.uuid.{kept.uuid}"}
    wrong = journal.reserve("volume", "wrong")
    # A name that maps to another UUID is left alone; the record says which name is this one's.
    journal.release("volume", wrong.uuid, name="kept")
    assert set(keys(pool_io)) == {"volume.name.kept", f"volume.uuid.{kept.uuid}"}
    journal.release("volume", kept.uuid, name="kept")
    assert keys(pool_io) == {}


def test_concurrent_reservers_of_one_name_agree_on_one_uuid(ceph: CephCluster, pool_io: Any) -> None:
    """Each reserver has its own connection, as two controllers would: the omap_cmp in the
    reserving write is what lets exactly one of them win each name."""
    reservers, names = 6, [f"race-{i}" for i in range(8)]
    connections: list[Any] = []
    ios: list[Any] = []
    answers: list[list[Reservation]] = [[] for _ in range(reservers)]
    try:
        for _ in range(reservers):
            connections.append(rados.Rados(conffile=str(ceph.conf), rados_id="admin"))
            connections[-1].connect()
            ios.append(connections[-1].open_ioctx(POOL))
        for name in names:
            start = threading.Barrier(reservers)

            def reserve(index: int, name: str = name, start: threading.Barrier = start) -> None:
                start.wait()
                answers[index].append(Journal(ios[index]).reserve("volume", name))

            threads = [threading.Thread(target=reserve, args=(i,)) for i in range(reservers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        for i, name in enumerate(names):
            got = [answers[r][i] for r in range(reservers)]
            assert Counter(g.new for g in got)[True] == 1, f"{name}: exactly one reserver makes the reservation"
            assert len({g.uuid for g in got}) == 1, f"{name}: every reserver gets the same UUID"
        journal_keys = keys(pool_io)
        assert len(journal_keys) == 2 * len(names), "one name key and one record per name, no stray record"
        for name in names:
            Journal(pool_io).release("volume", journal_keys[f"volume.name.{name}"].decode())
        assert keys(pool_io) == {}
    finally:
        for io in ios:
            io.close()
        for connection in connections:
            connection.shutdown()


def test_release_removes_the_name_only_while_it_maps_to_the_released_uuid(journal: Journal, pool_io: Any) -> None:
    old = journal.reserve("volume", "pvc-a")
    newer = "00000000-0000-4000-8000-000000000001"
    with rados.WriteOpCtx() as op:  # the name now names another reservation
        pool_io.set_omap(op, ("volume.name.pvc-a",), (newer.encode(),))
        pool_io.operate_write_op(op, JOURNAL)
    journal.release("volume", old.uuid)
    assert keys(pool_io) == {"volume.name.pvc-a": newer.encode()}, "the record goes, the name stays with its holder"
    journal.release("volume", newer)  # no record: nothing to release under that UUID
    assert keys(pool_io) == {"volume.name.pvc-a": newer.encode()}
    with rados.WriteOpCtx() as op:
        pool_io.remove_omap_keys(op, ("volume.name.pvc-a",))
        pool_io.operate_write_op(op, JOURNAL)


def test_release_of_what_is_not_reserved_changes_nothing(journal: Journal, pool_io: Any) -> None:
    journal.release("volume", "00000000-0000-4000-8000-000000000002")  # no journal at all
    kept = journal.reserve("volume", "kept")
    journal.release("volume", "00000000-0000-4000-8000-000000000002")
    journal.release("snapshot", kept.uuid)  # another kind: another record
    assert set(keys(pool_io)) == {"volume.name.kept", f"volume.uuid.{kept.uuid}"}
    journal.release("volume", kept.uuid)
    assert keys(pool_io) == {}


def test_a_name_released_while_its_reservation_is_read_is_reserved_afresh(
    journal: Journal, pool_io: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reserving write is refused because the name is taken, and the name is released
    before the reserver reads whose it is: the reserver tries again, and wins."""
    taken = journal.reserve("volume", "fleeting")
    lookup = Journal.lookup

    def released_first(self: Journal, kind: Any, name: str) -> str | None:
        monkeypatch.setattr(Journal, "lookup", lookup)
        Journal(pool_io).release("volume", taken.uuid)
        return lookup(self, kind, name)

    monkeypatch.setattr(Journal, "lookup", released_first)
    again = journal.reserve("volume", "fleeting")
    assert again.new and again.uuid != taken.uuid
    assert set(keys(pool_io)) == {"volume.name.fleeting", f"volume.uuid.{again.uuid}"}
    journal.release("volume", again.uuid)


def test_a_reserver_that_keeps_losing_gives_up_with_a_retryable_error(
    journal: Journal, pool_io: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from csi.errors import Unavailable

    taken = journal.reserve("volume", "contended")
    monkeypatch.setattr(Journal, "lookup", lambda self, kind, name: None)  # always released before it reads
    with pytest.raises(Unavailable, match="keeps changing"):
        journal.reserve("volume", "contended")
    assert set(keys(pool_io)) == {"volume.name.contended", f"volume.uuid.{taken.uuid}"}, "nothing written"
    assert journal_module.RESERVE_ATTEMPTS > 1
    journal.release("volume", taken.uuid)
