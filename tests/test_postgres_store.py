"""The PostgreSQL store against a real server: conformance, processes, crashes, gaps, faults.

Every test gets a database of its own (random name, force-dropped afterwards). Without a
reachable server the tests skip, except with CI=true, where they fail.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, cast

import outcome
import psycopg
import pytest
import trio
import trio.testing
from psycopg import sql

import trio_es._postgres_store as pg_module
from trio_es import (
    Aggregate,
    CommitOutcomeUnknown,
    ConcurrencyConflict,
    EventStoreError,
    SerializedEventEnvelope,
    TransactionFailed,
)
from trio_es._sql import EventRow
from trio_es._types import Snapshot, utc_now
from trio_es.postgres_store import PostgresStore
from trio_es.testing import (
    Added,
    Counter,
    EventStoreConformance,
    ProjectionSourceConformance,
    Renamed,
    conformance_transcoder,
)
from trio_es.testing._conformance import OpenStore

from . import _bank, _batching, _ledger, _loading, _pg

pytestmark = pytest.mark.postgres


class TestPostgresStoreConformance(EventStoreConformance):
    """PostgresStore passes the shared store suite, read_all and serialization included."""

    @pytest.fixture
    async def store(self, postgres_dsn: str) -> AsyncIterator[PostgresStore[Any, Any]]:
        """A fresh store on a fresh database."""
        async with PostgresStore.open(postgres_dsn, transcoder=conformance_transcoder()) as s:
            yield s


class TestPostgresStoreAsProjectionSource(ProjectionSourceConformance):
    """PostgresStore passes the projection-source suite, across two store objects too."""

    @pytest.fixture
    def open_another_store(self, postgres_dsn: str) -> OpenStore:
        """Opens another store object (its own pool, as another process has) on the database."""
        return lambda: PostgresStore.open(
            postgres_dsn,
            transcoder=conformance_transcoder(),
            poll_interval=self.poll_interval,
            takeover_interval=self.takeover_interval,
        )

    @pytest.fixture
    async def store(self, open_another_store: OpenStore) -> AsyncIterator[PostgresStore[Any, Any]]:
        """A fresh store on a fresh database, with the suite's intervals."""
        async with open_another_store() as s:
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
        ("events", "snapshots", 2)
    ]
    types = dict(
        raw.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'events'"
        ).fetchall()
    )
    assert types["payload"] == types["metadata"] == "jsonb"
    assert types["recorded_at"] == "timestamp with time zone"
    assert types["event_id"] == "uuid"


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
    raw.execute("UPDATE trio_es_schema_version SET version = 3")
    with pytest.raises(EventStoreError, match="schema version 3"):
        async with _open(postgres_dsn):
            pass  # pragma: no cover


_V1_DDL = (
    "CREATE TABLE trio_es_schema_version (events_table TEXT PRIMARY KEY, "
    "snapshots_table TEXT NOT NULL, version BIGINT NOT NULL)",
    "INSERT INTO trio_es_schema_version VALUES ('events', 'snapshots', 1)",
    "CREATE TABLE events (global_position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
    "aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, "
    "sequence BIGINT NOT NULL CHECK (sequence > 0), event_type TEXT NOT NULL, "
    "event_version BIGINT NOT NULL, payload JSONB NOT NULL, metadata JSONB NOT NULL, "
    "recorded_at TIMESTAMPTZ NOT NULL, UNIQUE (aggregate_type, aggregate_id, sequence))",
    "CREATE INDEX events_type_position ON events (aggregate_type, global_position)",
    "CREATE TABLE snapshots (aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, "
    "sequence BIGINT NOT NULL, entity_type TEXT NOT NULL, entity_version BIGINT NOT NULL, "
    "payload JSONB NOT NULL, recorded_at TIMESTAMPTZ NOT NULL, "
    "PRIMARY KEY (aggregate_type, aggregate_id))",
)


async def test_version_1_tables_are_migrated_on_open(postgres_dsn: str, raw: Any) -> None:
    """A version-1 database gains event ids (fresh, unique, NOT NULL) and says version 2."""
    for ddl in _V1_DDL:
        raw.execute(ddl)
    for aggregate_id, sequence, amount in [("acc", 1, 1), ("other", 1, 9), ("acc", 2, 2)]:
        raw.execute(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, "
            "event_version, payload, metadata, recorded_at) VALUES ('default', %s, %s, "
            "'conformance.Added', 1, %s, '[]', now())",
            (aggregate_id, sequence, f'{{"amount": {amount}}}'),
        )
    async with _open(postgres_dsn) as store:
        assert [e.payload for e in await _load(store, "acc")] == [Added(1), Added(2)]
        assert [s.global_position for s in await store.read_all(0, 10)] == [1, 2, 3]
        assert await _commit(store, "acc", 2, [Added(3)]) == 3
    ids = [row[0] for row in raw.execute("SELECT event_id FROM events ORDER BY 1")]
    assert len(ids) == len(set(ids)) == 4
    assert all(isinstance(event_id, uuid.UUID) for event_id in ids)
    assert raw.execute("SELECT version FROM trio_es_schema_version").fetchall() == [(2,)]
    assert raw.execute(
        "SELECT is_nullable, column_default FROM information_schema.columns "
        "WHERE table_name = 'events' AND column_name = 'event_id'"
    ).fetchall() == [("NO", None)]
    [(definition,)] = raw.execute(
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'events_event_id'"
    ).fetchall()
    assert "UNIQUE" in definition
    # Reopening a migrated database changes nothing.
    async with _open(postgres_dsn) as store:
        assert len(await store.read_all(0, 10)) == 4
    assert [row[0] for row in raw.execute("SELECT event_id FROM events ORDER BY 1")] == ids


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
        envelopes = [cast(SerializedEventEnvelope[Any], s.envelope) for s in stored]
        assert [envelope.aggregate_type for envelope in envelopes] == ["users"] * 2
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


#: A lone event (one statement that commits itself) and two (BEGIN ... COMMIT).
_ONE_OR_TWO_EVENTS: Final = pytest.mark.parametrize(
    "events", [[Added(2)], [Added(2), Added(3)]], ids=["one-statement", "pipeline"]
)


#: Sequence 2 of "acc", inserted by another program (without the store's commit lock).
_SEQUENCE_2_BEHIND_THE_STORE: Final = (
    "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, "
    "event_version, payload, metadata, recorded_at, event_id) VALUES ('default', "
    """'acc', 2, 'conformance.Added', 1, '{"amount": 99}', '[]', now(), """
    "gen_random_uuid())"
)


async def _commit_blocked_until(
    store: Any, raw: Any, release: Callable[[], object]
) -> outcome.Outcome[int]:
    """The outcome of committing ``Added(2)`` after sequence 1 of "acc", which blocks on
    the server; ``release()`` is called once the store's backend waits."""
    result: list[outcome.Outcome[int]] = []

    async def commit() -> None:
        result.append(await outcome.acapture(_commit, store, "acc", 1, [Added(2)]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(commit)
        await _wait_until_blocked(raw)
        release()
    return result[0]


async def test_unique_key_backs_the_check(postgres_dsn: str, raw: Any, blocker: Any) -> None:
    """A row written behind the store's back between check and insert still makes a conflict."""
    async with _open(postgres_dsn) as store:
        await _commit(store, "acc", 0, [Added(1)])
        # Hold the commit lock, so the store's commit passes its check and then waits.
        blocker.execute("BEGIN")
        blocker.execute("SELECT pg_advisory_xact_lock(%s)", (pg_module._commit_lock_key("events"),))

        def release() -> None:
            raw.execute(_SEQUENCE_2_BEHIND_THE_STORE)
            blocker.execute("COMMIT")

        result = await _commit_blocked_until(store, raw, release)
        with pytest.raises(ConcurrencyConflict) as info:
            result.unwrap()
        assert (info.value.expected_sequence, info.value.actual_sequence) == (1, 2)
        assert [e.payload for e in await _load(store, "acc")] == [Added(1), Added(99)]


def _last_position_drawn(raw: psycopg.Connection[tuple[Any, ...]]) -> int | None:
    """The last value the events table's identity handed out, committed or not."""
    row = raw.execute(
        "SELECT pg_sequence_last_value(pg_get_serial_sequence('events', 'global_position'))"
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


@_ONE_OR_TWO_EVENTS
async def test_a_commit_draws_no_position_before_it_holds_the_commit_lock(
    postgres_dsn: str, raw: Any, blocker: Any, events: list[Added]
) -> None:
    """A commit waiting for the commit lock has drawn no position yet (commit order holds)."""
    async with _open(postgres_dsn) as store:
        await _commit(store, "acc", 0, [Added(1)])
        drawn = _last_position_drawn(raw)
        blocker.execute("BEGIN")
        blocker.execute("SELECT pg_advisory_xact_lock(%s)", (pg_module._commit_lock_key("events"),))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_commit, store, "acc", 1, events)
            pid = await _wait_until_blocked(raw)
            assert _last_position_drawn(raw) == drawn
            [query] = [query for p, _, query in _store_backends(raw) if p == pid]
            if len(events) == 1:
                # A lone event's commit is one statement, which takes the lock itself.
                assert query.startswith("WITH commit_lock AS MATERIALIZED"), query
            blocker.execute("COMMIT")
        assert _last_position_drawn(raw) == cast(int, drawn) + len(events)
        assert [e.payload for e in await _load(store, "acc")] == [Added(1), *events]


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


# -- commits in one round trip: the sequence checks ride along with the inserts --


class _RoundTripCounter:
    """A TCP proxy to the test server (a spy, no fake) counting the client's round trips.

    A round trip is a message with which the client asks the server to answer what it
    sent so far, then waits: a Sync (``S``, the end of a pipeline or of a statement), a
    Flush (``H``: psycopg's request for results mid-pipeline, e.g. by
    ``executemany(returning=True)``) or a simple Query (``Q``). A Flush right after a
    Sync asks for the same answers (psycopg sends one on leaving a pipeline) and is not
    counted. Counted in message order, so the count does not depend on timing. The
    startup packets before the first typed message are skipped.
    """

    def __init__(self, dsn: str) -> None:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        self._dsn = dsn
        self._address = (str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
        #: Round trips of every connection so far.
        self.round_trips = 0

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections on a free loopback port; report the DSN through ``started``."""
        await _pg.serve_proxy(self._dsn, self._handle, task_status)

    def _count(self, buffer: bytearray, last: int | None) -> int | None:
        """Count the whole messages in ``buffer`` and consume them; return the last one's
        type (``None``: still in the untyped startup packets)."""
        while True:
            header = 4 if last is None else 5
            if len(buffer) < header:
                return last
            length = int.from_bytes(buffer[header - 4 : header], "big")
            if len(buffer) < header - 4 + length:
                return last
            if last is None:
                # SSL and GSS requests come before the startup message (protocol 3.0).
                if int.from_bytes(buffer[4:8], "big") == 196608:
                    last = 0
            else:
                kind = buffer[0]
                if kind in b"SQ" or (kind == ord("H") and last != ord("S")):
                    self.round_trips += 1
                last = kind
            del buffer[: header - 4 + length]

    async def _handle(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream(*self._address)
        async with client, server, trio.open_nursery() as nursery:

            async def upstream() -> None:
                buffer, last = bytearray(), None
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    async for data in client:
                        buffer += data
                        last = self._count(buffer, last)
                        await server.send_all(data)
                nursery.cancel_scope.cancel()

            async def downstream() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    async for data in server:
                        await client.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(upstream)
            nursery.start_soon(downstream)


@asynccontextmanager
async def _counting_round_trips(dsn: str) -> AsyncIterator[tuple[_RoundTripCounter, Any]]:
    """A store with one pooled connection through a :class:`_RoundTripCounter`."""
    counter = _RoundTripCounter(dsn)
    async with trio.open_nursery() as nursery:
        proxied: str = await nursery.start(counter.serve)
        async with _open(proxied, pool_size=1) as store:
            yield counter, store
        nursery.cancel_scope.cancel()


_plan = _pg.commit_plan


async def _commit_together(store: Any, writes: list[tuple[str, int, list[Any]]]) -> None:
    """Commit ``(aggregate_id, sequence, events)`` writes in one transaction."""
    async with store.transaction() as tx:
        for aggregate_id, sequence, events in writes:
            await store.commit_events(tx, Aggregate(aggregate_id, Counter(), sequence), events, ())


def _sequences(raw: psycopg.Connection[tuple[Any, ...]]) -> dict[str, list[int]]:
    """Every stored aggregate's sequences, in order."""
    stored: dict[str, list[int]] = collections.defaultdict(list)
    for aggregate_id, sequence in raw.execute(
        "SELECT aggregate_id, sequence FROM events ORDER BY aggregate_id, sequence"
    ).fetchall():
        stored[str(aggregate_id)].append(int(sequence))
    return dict(stored)


async def test_a_commit_is_one_round_trip(postgres_dsn: str) -> None:
    """A lone commit, one with a snapshot and two aggregates, a batch: one round trip each."""
    async with _counting_round_trips(postgres_dsn) as (counter, store):
        await _commit(store, "acc", 0, [Added(1)])  # connects
        before = counter.round_trips
        await _commit(store, "acc", 1, [Added(2)])
        assert counter.round_trips - before == 1
        before = counter.round_trips
        async with store.transaction() as tx:
            await store.commit_events(tx, Aggregate("acc", Counter(), 2), [Added(3)], ())
            await store.commit_events(tx, Aggregate("b", Counter(), 0), [Added(3), Added(4)], ())
            await store.save_snapshot(tx, Snapshot("acc", Counter(3), 3, utc_now()))
        assert counter.round_trips - before == 1
        before = counter.round_trips
        plans = [_plan(store, {f"p{n}": 0}, {f"p{n}": 2}) for n in range(3)]
        results = await store._commit_batch(plans)
        assert counter.round_trips - before == 1
        positions = [sorted(p for p, _ in result.unwrap().values()) for result in results]
        assert [len(p) for p in positions] == [2, 2, 2]
        assert positions == sorted(positions)
        assert [s.envelope.sequence for s in await store.read_all(0, 100)] == [
            1, 2, 3, 1, 2, 1, 2, 1, 2, 1, 2,
        ]  # fmt: skip


async def test_a_plan_ahead_of_the_store_is_refused_and_leaves_no_gap(
    postgres_dsn: str, raw: Any
) -> None:
    """Expected sequence beyond the stored one (a cache ahead of the store): conflict, no gap."""
    async with _open(postgres_dsn) as store:
        with pytest.raises(ConcurrencyConflict) as info:
            await _commit(store, "acc", 5, [Added(6), Added(7)])
        assert (info.value.aggregate_id, info.value.expected_sequence) == ("acc", 5)
        assert info.value.actual_sequence == 0
        await _commit(store, "acc", 0, [Added(1)])
        with pytest.raises(ConcurrencyConflict) as info:
            await _commit(store, "acc", 3, [Added(4)])
        assert (info.value.expected_sequence, info.value.actual_sequence) == (3, 1)
        # Alone in a multi-aggregate transaction, the gap-maker spoils the whole of it.
        with pytest.raises(ConcurrencyConflict) as info:
            await _commit_together(store, [("fresh", 0, [Added(1)]), ("acc", 2, [Added(3)])])
        assert (info.value.aggregate_id, info.value.expected_sequence) == ("acc", 2)
    assert _sequences(raw) == {"acc": [1]}


async def test_stale_and_ahead_plans_in_a_batch_fail_alone(postgres_dsn: str, raw: Any) -> None:
    """A batch with a stale and an ahead plan: those two conflict, the others commit once."""
    async with _open(postgres_dsn) as store:
        await _commit(store, "acc", 0, [Added(1), Added(2)])
        plans = [
            _plan(store, {"a": 0}, {"a": 1}),
            _plan(store, {"acc": 1, "b": 0}, {"acc": 1, "b": 1}),  # stale
            _plan(store, {"c": 0, "acc": 2}, {"c": 2, "acc": 1}),
            _plan(store, {"d": 4}, {"d": 1}),  # ahead
            _plan(store, {"c": 2}, {"c": 1}),  # follows the plan before it in the batch
        ]
        results = await store._commit_batch(plans)
        conflicts = [
            (error.aggregate_id, error.expected_sequence, error.actual_sequence)
            for result in results
            if isinstance(result, outcome.Error)
            and isinstance(error := result.error, ConcurrencyConflict)
        ]
        assert conflicts == [("acc", 1, 2), ("d", 4, 0)]
        assert [isinstance(result, outcome.Value) for result in results] == [
            True, False, True, False, True,
        ]  # fmt: skip
        stored = {s.envelope.event_id: s.global_position for s in await store.read_all(0, 100)}
        for plan, result in zip(plans, results, strict=True):
            if isinstance(result, outcome.Value):
                assert {i: p for i, (p, _) in result.value.items()} == {
                    row.event_id: stored[row.event_id] for row in plan.events
                }
    assert _sequences(raw) == {"a": [1], "acc": [1, 2, 3], "c": [1, 2, 3]}


async def test_a_commit_without_events_still_checks_its_sequence(
    postgres_dsn: str, raw: Any
) -> None:
    """A transaction that expects a sequence but adds no event: stale or ahead conflicts."""
    async with _counting_round_trips(postgres_dsn) as (counter, store):
        await _commit(store, "acc", 0, [Added(1)])
        for sequence in (0, 2):
            with pytest.raises(ConcurrencyConflict) as info:
                await _commit(store, "acc", sequence, [])
            assert (info.value.expected_sequence, info.value.actual_sequence) == (sequence, 1)
        before = counter.round_trips
        assert await _commit(store, "acc", 1, []) == 1
        # This rare shape checks first (two round trips): no insert carries its check.
        assert counter.round_trips - before == 2
        # With events for another aggregate in the same transaction, too.
        with pytest.raises(ConcurrencyConflict) as info:
            await _commit_together(store, [("b", 0, [Added(1)]), ("acc", 0, [])])
        assert (info.value.aggregate_id, info.value.expected_sequence) == ("acc", 0)
    assert _sequences(raw) == {"acc": [1]}


async def test_unique_key_backs_the_check_against_writers_without_the_lock(
    postgres_dsn: str, raw: Any, blocker: Any
) -> None:
    """A row another program inserted but has not committed at our check: the key refuses ours."""
    async with _open(postgres_dsn) as store:
        await _commit(store, "acc", 0, [Added(1)])
        # Not committed: invisible to the store's check, which passes; its insert then
        # waits on the unique key for this transaction, and fails once it commits.
        blocker.execute("BEGIN")
        blocker.execute(_SEQUENCE_2_BEHIND_THE_STORE)
        result = await _commit_blocked_until(store, raw, lambda: blocker.execute("COMMIT"))
        with pytest.raises(ConcurrencyConflict) as info:
            result.unwrap()
        assert (info.value.expected_sequence, info.value.actual_sequence) == (1, 2)
    assert _sequences(raw) == {"acc": [1, 2]}


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


@asynccontextmanager
async def _through_proxy(dsn: str) -> AsyncIterator[tuple[_pg.FaultInjectingProxy, str]]:
    """A fault-injecting proxy to the test database, and the DSN that goes through it."""
    proxy = _pg.FaultInjectingProxy(dsn)
    async with trio.open_nursery() as nursery:
        proxied: str = await nursery.start(proxy.serve)
        yield proxy, proxied
        nursery.cancel_scope.cancel()


def _event_count(raw: psycopg.Connection[tuple[Any, ...]]) -> int:
    row = raw.execute("SELECT count(*) FROM events").fetchone()
    return -1 if row is None else int(row[0])


@_ONE_OR_TWO_EVENTS
async def test_commit_that_landed_before_the_connection_broke_is_reported_committed(
    postgres_dsn: str, raw: Any, events: list[Added]
) -> None:
    """COMMIT done, reply lost with the connection: the store finds it landed and says OK."""
    async with _through_proxy(postgres_dsn) as (proxy, dsn), _open(dsn, pool_size=1) as store:
        await _commit(store, "acc", 0, [Added(1)])
        proxy.drop_at_next_commit(landed=True)
        assert await _commit(store, "acc", 1, events) == 1 + len(events)
        assert proxy.drops == 1
        assert [e.payload for e in await _load(store, "acc")] == [Added(1), *events]
        assert await _commit(store, "acc", 1 + len(events), [Added(9)]) == 2 + len(events)
    assert _event_count(raw) == 2 + len(events)


@_ONE_OR_TWO_EVENTS
async def test_commit_lost_before_it_reached_the_server_is_a_retryable_failure(
    postgres_dsn: str, raw: Any, events: list[Added]
) -> None:
    """Connection cut as COMMIT is sent: the store finds nothing landed, TransactionFailed."""
    async with _through_proxy(postgres_dsn) as (proxy, dsn), _open(dsn, pool_size=1) as store:
        await _commit(store, "acc", 0, [Added(1)])
        proxy.drop_at_next_commit(landed=False)
        with pytest.raises(TransactionFailed, match="nothing was committed") as info:
            await _commit(store, "acc", 1, events)
        assert not isinstance(info.value, ConcurrencyConflict)
        assert info.value.aggregate_id == "acc"
        assert proxy.drops == 1
        assert [e.payload for e in await _load(store, "acc")] == [Added(1)]
        assert await _commit(store, "acc", 1, [Added(3)]) == 2
    assert _event_count(raw) == 2


async def test_lost_commit_with_the_server_unreachable_is_outcome_unknown(
    postgres_dsn: str, raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT lost and no new connection possible: CommitOutcomeUnknown naming the aggregate."""
    monkeypatch.setattr(pg_module, "_RESOLVE_SECONDS", 1.0)
    async with _through_proxy(postgres_dsn) as (proxy, dsn), _open(dsn, pool_size=2) as store:
        async with trio.open_nursery() as nursery:  # open both pooled connections
            nursery.start_soon(_load, store, "acc")
            nursery.start_soon(_load, store, "other")
        proxy.drop_at_next_commit(landed=True)
        proxy.refuse_after_drop = True

        async def commit_two() -> None:
            async with store.transaction() as tx:
                await store.commit_events(tx, Aggregate("acc", Counter(), 0), [Added(1)], ())
                await store.commit_events(tx, Aggregate("b", Counter(), 0), [Added(2)], ())

        started = trio.current_time()
        with pytest.raises(CommitOutcomeUnknown, match="could not find out") as info:
            await commit_two()
        assert trio.current_time() - started < 5
        assert info.value.aggregate_id == "acc"
        assert "'acc', 'b'" in str(info.value)
        proxy.refuse = False
        # It had landed; once the server is reachable again, the store sees it.
        assert [e.payload for e in await _load(store, "acc")] == [Added(1)]
    assert _event_count(raw) == 2


async def test_lost_commit_in_a_batch_answers_every_plan(
    postgres_dsn: str, raw: Any, blocker: Any
) -> None:
    """A lost COMMIT of a group-committed batch: each caller gets the batch's real outcome."""
    async with _through_proxy(postgres_dsn) as (proxy, dsn), _open(dsn, pool_size=1) as store:
        await _commit(store, "acc-0", 0, [Added(0)])
        results: dict[str, outcome.Outcome[int]] = {}

        async def commit(aggregate_id: str, sequence: int) -> None:
            results[aggregate_id] = await outcome.acapture(
                _commit, store, aggregate_id, sequence, [Added(1)]
            )

        for landed in (True, False):
            results.clear()
            before = _event_count(raw)
            # A stale commit waits for the table while the others queue behind it, so
            # that they are committed as one batch.
            blocker.execute("BEGIN")
            blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(commit, "acc-0", 0)
                await _wait_until_blocked(raw)
                # Armed only now: the stale commit sent its COMMIT with its first bytes.
                proxy.drop_at_next_commit(landed=landed)
                for number in range(1, 8):
                    nursery.start_soon(commit, f"acc-{number}", 0 if landed else 1)
                await trio.testing.wait_all_tasks_blocked()
                blocker.execute("ROLLBACK")
            with pytest.raises(ConcurrencyConflict):
                results.pop("acc-0").unwrap()
            if landed:
                assert [result.unwrap() for result in results.values()] == [1] * 7
                assert _event_count(raw) == before + 7
            else:
                for result in results.values():
                    with pytest.raises(TransactionFailed, match="nothing was committed"):
                        result.unwrap()
                assert _event_count(raw) == before
        assert proxy.drops == 2


async def test_lost_commit_while_a_refused_batch_is_split_is_resolved_per_plan(
    postgres_dsn: str, raw: Any, blocker: Any
) -> None:
    """A batch split by a refused row, then a lost COMMIT: each plan gets its true outcome."""
    too_long = secrets.token_hex(5000)
    results: dict[str, outcome.Outcome[int]] = {}

    async def commit(aggregate_id: str, sequence: int) -> None:
        results[aggregate_id] = await outcome.acapture(
            _commit, store, aggregate_id, sequence, [Added(1)]
        )

    async with _through_proxy(postgres_dsn) as (proxy, dsn), _open(dsn, pool_size=1) as store:
        await _commit(store, "acc-0", 0, [Added(0)])
        proxy.drop_at_next_commit(landed=True)
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit, "acc-0", 0)
            await _wait_until_blocked(raw)
            for aggregate_id in (too_long, "a", "b", "c"):
                nursery.start_soon(commit, aggregate_id, 0)
            await trio.testing.wait_all_tasks_blocked()
            blocker.execute("ROLLBACK")
        assert proxy.drops == 1
        stored = {
            s.envelope.aggregate_id: s.envelope.sequence for s in await store.read_all(0, 100)
        }
    with pytest.raises(ConcurrencyConflict):
        results.pop("acc-0").unwrap()
    # Each answer is true: OK means stored once; TransactionFailed (not sent after the
    # lost COMMIT) and the long id's EventStoreError mean not stored.
    answered = {
        aggregate_id[:8]: (
            stored.get(aggregate_id) == 1
            if isinstance(result, outcome.Value)
            else isinstance(cast(outcome.Error, result).error, TransactionFailed | EventStoreError)
            and aggregate_id not in stored
        )
        for aggregate_id, result in results.items()
    }
    assert answered == {"a": True, "b": True, "c": True, too_long[:8]: True}
    assert any(isinstance(result, outcome.Value) for result in results.values())
    assert isinstance(results[too_long], outcome.Error)
    assert too_long not in stored


async def test_stored_event_ids_make_a_resent_plan_committed(postgres_dsn: str, raw: Any) -> None:
    """A plan whose event ids are stored already is reported committed, where they are stored."""
    async with _open(postgres_dsn) as store:
        await _commit(store, "acc", 0, [Added(1)])
        row = raw.execute("SELECT event_id, global_position, recorded_at FROM events").fetchone()
        assert row is not None
        assert isinstance(row[0], uuid.UUID)
        again = EventRow("acc", 2, "conformance.Added", 1, '{"amount": 2}', "[]", row[0])
        plan = pg_module._Commit(
            store._statements, "default", store._lock_key, {"acc": 1}, [again], []
        )
        [result] = await store._commit_batch([plan])
        assert result.unwrap() == {row[0]: (row[1], row[2])}
        assert [e.payload for e in await _load(store, "acc")] == [Added(1)]
    assert _event_count(raw) == 1


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


async def test_a_snapshot_and_the_events_after_it_load_in_one_call(postgres_dsn: str) -> None:
    """load_snapshot_and_events equals load_snapshot then load_events after it, also staged."""
    async with _open(postgres_dsn) as store:
        await _loading.assert_snapshot_and_events_load_together(store)


# -- lost connections: every commit stored at most once, acknowledged ones exactly once --


async def test_killed_backends_never_store_a_commit_twice(postgres_dsn: str, raw: Any) -> None:
    """Backends killed while 24 writers commit: OK once, failed never, unknown at most once."""
    # The writers go on past ``seconds`` (up to ``cap``) until 50 commits were acknowledged
    # amid the kills: on a loaded machine reconnecting takes most of each kill interval.
    writers, aggregates, seconds, cap, enough = 24, 6, 6.0, 60.0, 50
    outcomes: dict[str, str] = {}
    kills = 0
    rng = random.Random(8)

    def going(deadline: float) -> bool:
        now = trio.current_time()
        acknowledged = sum(1 for result in outcomes.values() if result == "ok")
        return now < deadline or (acknowledged <= enough and now < deadline - seconds + cap)

    async with _open(postgres_dsn, pool_size=4) as store:

        async def writer(number: int, deadline: float) -> None:
            aggregate_id = f"acc-{number % aggregates}"
            attempt = 0
            while going(deadline):
                tag = f"{number}-{attempt}"
                attempt += 1
                try:
                    async with store.transaction() as tx:
                        stored = await store.load_events(tx, aggregate_id, 0)
                        await store.commit_events(
                            tx,
                            Aggregate(aggregate_id, Counter(), len(stored)),
                            [Added(number)],
                            (("tag", tag),),
                        )
                except CommitOutcomeUnknown:
                    outcomes[tag] = "unknown"
                except TransactionFailed:
                    outcomes[tag] = "failed"
                except EventStoreError:
                    outcomes[tag] = "error"
                except outcome.AlreadyUsedError:
                    # Group commit used to hand one batch's error object to every caller
                    # (issue 8, defect 6): the caller learns nothing, like "unknown".
                    outcomes[tag] = "other"
                else:
                    outcomes[tag] = "ok"

        async def killer(deadline: float) -> None:
            nonlocal kills
            while going(deadline):
                await trio.sleep(rng.uniform(0.005, 0.04))
                killed = raw.execute(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM "
                    "pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'trio_es' AND pid <> pg_backend_pid()) AS k"
                ).fetchone()
                kills += 0 if killed is None else int(killed[0])

        deadline = trio.current_time() + seconds
        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer, deadline)
            for number in range(writers):
                nursery.start_soon(writer, number, deadline)
        stored_events = await _ledger.read_everything(store)

    tags = collections.Counter(dict(s.envelope.metadata)["tag"] for s in stored_events)
    results = collections.Counter(outcomes.values())
    assert kills > 20, kills
    assert results["ok"] > enough, results
    # What each outcome allows: acknowledged once, failed before commit never, unknown
    # (or an answer that says nothing, "other") at most once.
    allowed = {"ok": {1}, "failed": {0}, "error": {0}, "unknown": {0, 1}, "other": {0, 1}}
    violations = collections.Counter(
        f"{result} stored {tags[tag]}x"
        for tag, result in outcomes.items()
        if tags[tag] not in allowed[result]
    )
    violations.update("phantom" for tag in tags if tag not in outcomes)
    assert violations == {}, (violations, results)
    by_aggregate: dict[str, list[int]] = collections.defaultdict(list)
    for s in stored_events:
        by_aggregate[s.envelope.aggregate_id].append(s.envelope.sequence)
    for sequences in by_aggregate.values():
        assert sequences == list(range(1, len(sequences) + 1))


async def test_opening_prepares_the_transcoder(postgres_dsn: str) -> None:
    """Open builds the transcoder's cattrs hooks: the first commit and load generate none."""
    await _loading.assert_opening_prepares_the_transcoder(
        lambda transcoder: PostgresStore.open(postgres_dsn, transcoder=transcoder)
    )
