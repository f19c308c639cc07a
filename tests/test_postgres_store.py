"""The PostgreSQL store against a real server: conformance, processes, crashes, gaps, faults.

Every test gets a database of its own (random name, force-dropped afterwards). Without a
reachable server the tests skip, except with CI=true, where they fail.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import outcome
import psycopg
import pytest
import trio
from psycopg import sql

import trio_es._postgres_store as pg_module
from trio_es import Aggregate, ConcurrencyConflict, EventStoreError, TransactionFailed
from trio_es._types import Snapshot, utc_now
from trio_es.postgres_store import PostgresStore
from trio_es.testing import (
    Added,
    Counter,
    EventStoreConformance,
    Renamed,
    conformance_transcoder,
)

from . import _bank, _batching, _ledger, _pg

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The server DSN; skips without a reachable server, fails instead when CI=true."""
    return _pg.require_server()


@pytest.fixture(scope="session")
def postgres_databases(postgres_server: str) -> Iterator[_pg.Databases]:
    """Makes the tests' databases ahead of need and drops them in the background."""
    databases = _pg.Databases(postgres_server)
    try:
        yield databases
    finally:
        databases.close()


@pytest.fixture
def postgres_dsn(postgres_databases: _pg.Databases) -> Iterator[str]:
    """The DSN of a fresh, empty database with a random name, force-dropped after the test."""
    with postgres_databases.fresh() as dsn:
        yield dsn


@pytest.fixture
def raw(postgres_dsn: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """A plain autocommit connection to the test database, for inspection and faults.

    It never holds a transaction open: PostgreSQL freezes pg_stat_activity for the
    length of a transaction, so watching the store must happen outside one.
    """
    with _pg.connect(postgres_dsn, application_name="trio_es_test") as connection:
        yield connection


@pytest.fixture
def blocker(postgres_dsn: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """Another session of the test database, to hold locks in an open transaction."""
    with _pg.connect(postgres_dsn, application_name="trio_es_blocker") as connection:
        yield connection


class TestPostgresStoreConformance(EventStoreConformance):
    """PostgresStore passes the shared store suite, read_all and serialization included."""

    @pytest.fixture
    async def store(self, postgres_dsn: str) -> AsyncIterator[PostgresStore[Any, Any]]:
        """A fresh store on a fresh database."""
        async with PostgresStore.open(postgres_dsn, transcoder=conformance_transcoder()) as s:
            yield s


async def test_concurrent_commits_share_database_transactions(postgres_dsn: str) -> None:
    """Group commit: concurrent transactions are committed together, every one of them stored."""
    async with _open(postgres_dsn) as store:
        await _batching.assert_concurrent_commits_share_transactions(store)


async def test_lone_commits_are_committed_at_once(postgres_dsn: str) -> None:
    """Group commit at low load: a lone transaction commits alone, without waiting for company."""
    async with _open(postgres_dsn) as store:
        await _batching.assert_lone_commits_are_not_batched(store)


def _open(dsn: str, **options: Any) -> Any:
    return PostgresStore.open(
        dsn, transcoder=options.pop("transcoder", conformance_transcoder()), **options
    )


async def _commit(
    store: Any, aggregate_id: str, sequence: int, events: list[Any], metadata: Any = ()
) -> int:
    async with store.transaction() as tx:
        _, new_sequence = await store.commit_events(
            tx, Aggregate(aggregate_id, Counter(), sequence), events, metadata
        )
    return int(new_sequence)


async def _load(store: Any, aggregate_id: str) -> list[Any]:
    async with store.transaction() as tx:
        return list(await store.load_events(tx, aggregate_id, 0))


def _store_backends(raw: psycopg.Connection[tuple[Any, ...]]) -> list[tuple[int, str, str]]:
    """(pid, state, query) of the store's connections to the test database."""
    return [
        (int(pid), str(state), str(query))
        for pid, state, query in raw.execute(
            "SELECT pid, state, query FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'trio_es' ORDER BY pid"
        ).fetchall()
    ]


async def _poll(done: Callable[[], bool]) -> None:
    """Wait until ``done()`` is true, checking every 20 ms; fail after 20 seconds."""
    with trio.fail_after(20):
        while True:
            if done():
                return
            await trio.sleep(0.02)


async def _wait_until_blocked(
    raw: psycopg.Connection[tuple[Any, ...]], other_than: int | None = None
) -> int:
    """Wait until a store connection (not ``other_than``) waits on a lock; return its pid."""
    with trio.fail_after(10):
        while True:
            row = raw.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'trio_es' AND wait_event_type = 'Lock' "
                "AND pid IS DISTINCT FROM %s",
                (other_than,),
            ).fetchone()
            if row is not None:
                return int(row[0])
            await trio.sleep(0.01)


# -- opening --


async def test_open_creates_the_schema_once(postgres_dsn: str, raw: Any) -> None:
    """The first open creates tables, index and version row; reopening keeps the data."""
    async with _open(postgres_dsn) as store:
        await _commit(store, "acc", 0, [Added(1)])
    async with _open(postgres_dsn) as store:
        assert [e.payload for e in await _load(store, "acc")] == [Added(1)]
    assert raw.execute("SELECT * FROM trio_es_schema_version").fetchall() == [
        ("events", "snapshots", 1)
    ]
    types = dict(
        raw.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'events'"
        ).fetchall()
    )
    assert types["payload"] == types["metadata"] == "jsonb"
    assert types["recorded_at"] == "timestamp with time zone"


async def test_many_processes_opening_a_new_database_at_once(postgres_dsn: str, raw: Any) -> None:
    """Eight stores opening an empty database concurrently all succeed and create one schema."""
    opened: list[int] = []

    async def open_and_write(number: int) -> None:
        async with _open(postgres_dsn, pool_size=1) as store:
            await _commit(store, f"acc-{number}", 0, [Added(number)])
            opened.append(number)

    async with trio.open_nursery() as nursery:
        for number in range(8):
            nursery.start_soon(open_and_write, number)
    assert sorted(opened) == list(range(8))
    assert raw.execute("SELECT count(*) FROM trio_es_schema_version").fetchone() == (1,)
    assert raw.execute("SELECT count(*) FROM events").fetchone() == (8,)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"events_table": "events; DROP TABLE x"}, "events_table"),
        ({"events_table": 'ev"ents'}, "events_table"),
        ({"snapshots_table": "s" * 64}, "snapshots_table"),
        ({"events_table": "same", "snapshots_table": "SAME"}, "different tables"),
        ({"aggregate_type": ""}, "aggregate_type"),
        ({"aggregate_type": "a\x00b"}, "aggregate_type"),
        ({"aggregate_type": "t" * 300}, "aggregate_type"),
        ({"pool_size": 0}, "pool_size"),
    ],
)
async def test_bad_options_are_refused(
    postgres_dsn: str, raw: Any, options: dict[str, Any], message: str
) -> None:
    """Invalid names and settings raise ValueError showing the value; nothing is created."""
    with pytest.raises(ValueError, match=message):
        async with _open(postgres_dsn, **options):
            pass  # pragma: no cover
    assert raw.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (
        0,
    )


async def test_bad_dsn_and_unreachable_server(postgres_server: str) -> None:
    """A malformed DSN is a ValueError; a server that does not answer an EventStoreError, fast."""
    with pytest.raises(ValueError, match="dsn"):
        async with _open("host=localhost port='unterminated"):
            pass  # pragma: no cover
    # A port nothing listens on: the connection is refused at once.
    dsn = psycopg.conninfo.make_conninfo(postgres_server, host="127.0.0.1", port="1")
    with trio.fail_after(15), pytest.raises(EventStoreError, match="cannot connect to PostgreSQL"):
        async with _open(dsn):
            pass  # pragma: no cover


async def test_custom_table_names_and_case_folding(postgres_dsn: str, raw: Any) -> None:
    """Configured table names are used (folded to lower case, as PostgreSQL does unquoted)."""
    async with _open(postgres_dsn, events_table="Bank_Events", snapshots_table="bank_snaps") as s:
        await _commit(s, "acc", 0, [Added(1)])
    async with _open(postgres_dsn, events_table="bank_events", snapshots_table="BANK_SNAPS") as s:
        assert [e.payload for e in await _load(s, "acc")] == [Added(1)]
    tables = {row[0] for row in raw.execute("SELECT tablename FROM pg_tables").fetchall()}
    assert {"bank_events", "bank_snaps", "trio_es_schema_version"} <= tables
    assert "events" not in tables


async def test_foreign_table_with_the_same_name(postgres_dsn: str, raw: Any) -> None:
    """An existing non-trio_es table of the configured name is reported and left alone."""
    raw.execute("CREATE TABLE events (id serial PRIMARY KEY, what text)")
    raw.execute("INSERT INTO events (what) VALUES ('mine')")
    with pytest.raises(EventStoreError, match=r"'events' .* is not a trio_es table"):
        async with _open(postgres_dsn):
            pass  # pragma: no cover
    async with _open(postgres_dsn, events_table="es_events") as store:
        await _commit(store, "acc", 0, [Added(1)])
    assert raw.execute("SELECT what FROM events").fetchall() == [("mine",)]


async def test_newer_schema_version_is_refused(postgres_dsn: str, raw: Any) -> None:
    """Tables marked with a newer schema version are refused, naming the versions."""
    async with _open(postgres_dsn):
        pass
    raw.execute("UPDATE trio_es_schema_version SET version = 2")
    with pytest.raises(EventStoreError, match="schema version 2"):
        async with _open(postgres_dsn):
            pass  # pragma: no cover


async def test_closed_store_and_finished_transactions_are_refused(postgres_dsn: str) -> None:
    """A closed store, an ended transaction and another store's transaction raise clear errors."""
    async with _open(postgres_dsn) as store, _open(postgres_dsn) as other:
        async with store.transaction() as tx:
            pass
        with pytest.raises(EventStoreError, match="already ended"):
            await store.load_events(tx, "acc", 0)
        async with other.transaction() as foreign:
            with pytest.raises(EventStoreError, match="not a transaction of this store"):
                await store.load_events(foreign, "acc", 0)
    with pytest.raises(EventStoreError, match="closed"):
        await _load(store, "acc")


async def test_aggregate_types_share_tables_without_mixing(postgres_dsn: str) -> None:
    """Stores of different aggregate types on one table see only their own rows."""
    async with (
        _open(postgres_dsn, aggregate_type="orders") as orders,
        _open(postgres_dsn, aggregate_type="users") as users,
    ):
        await _commit(orders, "42", 0, [Added(1)])
        await _commit(users, "42", 0, [Added(2), Added(3)])
        async with users.transaction() as tx:
            await users.save_snapshot(tx, Snapshot("42", Counter(5), 2, utc_now()))
        assert [e.payload for e in await _load(orders, "42")] == [Added(1)]
        stored = await _ledger.read_everything(users)
        assert [s.envelope.aggregate_type for s in stored] == ["users"] * 2
        async with orders.transaction() as tx:
            assert await orders.load_snapshot(tx, "42") is None


# -- bad data --


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("payload", '{"amount": "lots"}', r"expected int @ \$\.amount"),
        ("payload", "[1, 2]", "not a JSON object"),
        ("payload", '"DROP TABLE events"', "not a JSON object"),
        ("event_type", "Nope", "not registered; register it with Transcoder.register_event"),
        ("event_version", 7, "version 7"),
        ("metadata", '{"k": "v"}', "metadata at sequence 2"),
    ],
)
async def test_corrupted_row_gives_a_clear_error(
    postgres_dsn: str, raw: Any, column: str, value: object, message: str
) -> None:
    """A corrupted event row fails loads with an error naming aggregate, sequence, type, version."""
    async with _open(postgres_dsn) as store:
        await _commit(store, "acc", 0, [Added(1), Added(2), Added(3)])
        await _commit(store, "other", 0, [Added(9)])
    raw.execute(
        sql.SQL("UPDATE events SET {} = %s WHERE aggregate_id = 'acc' AND sequence = 2").format(
            sql.Identifier(column)
        ),
        (value,),
    )
    async with _open(postgres_dsn) as store:
        with pytest.raises(EventStoreError, match=message) as info:
            await _load(store, "acc")
        text = str(info.value)
        assert info.value.aggregate_id == "acc"
        assert "'acc'" in text
        assert "sequence 2" in text
        if column != "metadata":
            assert "version" in text
            assert ("Nope" if column == "event_type" else "conformance.Added") in text
        with pytest.raises(EventStoreError, match=message):
            await store.read_all(0, 10)
        assert [e.payload for e in await _load(store, "other")] == [Added(9)]


async def test_corrupted_snapshot_is_ignored(postgres_dsn: str, raw: Any) -> None:
    """A snapshot that no longer decodes loads as None (the events rebuild the entity)."""
    async with _open(postgres_dsn) as store:
        await _commit(store, "acc", 0, [Added(1)])
        async with store.transaction() as tx:
            await store.save_snapshot(tx, Snapshot("acc", Counter(1), 1, utc_now()))
        raw.execute("""UPDATE snapshots SET payload = '{"total": "many"}'""")
        async with store.transaction() as tx:
            assert await store.load_snapshot(tx, "acc") is None


async def test_nul_characters_are_refused_clearly(postgres_dsn: str) -> None:
    """NUL in an id, payload or metadata raises a clear EventStoreError; nothing is written."""
    async with _open(postgres_dsn) as store:
        with pytest.raises(EventStoreError, match=r"NUL character .* PostgreSQL text"):
            await _commit(store, "a\x00b", 0, [Added(1)])
        with pytest.raises(EventStoreError, match="NUL character"):
            await _load(store, "a\x00b")
        with pytest.raises(EventStoreError, match="NUL character"):
            async with store.transaction() as tx:
                await store.load_snapshot(tx, "a\x00b")
        with pytest.raises(EventStoreError, match=r"'conformance.Renamed' version 1 at sequence 2"):
            await _commit(store, "acc", 0, [Added(1), Renamed("bad\x00name")])
        with pytest.raises(EventStoreError, match="metadata pair"):
            await _commit(store, "acc", 0, [Added(1)], (("key", "v\x00"),))
        with pytest.raises(EventStoreError, match=r"snapshot of entity 'conformance\.Counter'"):
            async with store.transaction() as tx:
                await store.save_snapshot(tx, Snapshot("acc", Counter(1, "\x00"), 1, utc_now()))
        assert await store.read_all(0, 10) == []
        # Text that merely looks like an escaped NUL is ordinary data.
        lookalike = "back\\u0000slash \\\\u0000"
        await _commit(store, "acc", 0, [Renamed(lookalike)], (("k", "\\u0000"),))
        loaded = await _load(store, "acc")
        assert [(e.payload, e.metadata) for e in loaded] == [
            (Renamed(lookalike), (("k", "\\u0000"),))
        ]


async def test_refused_event_leaves_the_rest_of_the_transaction(postgres_dsn: str) -> None:
    """A NUL refused by commit_events unstages that call only; the block's other writes commit."""
    async with _open(postgres_dsn) as store:
        async with store.transaction() as tx:
            await store.commit_events(tx, Aggregate("ok", Counter(), 0), [Added(1)], ())
            await store.commit_events(tx, Aggregate("acc", Counter(), 0), [Added(2)], ())
            with pytest.raises(EventStoreError, match="at sequence 3"):
                await store.commit_events(
                    tx, Aggregate("acc", Counter(), 1), [Added(3), Renamed("\x00")], ()
                )
            with pytest.raises(EventStoreError, match="at sequence 1"):
                await store.commit_events(tx, Aggregate("new", Counter(), 0), [Renamed("\x00")], ())
            await store.commit_events(tx, Aggregate("acc", Counter(), 1), [Added(4)], ())
        assert [(e.sequence, e.payload) for e in await _load(store, "acc")] == [
            (1, Added(2)),
            (2, Added(4)),
        ]
        assert [e.payload for e in await _load(store, "ok")] == [Added(1)]
        assert await _load(store, "new") == []


async def test_long_ids_that_do_not_compress_are_refused_clearly(postgres_dsn: str) -> None:
    """A 10 kB random id overflows the unique index: a clear EventStoreError, nothing written."""
    random_id = secrets.token_hex(5000)
    async with _open(postgres_dsn) as store:
        with pytest.raises(EventStoreError, match=r"10000 bytes\) is too long") as info:
            await _commit(store, random_id, 0, [Added(1)])
        assert "shorter id" in str(info.value)
        assert await store.read_all(0, 10) == []
        assert await _load(store, random_id) == []
        # A 2 kB random id, a 10 kB repetitive one and 4-byte characters all fit.
        for aggregate_id in (secrets.token_hex(1000), "z" * 10_000, "🎉" * 2500):
            await _commit(store, aggregate_id, 0, [Added(1)])
            assert [e.aggregate_id for e in await _load(store, aggregate_id)] == [aggregate_id]


# -- concurrency: conflicts and read_all --


async def test_two_stores_conflict_like_two_processes(postgres_dsn: str) -> None:
    """Two stores (separate pools) writing the same sequence: exactly one wins."""
    async with _open(postgres_dsn) as first, _open(postgres_dsn) as second:
        await _commit(first, "acc", 0, [Added(1)])
        await _commit(second, "acc", 1, [Added(2)])
        with pytest.raises(ConcurrencyConflict) as info:
            await _commit(first, "acc", 1, [Added(3)])
        assert (info.value.expected_sequence, info.value.actual_sequence) == (1, 2)
        assert [e.payload for e in await _load(first, "acc")] == [Added(1), Added(2)]


async def test_unique_key_backs_the_check(postgres_dsn: str, raw: Any, blocker: Any) -> None:
    """A row written behind the store's back between check and insert still makes a conflict."""
    async with _open(postgres_dsn) as store:
        await _commit(store, "acc", 0, [Added(1)])
        # Hold the commit lock, so the store's commit passes its check and then waits.
        blocker.execute("BEGIN")
        blocker.execute("SELECT pg_advisory_xact_lock(%s)", (pg_module._commit_lock_key("events"),))
        result: list[outcome.Outcome[int]] = []

        async def commit() -> None:
            result.append(await outcome.acapture(_commit, store, "acc", 1, [Added(2)]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit)
            await _wait_until_blocked(raw)
            raw.execute(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, "
                "event_version, payload, metadata, recorded_at) VALUES ('default', 'acc', 2, "
                """'conformance.Added', 1, '{"amount": 99}', '[]', now())"""
            )
            blocker.execute("COMMIT")
        with pytest.raises(ConcurrencyConflict) as info:
            result[0].unwrap()
        assert (info.value.expected_sequence, info.value.actual_sequence) == (1, 2)
        assert [e.payload for e in await _load(store, "acc")] == [Added(1), Added(99)]


async def test_read_all_never_skips_an_event_under_concurrent_writers(
    postgres_dsn: str, raw: Any
) -> None:
    """A reader paging read_all while 16 writers commit sees every event exactly once, in order."""
    writers, commits = 16, 20
    seen: list[int] = []
    done = trio.Event()

    async def writer(store: Any, number: int) -> None:
        sequence = 0
        for index in range(commits):
            events = [Added(number * 1000 + index * 10 + k) for k in range(1 + index % 3)]
            sequence = await _commit(store, f"writer-{number}", sequence, events)

    async def reader(store: Any) -> None:
        after = 0
        while True:
            finished = done.is_set()
            page = await store.read_all(after, 5)
            positions = [item.global_position for item in page]
            assert positions == sorted(positions)
            assert not positions or positions[0] > after
            seen.extend(positions)
            if page:
                after = positions[-1]
            elif finished:
                return

    async with (
        _open(postgres_dsn, pool_size=4) as a,
        _open(postgres_dsn, pool_size=4) as b,
        _open(postgres_dsn, pool_size=4) as c,
        _open(postgres_dsn, pool_size=4) as d,
        _open(postgres_dsn, pool_size=1) as reading,
    ):
        stores = [a, b, c, d]
        async with trio.open_nursery() as outer:
            outer.start_soon(reader, reading)
            async with trio.open_nursery() as nursery:
                for number in range(writers):
                    nursery.start_soon(writer, stores[number % len(stores)], number)
            done.set()
    stored = [row[0] for row in raw.execute("SELECT global_position FROM events ORDER BY 1")]
    assert len(stored) == writers * sum(1 + index % 3 for index in range(commits))
    assert len(seen) == len(set(seen))
    assert seen == stored


# -- cancellation and broken connections --


async def test_cancelling_a_commit_waiting_for_a_lock(
    postgres_dsn: str, raw: Any, blocker: Any
) -> None:
    """A commit blocked on a lock is cancelled on the server; its connection is reused, idle."""
    async with _open(postgres_dsn, pool_size=1) as store:
        await _commit(store, "acc", 0, [Added(1)])
        [(pid, _, _)] = _store_backends(raw)
        blocker.execute("BEGIN")
        blocker.execute("SELECT pg_advisory_xact_lock(%s)", (pg_module._commit_lock_key("events"),))
        started = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            await _commit(store, "acc", 1, [Added(2)])
        assert scope.cancelled_caught
        assert trio.current_time() - started < 5
        # The lock is still held, yet the store's backend no longer waits for it: the
        # server cancelled the statement, and the transaction was rolled back.
        assert [(p, state) for p, state, _ in _store_backends(raw)] == [(pid, "idle")]
        blocker.execute("ROLLBACK")
        assert [e.sequence for e in await _load(store, "acc")] == [1]
        assert await _commit(store, "acc", 1, [Added(2)]) == 2
        assert [row[0] for row in _store_backends(raw)] == [pid]


async def test_cancelling_a_read_waiting_for_a_table_lock(
    postgres_dsn: str, raw: Any, blocker: Any
) -> None:
    """A read blocked by another session's table lock is cancelled and the store stays usable."""
    async with _open(postgres_dsn, pool_size=1) as store:
        await _commit(store, "acc", 0, [Added(1)])
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        async with trio.open_nursery() as nursery:

            async def blocked_read() -> None:
                await _load(store, "acc")
                raise AssertionError("the read should have been cancelled")  # pragma: no cover

            nursery.start_soon(blocked_read)
            await _wait_until_blocked(raw)
            nursery.cancel_scope.cancel()
        assert [state for _, state, _ in _store_backends(raw)] == ["idle"]
        blocker.execute("ROLLBACK")
        assert [e.payload for e in await _load(store, "acc")] == [Added(1)]


async def test_pool_survives_terminated_backends(postgres_dsn: str, raw: Any, blocker: Any) -> None:
    """Backends killed by pg_terminate_backend, idle or mid-query, are replaced transparently."""
    async with _open(postgres_dsn, pool_size=2) as store:
        for number in range(4):
            await _commit(store, f"acc-{number}", 0, [Added(number)])
        # Concurrent reads (commits would share one batch) open both pooled connections.
        async with trio.open_nursery() as nursery:
            for number in range(4):
                nursery.start_soon(_load, store, f"acc-{number}")
        killed = [pid for pid, _, _ in _store_backends(raw)]
        assert len(killed) == 2
        raw.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (killed,))
        # Idle connections died: the next calls replace them without an error.
        assert [e.payload for e in await _load(store, "acc-1")] == [Added(1)]
        assert await _commit(store, "acc-1", 1, [Added(10)]) == 2

        # A backend killed while its read waits for a lock: the read is retried on a new
        # connection (reads and uncommitted writes are safe to retry) and completes.
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        loaded: list[Any] = []

        async def read() -> None:
            loaded.extend(await _load(store, "acc-2"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            victim = await _wait_until_blocked(raw)
            raw.execute("SELECT pg_terminate_backend(%s)", (victim,))
            # The retry waits for the lock again, on a new connection.
            await _wait_until_blocked(raw, other_than=victim)
            blocker.execute("ROLLBACK")
        assert [e.payload for e in loaded] == [Added(2)]
        assert await _commit(store, "acc-2", 1, [Added(20)]) == 2
        assert all(pid not in killed for pid, _, _ in _store_backends(raw))


async def test_lost_database_is_a_retryable_failure(postgres_server: str) -> None:
    """When the database goes away under a store, calls fail with TransactionFailed saying why."""
    with _pg.fresh_database(postgres_server) as dsn:
        async with _open(dsn) as store:
            await _commit(store, "acc", 0, [Added(1)])
            name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
            with _pg.connect(postgres_server) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(str(name)))
                )
            with pytest.raises(TransactionFailed, match="cannot connect to PostgreSQL") as info:
                await _load(store, "acc")
            assert str(name) in str(info.value)
            with pytest.raises(TransactionFailed):
                await _commit(store, "acc", 1, [Added(2)])


async def test_commit_whose_outcome_is_unknown_is_not_retryable(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch, raw: Any
) -> None:
    """A connection lost after COMMIT was sent gives a non-retryable EventStoreError."""
    real_commit = pg_module._commit

    def fake_commit_losing_the_reply(connection: Any, call: Any, plan: Any) -> None:
        # Fault injection: the commit happens, then the connection dies before the
        # client hears about it, as when the network drops at the wrong moment.
        real_commit(connection, call, plan)
        connection.pgconn.finish()
        raise pg_module._CommitOutcomeUnknown("server closed the connection unexpectedly")

    async with _open(postgres_dsn, pool_size=1) as store:
        monkeypatch.setattr(pg_module, "_commit", fake_commit_losing_the_reply)
        with pytest.raises(EventStoreError, match="may or may not have happened") as info:
            await _commit(store, "acc", 0, [Added(1)])
        assert not isinstance(info.value, TransactionFailed)
        monkeypatch.setattr(pg_module, "_commit", real_commit)
        # It did happen; the broken connection was replaced.
        assert [e.payload for e in await _load(store, "acc")] == [Added(1)]
        assert len(_store_backends(raw)) == 1


# -- the runtime on top --


async def test_runtime_end_to_end_survives_reopening(postgres_dsn: str) -> None:
    """Commands through open_eventsourcing are durable: a reopened system sees the same state."""
    aggregate, snapshot = await _ledger.run_bank_twice(
        lambda: PostgresStore.open(postgres_dsn, transcoder=_bank.bank_transcoder())
    )
    assert (aggregate.entity.balance, aggregate.sequence) == (35, 4)
    assert snapshot is not None
    assert (snapshot.sequence, snapshot.entity.balance) == (3, 30)


# -- several processes --


def _worker(mode: str, dsn: str, log: Path, worker: int, commands: int) -> list[str]:
    return _ledger.worker_command(
        mode, dsn, log, worker, worker * 104_729 + 1, commands, _ledger.ACCOUNTS
    )


def _worker_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}


async def test_processes_share_aggregates_safely(postgres_dsn: str, tmp_path: Path) -> None:
    """Three runtime processes on shared accounts: contiguous, exactly once, never negative."""
    logs = [tmp_path / f"worker-{n}.log" for n in range(3)]
    with trio.fail_after(45):
        await _ledger.run_workers(
            [_worker("runtime", postgres_dsn, logs[n], n, 80) for n in range(3)], env=_worker_env()
        )

    async with _open(postgres_dsn, transcoder=_bank.bank_transcoder()) as store:
        stored = await _ledger.read_everything(store)
        acks = _ledger.check_acknowledged(stored, logs, _ledger.ACCOUNTS)
        assert len(acks) == 3 * (80 + len(_ledger.ACCOUNTS))
        await _ledger.check_snapshots(store, _ledger.ACCOUNTS, required=True)


@pytest.mark.parametrize("mode", ["transfer", "transfer:8"], ids=["alone", "group-commit"])
async def test_killed_writers_lose_no_acknowledged_command(
    postgres_dsn: str, tmp_path: Path, raw: Any, mode: str
) -> None:
    """Writers SIGKILLed at random, even mid-batch: acked transfers stay, none is half-written."""
    async with _open(postgres_dsn, transcoder=_bank.bank_transcoder()) as store:
        await _ledger.seed_accounts(store, _ledger.ACCOUNTS, seed_id="seed-{}".format)
    rng = random.Random(1_000_003)
    logs: list[Path] = []
    for round_number in range(4):
        round_logs = [tmp_path / f"round-{round_number}-{n}.log" for n in range(2)]
        logs.extend(round_logs)
        commands = [
            _worker(mode, postgres_dsn, log, round_number * 10 + n + 1, 1_000_000)
            for n, log in enumerate(round_logs)
        ]
        await _ledger.kill_workers_at_random(
            commands, round_logs, rng, delays=(0.02, 0.3), env=_worker_env()
        )

        async with _open(postgres_dsn, transcoder=_bank.bank_transcoder()) as store:
            stored = await _ledger.read_everything(store)
        transfers, done = _ledger.check_transfers(
            stored, logs, _ledger.ACCOUNTS, seed_prefix="seed-"
        )
        assert len(transfers) >= len(done) > 0
    # The killed clients' sessions are gone: no transaction was left open on the server.
    await _poll(lambda: _store_backends(raw) == [])
