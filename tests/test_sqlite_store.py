"""The SQLite store: the shared conformance suite, then faults, bad input and concurrency.

Every test uses real SQLite files under ``tmp_path``; nothing is mocked.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from trio_es import (
    Aggregate,
    CommitOutcomeUnknown,
    ConcurrencyConflict,
    EventStoreError,
    TransactionFailed,
)
from trio_es import _sqlite_store as _sqlite
from trio_es._sql import EventRow
from trio_es._sqlite_store import _Commit
from trio_es._types import Snapshot, utc_now
from trio_es.sqlite_store import SqliteStore
from trio_es.testing import (
    Added,
    Counter,
    EventStoreConformance,
    ProjectionSourceConformance,
    conformance_transcoder,
)
from trio_es.testing._conformance import OpenStore

from . import _bank, _batching, _ledger, _loading


class TestSqliteStoreConformance(EventStoreConformance):
    """SqliteStore passes the shared store suite, read_all and serialization included."""

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SqliteStore[Any, Any]]:
        """A fresh store in a new file."""
        async with SqliteStore.open(
            tmp_path / "store.db", transcoder=conformance_transcoder()
        ) as s:
            yield s


class TestSqliteStoreAsProjectionSource(ProjectionSourceConformance):
    """SqliteStore passes the projection-source suite, across two store objects too."""

    @pytest.fixture
    def open_another_store(self, tmp_path: Path) -> OpenStore:
        """Opens another store object on the file of the store fixture."""
        return lambda: SqliteStore.open(
            tmp_path / "store.db",
            transcoder=conformance_transcoder(),
            poll_interval=self.poll_interval,
            takeover_interval=self.takeover_interval,
        )

    @pytest.fixture
    async def store(self, open_another_store: OpenStore) -> AsyncIterator[SqliteStore[Any, Any]]:
        """A fresh store in a new file, with the suite's intervals."""
        async with open_another_store() as s:
            yield s


async def test_concurrent_commits_share_database_transactions(tmp_path: Path) -> None:
    """Group commit: concurrent transactions are committed together, every one of them stored."""
    async with _open(tmp_path / "store.db") as store:
        await _batching.assert_concurrent_commits_share_transactions(store)


async def test_lone_commits_are_committed_at_once(tmp_path: Path) -> None:
    """Group commit at low load: a lone transaction commits alone, without waiting for company."""
    async with _open(tmp_path / "store.db") as store:
        await _batching.assert_lone_commits_are_not_batched(store)


def _open(path: Path, **options: Any) -> Any:
    return SqliteStore.open(
        path, transcoder=options.pop("transcoder", conformance_transcoder()), **options
    )


async def _commit(store: Any, aggregate_id: str, sequence: int, events: list[Any]) -> int:
    async with store.transaction() as tx:
        _, new_sequence = await store.commit_events(
            tx, Aggregate(aggregate_id, Counter(), sequence), events, ()
        )
    return int(new_sequence)


async def _load(store: Any, aggregate_id: str) -> list[Any]:
    async with store.transaction() as tx:
        return list(await store.load_events(tx, aggregate_id, 0))


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, timeout=5)


# -- opening --


async def test_open_creates_schema_once_and_reopens(tmp_path: Path) -> None:
    """Opening creates the tables in WAL mode with schema version 2; reopening keeps the data."""
    path = tmp_path / "store.db"
    async with _open(path) as store:
        await _commit(store, "acc", 0, [Added(1)])
    async with _open(path) as store:
        assert [e.payload for e in await _load(store, "acc")] == [Added(1)]
    with _raw(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert raw.execute("SELECT * FROM trio_es_schema_version").fetchall() == [
            ("events", "snapshots", 2)
        ]
    raw.close()


async def test_durability_pragmas_are_applied(tmp_path: Path) -> None:
    """The writer runs with synchronous=FULL by default and the configured value otherwise."""
    async with _open(tmp_path / "a.db") as store:
        assert store._writer.raw.execute("PRAGMA synchronous").fetchone() == (2,)
    async with _open(tmp_path / "b.db", synchronous="normal") as store:
        assert store._writer.raw.execute("PRAGMA synchronous").fetchone() == (1,)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"events_table": "events; DROP TABLE x"}, "events_table"),
        ({"events_table": "1events"}, "events_table"),
        ({"snapshots_table": "s" * 64}, "snapshots_table"),
        ({"snapshots_table": "snap-shots"}, "snapshots_table"),
        ({"events_table": "same", "snapshots_table": "SAME"}, "different tables"),
        ({"synchronous": "SOMETIMES"}, "synchronous"),
        ({"busy_timeout_ms": -1}, "busy_timeout_ms"),
        ({"aggregate_type": ""}, "aggregate_type"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"takeover_interval": -1.0}, "takeover_interval"),
    ],
)
async def test_bad_options_are_refused(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    """Invalid table names and settings raise ValueError showing the value; no file is created."""
    with pytest.raises(ValueError, match=message):
        async with _open(tmp_path / "store.db", **options):
            pass  # pragma: no cover
    assert not (tmp_path / "store.db").exists()


async def test_memory_database_is_refused() -> None:
    """':memory:' is refused with a pointer to temporary files (two connections must share it)."""
    with pytest.raises(ValueError, match="temporary directory"):
        async with SqliteStore.open(":memory:", transcoder=conformance_transcoder()):
            pass  # pragma: no cover


async def test_file_that_is_not_a_database(tmp_path: Path) -> None:
    """Opening a file that is not SQLite raises a clear EventStoreError and leaves it untouched."""
    path = tmp_path / "notes.txt"
    content = b"these are my notes, not a database\n" * 200
    path.write_bytes(content)
    with pytest.raises(EventStoreError, match="is not a SQLite database"):
        async with _open(path):
            pass  # pragma: no cover
    assert path.read_bytes() == content
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


async def test_foreign_table_with_the_same_name(tmp_path: Path) -> None:
    """An existing non-trio_es table of the configured name is reported, not written to."""
    path = tmp_path / "app.db"
    with _raw(path) as raw:
        raw.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, what TEXT)")
        raw.execute("INSERT INTO events (what) VALUES ('mine')")
    raw.close()
    with pytest.raises(EventStoreError, match=r"'events' .* is not a trio_es table"):
        async with _open(path):
            pass  # pragma: no cover
    async with _open(path, events_table="es_events") as store:
        await _commit(store, "acc", 0, [Added(1)])
    with _raw(path) as raw:
        assert raw.execute("SELECT what FROM events").fetchall() == [("mine",)]
    raw.close()


async def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    """Tables marked with a newer schema version are refused with the version numbers."""
    path = tmp_path / "store.db"
    async with _open(path):
        pass
    with _raw(path) as raw:
        raw.execute("UPDATE trio_es_schema_version SET version = 3")
    raw.close()
    with pytest.raises(EventStoreError, match="schema version 3"):
        async with _open(path):
            pass  # pragma: no cover


async def test_closed_store_and_finished_transactions_are_refused(tmp_path: Path) -> None:
    """A closed store, an ended transaction and another store's transaction raise clear errors."""
    async with _open(tmp_path / "a.db") as store, _open(tmp_path / "b.db") as other:
        async with store.transaction() as tx:
            pass
        with pytest.raises(EventStoreError, match="already ended"):
            await store.load_events(tx, "acc", 0)
        async with other.transaction() as foreign:
            with pytest.raises(EventStoreError, match="not a transaction of this store"):
                await store.load_events(foreign, "acc", 0)
    with pytest.raises(EventStoreError, match="closed"):
        await _load(store, "acc")


# -- bad data --


async def _store_with_history(path: Path) -> None:
    async with _open(path) as store:
        await _commit(store, "acc", 0, [Added(1), Added(2), Added(3)])
        await _commit(store, "other", 0, [Added(9)])


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("payload", "garbage{", "not valid JSON"),
        ("payload", '{"amount": "lots"}', r"expected int @ \$\.amount"),
        ("payload", "[1, 2]", "not a JSON object"),
        ("payload", "__import__('os').system('false')", "not valid JSON"),
        ("event_type", "Nope", "not registered; register it with Transcoder.register_event"),
        ("event_version", 7, "version 7"),
        ("metadata", '{"k": "v"}', "metadata at sequence 2"),
    ],
)
async def test_corrupted_row_gives_a_clear_error(
    tmp_path: Path, column: str, value: object, message: str
) -> None:
    """A corrupted event row fails loads with an error naming aggregate, sequence, type, version."""
    path = tmp_path / "store.db"
    await _store_with_history(path)
    with _raw(path) as raw:
        # ``column`` comes from the parametrize list above, never from input.
        raw.execute(
            f"UPDATE events SET {column} = ? WHERE aggregate_id = 'acc' AND sequence = 2", (value,)
        )
        before = raw.execute("SELECT * FROM events ORDER BY global_position").fetchall()
    raw.close()
    async with _open(path) as store:
        with pytest.raises(EventStoreError, match=message) as info:
            await _load(store, "acc")
        text = str(info.value)
        assert info.value.aggregate_id == "acc"
        assert "'acc'" in text
        assert "sequence 2" in text
        if column != "metadata":
            assert "version" in text
        with pytest.raises(EventStoreError, match=message):
            await store.read_all(0, 10)
        # Other aggregates and the rows themselves are unaffected.
        assert [e.payload for e in await _load(store, "other")] == [Added(9)]
    with _raw(path) as raw:
        assert raw.execute("SELECT * FROM events ORDER BY global_position").fetchall() == before
    raw.close()


async def test_corrupted_snapshot_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot that cannot be decoded loads as None with a warning, never an error."""
    path = tmp_path / "store.db"
    async with _open(path) as store:
        await _commit(store, "acc", 0, [Added(1)])
        async with store.transaction() as tx:
            await store.save_snapshot(tx, Snapshot("acc", Counter(1), 1, utc_now()))
    with _raw(path) as raw:
        raw.execute("UPDATE snapshots SET payload = 'not json'")
    raw.close()
    async with _open(path) as store:
        with caplog.at_level(logging.WARNING, logger="trio_es.serialization"):
            async with store.transaction() as tx:
                assert await store.load_snapshot(tx, "acc") is None
        assert "ignoring the snapshot of aggregate 'acc'" in caplog.text


async def test_a_snapshot_and_the_events_after_it_load_in_one_call(tmp_path: Path) -> None:
    """load_snapshot_and_events equals load_snapshot then load_events after it, also staged."""
    async with _open(tmp_path / "store.db") as store:
        await _loading.assert_snapshot_and_events_load_together(store)


@attrs.frozen
class _Opaque:
    """An event whose field holds any object, to hit values JSON cannot represent."""

    value: Any


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (_Opaque(object()), "cannot encode event"),
        (_Opaque(math.nan), "cannot encode event"),
        (_Opaque("\ud800"), "cannot encode event"),
    ],
)
async def test_unencodable_event_raises_before_anything_is_written(
    tmp_path: Path, event: Any, message: str
) -> None:
    """An event JSON cannot hold raises in commit_events; the transaction's other writes commit."""
    transcoder = conformance_transcoder()
    transcoder.register_event(_Opaque)
    async with _open(tmp_path / "store.db", transcoder=transcoder) as store:
        async with store.transaction() as tx:
            await store.commit_events(tx, Aggregate("ok", Counter(), 0), [Added(1)], ())
            with pytest.raises(EventStoreError, match=message):
                await store.commit_events(tx, Aggregate("bad", Counter(), 0), [Added(2), event], ())
        assert [e.payload for e in await _load(store, "ok")] == [Added(1)]
        assert await _load(store, "bad") == []
        assert [s.envelope.aggregate_id for s in await store.read_all(0, 10)] == ["ok"]


async def test_ids_and_metadata_that_text_columns_cannot_hold(tmp_path: Path) -> None:
    """A lone surrogate in an aggregate id or metadata raises EventStoreError and writes nothing."""
    async with _open(tmp_path / "store.db") as store:
        with pytest.raises(EventStoreError, match="lone surrogate"):
            await _commit(store, "bad\udc00id", 0, [Added(1)])
        with pytest.raises(EventStoreError, match="metadata"):
            async with store.transaction() as tx:
                await store.commit_events(
                    tx, Aggregate("acc", Counter(), 0), [Added(1)], (("k", "\ud800"),)
                )
        assert await store.read_all(0, 10) == []


async def test_nul_characters_round_trip(tmp_path: Path) -> None:
    """Ids and metadata with NUL characters are stored and found exactly (SQLite keeps them)."""
    async with _open(tmp_path / "store.db") as store:
        async with store.transaction() as tx:
            await store.commit_events(
                tx, Aggregate("a\x00b", Counter(), 0), [Added(1)], (("k\x00", "v\x00"),)
            )
        loaded = await _load(store, "a\x00b")
        assert [(e.aggregate_id, e.metadata) for e in loaded] == [("a\x00b", (("k\x00", "v\x00"),))]
        assert await _load(store, "a") == []


# -- sharing a file --


async def test_aggregate_types_share_tables_without_mixing(tmp_path: Path) -> None:
    """Stores of different aggregate types in one file see only their own events and snapshots."""
    path = tmp_path / "store.db"
    async with (
        _open(path, aggregate_type="orders") as orders,
        _open(path, aggregate_type="users") as users,
    ):
        await _commit(orders, "id-1", 0, [Added(1)])
        await _commit(users, "id-1", 0, [Added(2), Added(3)])
        assert [e.payload for e in await _load(orders, "id-1")] == [Added(1)]
        assert [e.aggregate_type for e in await _load(users, "id-1")] == ["users", "users"]
        assert [s.envelope.payload for s in await orders.read_all(0, 10)] == [Added(1)]
        assert len(await users.read_all(0, 10)) == 2


async def test_two_stores_on_one_file_conflict_like_two_processes(tmp_path: Path) -> None:
    """Two stores (separate connections) deciding on the same sequence: one wins, one conflicts."""
    path = tmp_path / "store.db"
    async with _open(path) as first, _open(path) as second:
        await _commit(first, "acc", 0, [Added(1)])
        await _commit(second, "acc", 1, [Added(2)])
        with pytest.raises(ConcurrencyConflict) as info:
            await _commit(first, "acc", 1, [Added(3)])
        assert (info.value.expected_sequence, info.value.actual_sequence) == (1, 2)
        assert [e.payload for e in await _load(first, "acc")] == [Added(1), Added(2)]


async def test_locked_database_is_a_retryable_failure(
    tmp_path: Path, raw_connections: list[sqlite3.Connection]
) -> None:
    """Under another connection's write lock, reads work and commits raise TransactionFailed."""
    path = tmp_path / "store.db"
    async with _open(path, busy_timeout_ms=100) as store:
        await _commit(store, "acc", 0, [Added(1)])
        blocker = _raw(path)
        raw_connections.append(blocker)
        blocker.execute("BEGIN IMMEDIATE")
        # A transaction that only reads never asks for the write lock.
        assert [e.sequence for e in await _load(store, "acc")] == [1]
        start = trio.current_time()
        with pytest.raises(TransactionFailed, match="busy_timeout_ms=100") as info:
            await _commit(store, "acc", 1, [Added(2)])
        assert not isinstance(info.value, ConcurrencyConflict)
        assert trio.current_time() - start < 2
        blocker.execute("ROLLBACK")
        assert await _commit(store, "acc", 1, [Added(2)]) == 2


async def test_unique_violation_becomes_a_concurrency_conflict(tmp_path: Path) -> None:
    """An insert hitting the (type, id, sequence) key raises ConcurrencyConflict, writes nothing."""
    async with _open(tmp_path / "store.db") as store:
        await _commit(store, "acc", 0, [Added(1)])
        # A plan whose check passes but whose row collides: what a writer bypassing the
        # check would cause. The store still reports a lost race, never a raw IntegrityError.
        row = EventRow("acc", 1, "conformance.Added", 1, '{"amount":2}', "[]", uuid.uuid4())
        plan = _Commit(store._statements, "default", {"acc": 1}, [row], [], 100)
        with pytest.raises(ConcurrencyConflict) as info:
            await store._run(store._writer, functools.partial(_sqlite._commit, plan=plan), "test")
        assert (info.value.aggregate_id, info.value.actual_sequence) == ("acc", 1)
        assert not store._writer.raw.in_transaction
        assert [e.payload for e in await _load(store, "acc")] == [Added(1)]


# -- cancellation --


async def test_cancelling_a_commit_waiting_for_a_lock(
    tmp_path: Path, raw_connections: list[sqlite3.Connection]
) -> None:
    """Cancelling a commit blocked by another writer returns at once, leaves no open transaction."""
    path = tmp_path / "store.db"
    async with _open(path, busy_timeout_ms=20_000) as store:
        blocker = _raw(path)
        raw_connections.append(blocker)
        blocker.execute("BEGIN IMMEDIATE")
        start = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            await _commit(store, "acc", 0, [Added(1)])
        assert scope.cancelled_caught
        assert trio.current_time() - start < 2
        assert not store._writer.raw.in_transaction
        blocker.execute("ROLLBACK")
        # No lock is left behind: another connection gets the write lock at once.
        probe = _raw(path)
        raw_connections.append(probe)
        probe.execute("PRAGMA busy_timeout = 0")
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        assert await _load(store, "acc") == []
        assert await _commit(store, "acc", 0, [Added(1)]) == 1


async def test_cancelling_a_running_query_interrupts_it(tmp_path: Path) -> None:
    """Cancelling a long-running statement interrupts it in SQLite and the store stays usable."""
    async with _open(tmp_path / "store.db") as store:

        def endless(connection: sqlite3.Connection, _: object) -> Any:
            return connection.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
                "SELECT count(*) FROM n"
            ).fetchall()

        start = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            await store._reader.run(endless)
        assert scope.cancelled_caught
        assert trio.current_time() - start < 2
        await _commit(store, "acc", 0, [Added(1)])
        assert len(await _load(store, "acc")) == 1


# -- the runtime on top --


async def test_runtime_end_to_end_survives_reopening(tmp_path: Path) -> None:
    """Commands through open_eventsourcing are durable: a reopened system sees the same state."""
    path = tmp_path / "bank.db"
    aggregate, snapshot = await _ledger.run_bank_twice(
        lambda: SqliteStore.open(path, transcoder=_bank.bank_transcoder())
    )
    assert (aggregate.entity.balance, aggregate.sequence) == (35, 4)
    assert snapshot is not None
    assert (snapshot.sequence, snapshot.entity.balance) == (3, 30)


# -- several processes --


async def _integrity_ok(path: Path) -> None:
    def check() -> list[Any]:
        with _raw(path) as raw:
            result = raw.execute("PRAGMA integrity_check").fetchall()
        raw.close()
        return result

    assert await trio.to_thread.run_sync(check) == [("ok",)]


def _worker(mode: str, db: Path, log: Path, worker: int, commands: int) -> list[str]:
    return _ledger.worker_command(
        mode, str(db), log, worker, worker * 7919, commands, _ledger.ACCOUNTS
    )


async def test_processes_share_one_file(tmp_path: Path) -> None:
    """Three runtime processes and a transfer process on one file: contiguous, complete, >= 0."""
    path = tmp_path / "bank.db"
    logs = [tmp_path / f"worker-{n}.log" for n in range(4)]
    modes = ["runtime", "runtime", "runtime", "transfer"]
    with trio.fail_after(60):
        await _ledger.run_workers([_worker(modes[n], path, logs[n], n, 120) for n in range(4)])

    async with SqliteStore.open(path, transcoder=_bank.bank_transcoder()) as store:
        stored = await _ledger.read_everything(store)
        # Every acknowledged command is stored once per event it made, and nothing else is;
        # worker 3 makes transfers, two events each.
        _ledger.check_acknowledged(stored, logs, _ledger.ACCOUNTS, two_event_prefix="3-")
        # Snapshots the runtimes saved agree with the replay of the events.
        await _ledger.check_snapshots(store, _ledger.ACCOUNTS, required=False)
    await _integrity_ok(path)


@pytest.mark.parametrize("mode", ["transfer", "transfer:8"], ids=["alone", "group-commit"])
async def test_killed_writers_lose_no_acknowledged_command(tmp_path: Path, mode: str) -> None:
    """Writers SIGKILLed at random, even mid-batch: acked transfers stay, none is half-written."""
    path = tmp_path / "bank.db"
    async with SqliteStore.open(path, transcoder=_bank.bank_transcoder()) as store:
        await _ledger.seed_accounts(store, _ledger.ACCOUNTS, seed_id=lambda _: "seed")
    rng = random.Random(20240229)
    logs: list[Path] = []
    for round_number in range(4):
        round_logs = [tmp_path / f"round-{round_number}-{n}.log" for n in range(2)]
        logs.extend(round_logs)
        commands = [
            _worker(mode, path, log, round_number * 10 + n + 1, 100_000)
            for n, log in enumerate(round_logs)
        ]
        await _ledger.kill_workers_at_random(commands, round_logs, rng, delays=(0.05, 0.4))

        await _integrity_ok(path)
        async with SqliteStore.open(path, transcoder=_bank.bank_transcoder()) as store:
            stored = await _ledger.read_everything(store)
        transfers, done = _ledger.check_transfers(
            stored, logs, _ledger.ACCOUNTS, seed_prefix="seed"
        )
        assert len(transfers) >= len(done) > 0


# -- event ids and the version-1 layout --

_V1_DDL = (
    "CREATE TABLE events (global_position INTEGER PRIMARY KEY, aggregate_type TEXT NOT NULL, "
    "aggregate_id TEXT NOT NULL, sequence INTEGER NOT NULL CHECK (sequence > 0), "
    "event_type TEXT NOT NULL, event_version INTEGER NOT NULL, payload TEXT NOT NULL, "
    "metadata TEXT NOT NULL, recorded_at TEXT NOT NULL, "
    "UNIQUE (aggregate_type, aggregate_id, sequence))",
    "CREATE INDEX events_type_position ON events (aggregate_type, global_position)",
    "CREATE TABLE snapshots (aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, "
    "sequence INTEGER NOT NULL, entity_type TEXT NOT NULL, entity_version INTEGER NOT NULL, "
    "payload TEXT NOT NULL, recorded_at TEXT NOT NULL, "
    "PRIMARY KEY (aggregate_type, aggregate_id))",
    "CREATE TABLE trio_es_schema_version (events_table TEXT PRIMARY KEY, "
    "snapshots_table TEXT NOT NULL, version INTEGER NOT NULL)",
    "INSERT INTO trio_es_schema_version VALUES ('events', 'snapshots', 1)",
)


def _event_ids(path: Path) -> list[str]:
    with _raw(path) as raw:
        ids = [row[0] for row in raw.execute("SELECT event_id FROM events ORDER BY 1")]
    raw.close()
    return ids


async def test_every_event_gets_a_unique_id(tmp_path: Path) -> None:
    """Each stored event has its own canonical UUID text; the unique index refuses a copy."""
    path = tmp_path / "store.db"
    async with _open(path) as store:
        await _commit(store, "a", 0, [Added(1), Added(2)])
        await _commit(store, "b", 0, [Added(3)])
    ids = _event_ids(path)
    assert len(ids) == len(set(ids)) == 3
    assert all(str(uuid.UUID(event_id)) == event_id for event_id in ids)
    with _raw(path) as raw, pytest.raises(sqlite3.IntegrityError, match="event_id"):
        raw.execute(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, "
            "event_version, payload, metadata, recorded_at, event_id) "
            "VALUES ('default', 'c', 1, 'x', 1, '{}', '[]', 'now', ?)",
            (ids[0],),
        )
    raw.close()


async def test_version_1_tables_are_migrated_on_open(tmp_path: Path) -> None:
    """A version-1 file gains event ids (fresh, unique), keeps its rows, and says version 2."""
    path = tmp_path / "old.db"
    with _raw(path) as raw:
        raw.execute("PRAGMA journal_mode=WAL")
        for ddl in _V1_DDL:
            raw.execute(ddl)
        for position, (aggregate_id, sequence, amount) in enumerate(
            [("acc", 1, 1), ("other", 1, 9), ("acc", 2, 2)], start=5
        ):
            raw.execute(
                "INSERT INTO events VALUES (?, 'default', ?, ?, 'conformance.Added', 1, ?, '[]', "
                "'2024-01-01T00:00:00.000000+00:00')",
                (position, aggregate_id, sequence, f'{{"amount": {amount}}}'),
            )
    raw.close()
    async with _open(path) as store:
        assert [e.payload for e in await _load(store, "acc")] == [Added(1), Added(2)]
        assert [s.global_position for s in await store.read_all(0, 10)] == [5, 6, 7]
        assert await _commit(store, "acc", 2, [Added(3)]) == 3
        assert [s.global_position for s in await store.read_all(6, 10)] == [7, 8]
    ids = _event_ids(path)
    assert len(ids) == len(set(ids)) == 4
    assert all(str(uuid.UUID(event_id)) == event_id for event_id in ids)
    with _raw(path) as raw:
        assert raw.execute("SELECT version FROM trio_es_schema_version").fetchall() == [(2,)]
        indexes = {row[1]: row[2] for row in raw.execute("PRAGMA index_list(events)")}
        assert indexes["events_event_id"] == 1  # unique
        assert "events_type_position" in indexes
        not_null = {row[1]: row[3] for row in raw.execute("PRAGMA table_info(events)")}
        assert not_null["event_id"] == 1
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    raw.close()
    # Reopening a migrated file changes nothing.
    async with _open(path) as store:
        assert len(await store.read_all(0, 10)) == 4
    assert _event_ids(path) == ids


async def test_stored_event_ids_make_a_resent_plan_committed(tmp_path: Path) -> None:
    """A plan whose event ids are stored already is committed, stores nothing, keeps its place."""
    path = tmp_path / "store.db"
    async with _open(path) as store:
        await _commit(store, "acc", 0, [Added(1)])
        [stored_id] = _event_ids(path)
        again = EventRow(
            "acc", 2, "conformance.Added", 1, '{"amount":2}', "[]", uuid.UUID(stored_id)
        )
        plan = _Commit(store._statements, "default", {"acc": 1}, [again], [], 100)
        [result] = await store._commit_batch([plan])
        [stored] = await store.read_all(0, 10)
        # Where the first commit put it, read back by id.
        assert result.unwrap() == {
            uuid.UUID(stored_id): (stored.global_position, stored.recorded_at)
        }
        assert not store._writer.raw.in_transaction
        assert [e.payload for e in await _load(store, "acc")] == [Added(1)]


# -- a failing COMMIT --


class FaultInjectingConnection:
    """Stands in for the store's sqlite3 writer; its next COMMIT fails as configured.

    ``commit_first`` runs the real COMMIT before raising (the commit happened, as when an
    fsync fails after the write-ahead log got the commit frame). ``wait_for_interrupt``
    instead commits and then waits, without failing, until the store interrupts it.
    """

    def __init__(
        self,
        real: sqlite3.Connection,
        *,
        code: int = sqlite3.SQLITE_IOERR,
        commit_first: bool = False,
        wait_for_interrupt: bool = False,
    ) -> None:
        self.real = real
        self.code = code
        self.commit_first = commit_first
        self.wait_for_interrupt = wait_for_interrupt
        self.armed = True
        self.interrupted = threading.Event()

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        if sql != "COMMIT" or not self.armed:
            return self.real.execute(sql, parameters)
        self.armed = False
        if self.wait_for_interrupt:
            cursor = self.real.execute(sql)
            assert self.interrupted.wait(10)
            return cursor
        if self.commit_first:
            self.real.execute(sql)
        error = sqlite3.OperationalError(f"injected SQLite error {self.code}")
        error.sqlite_errorcode = self.code
        raise error

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        return self.real.executemany(sql, rows)

    def interrupt(self) -> None:
        self.interrupted.set()
        self.real.interrupt()

    @property
    def in_transaction(self) -> bool:
        return self.real.in_transaction

    def close(self) -> None:
        self.real.close()


@pytest.fixture
def faulty_writer() -> Iterator[Callable[..., FaultInjectingConnection]]:
    """Puts a FaultInjectingConnection in front of a store's writer; restores it afterwards."""
    replaced: list[tuple[Any, sqlite3.Connection]] = []

    def install(store: Any, **options: Any) -> FaultInjectingConnection:
        fake = FaultInjectingConnection(store._writer.raw, **options)
        replaced.append((store._writer, store._writer.raw))
        store._writer.raw = fake
        return fake

    yield install
    for writer, real in replaced:
        writer.raw = real


async def test_commit_error_after_the_commit_was_written_is_outcome_unknown(
    tmp_path: Path, faulty_writer: Callable[..., FaultInjectingConnection]
) -> None:
    """An I/O error from COMMIT that may follow the write: CommitOutcomeUnknown, not a failure."""
    async with _open(tmp_path / "store.db") as store:
        await _commit(store, "acc", 0, [Added(1)])
        faulty_writer(store, code=sqlite3.SQLITE_IOERR, commit_first=True)
        with pytest.raises(CommitOutcomeUnknown, match="injected SQLite error") as info:
            await _commit(store, "acc", 1, [Added(2)])
        assert info.value.aggregate_id == "acc"
        assert [e.payload for e in await _load(store, "acc")] == [Added(1), Added(2)]
        assert await _commit(store, "acc", 2, [Added(3)]) == 3


@pytest.mark.parametrize(
    ("code", "error", "message"),
    [
        (sqlite3.SQLITE_BUSY, TransactionFailed, "stayed locked"),
        (sqlite3.SQLITE_FULL, EventStoreError, "is full"),
        (sqlite3.SQLITE_IOERR, EventStoreError, "injected"),
    ],
    ids=["busy", "full", "ioerr-still-open"],
)
async def test_commit_error_that_left_the_transaction_open_is_not_committed(
    tmp_path: Path,
    faulty_writer: Callable[..., FaultInjectingConnection],
    code: int,
    error: type[Exception],
    message: str,
) -> None:
    """COMMIT failing before it wrote (the transaction still open): not committed, says so."""
    async with _open(tmp_path / "store.db") as store:
        await _commit(store, "acc", 0, [Added(1)])
        faulty_writer(store, code=code)
        with pytest.raises(error, match=message) as info:
            await _commit(store, "acc", 1, [Added(2)])
        assert not isinstance(info.value, CommitOutcomeUnknown)
        assert not store._writer.raw.in_transaction
        assert [e.payload for e in await _load(store, "acc")] == [Added(1)]
        assert await _commit(store, "acc", 1, [Added(3)]) == 2


async def test_cancelled_commit_that_committed_is_never_reported_failed(
    tmp_path: Path, faulty_writer: Callable[..., FaultInjectingConnection]
) -> None:
    """Cancelled while its COMMIT completes: the caller gets OK or Cancelled, never an error."""
    async with _open(tmp_path / "store.db") as store:
        fake = faulty_writer(store, wait_for_interrupt=True)
        sequence = None
        with trio.move_on_after(0.2) as scope:
            sequence = await _commit(store, "acc", 0, [Added(1)])
        assert scope.cancel_called
        # Trio raises Cancelled only at a checkpoint; with none left after the commit's
        # result arrived, the caller simply gets it. Both answers are true.
        assert sequence in (None, 1)
        assert fake.interrupted.is_set()
        assert not store._writer.raw.in_transaction
        assert [e.payload for e in await _load(store, "acc")] == [Added(1)]
        assert await _commit(store, "acc", 1, [Added(2)]) == 2


async def test_opening_prepares_the_transcoder(tmp_path: Path) -> None:
    """Open builds the transcoder's cattrs hooks: the first commit and load generate none."""
    await _loading.assert_opening_prepares_the_transcoder(
        lambda transcoder: SqliteStore.open(tmp_path / "es.db", transcoder=transcoder)
    )


async def test_opening_compiles_a_loads_statements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Open runs a load's two reads once on the reader, so the first load finds them compiled."""
    traced: dict[int, list[str]] = {}
    connect = sqlite3.connect

    def traced_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection: sqlite3.Connection = connect(*args, **kwargs)
        connection.set_trace_callback(traced.setdefault(id(connection), []).append)
        return connection

    monkeypatch.setattr(sqlite3, "connect", traced_connect)
    async with _open(tmp_path / "es.db") as store:
        ran = traced[id(store._reader.raw)]
        statements = store._statements
        for sql in (statements.select_snapshot, statements.select_events):
            # The trace shows the statement with its parameters filled in.
            head = sql.split(" WHERE ")[0]
            assert [text for text in ran if text.startswith(head)], (head, ran)
