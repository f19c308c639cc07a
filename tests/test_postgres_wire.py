"""The PostgreSQL wire path: statements pipelined from the Trio thread, no worker thread."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import outcome
import psycopg
import psycopg.errors
import pytest
import trio
import trio.testing

from trio_es import Aggregate, ConcurrencyConflict, TransactionFailed
from trio_es._postgres_connection import PooledConnection, connect, translate_error
from trio_es._postgres_wire import BEGIN, COMMIT, ROLLBACK, Query, exchange
from trio_es.postgres_store import PostgresStore
from trio_es.testing import Added, Counter, conformance_transcoder

from . import _pg

pytestmark = pytest.mark.postgres

_LOCK_KEY = 4242


@pytest.fixture
async def conn(postgres_dsn: str) -> AsyncIterator[PooledConnection]:
    """A store connection (as the pool makes them), closed after the test."""
    pooled = await connect(postgres_dsn)
    try:
        yield pooled
    finally:
        pooled.discard()


def _values(conn: PooledConnection, result: Any) -> list[tuple[Any, ...]]:
    return conn.rows(result)


def test_a_query_numbers_its_placeholders_and_is_named_by_its_text() -> None:
    """Query.of turns %s into $1..$n; equal texts share a name, unprepared ones have none."""
    query = Query.of("SELECT %s::int + %s::int")
    assert query.sql == b"SELECT $1::int + $2::int"
    assert query.name is not None
    assert query.name.startswith(b"trio_es_")
    assert Query.of("SELECT %s::int + %s::int").name == query.name
    assert Query.of("SELECT %s::int - %s::int").name != query.name
    assert Query.of("BEGIN", prepare=False) == Query(b"BEGIN")


def test_a_query_with_a_literal_percent_is_refused() -> None:
    """A literal % cannot be told from a placeholder: the error shows the text."""
    with pytest.raises(ValueError, match=r"cannot hold a literal % \(got 'SELECT 5 %% 2'\)"):
        Query.of("SELECT 5 %% 2")


async def test_statements_run_in_order_and_answer_in_order(conn: PooledConnection) -> None:
    """One pipeline: a transaction's statements run in order, one result each, in order."""
    await conn.exchange([(Query.of("CREATE TABLE t (n int)", prepare=False), ())])
    insert = Query.of("INSERT INTO t VALUES (%s) RETURNING n * 10")
    results = await conn.exchange(
        [
            (BEGIN, ()),
            (insert, (1,)),
            (insert, (2,)),
            (Query.of("SELECT count(*) FROM t"), ()),
            (COMMIT, ()),
        ]
    )
    assert len(results) == 5
    assert [_values(conn, r) for r in results[1:4]] == [[(10,)], [(20,)], [(2,)]]
    assert conn.usable()


async def test_a_failed_statement_raises_its_error_and_the_rest_is_skipped(
    conn: PooledConnection, raw: Any
) -> None:
    """The first failing statement's error (with its SQLSTATE) is raised; nothing after it ran."""
    await conn.exchange([(Query.of("CREATE TABLE t (n int)", prepare=False), ())])
    insert = Query.of("INSERT INTO t VALUES (%s)")
    with pytest.raises(psycopg.errors.DivisionByZero) as info:
        await conn.exchange(
            [
                (BEGIN, ()),
                (insert, (1,)),
                (Query.of("SELECT 1 / %s::int"), (0,)),
                (insert, (2,)),
                (COMMIT, ()),
            ]
        )
    assert info.value.sqlstate == "22012"
    # The transaction is left failed, for the caller to roll back; then all is usable.
    assert conn.raw.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    await conn.exchange([(ROLLBACK, ())])
    assert conn.usable()
    assert raw.execute("SELECT count(*) FROM t").fetchone() == (0,)
    [result] = await conn.exchange([(Query.of("SELECT %s::int + 1"), (41,))])
    assert _values(conn, result) == [(42,)]


async def test_every_exchange_is_a_checkpoint(conn: PooledConnection, raw: Any) -> None:
    """An exchange checkpoints, also with its results there at once; cancelled, it sends nothing."""
    await conn.exchange([(Query.of("CREATE TABLE t (n int)", prepare=False), ())])
    select = Query.of("SELECT %s::int")
    for _ in range(20):
        with trio.testing.assert_checkpoints():
            await conn.exchange([(select, (1,))])
    with trio.CancelScope() as scope:
        scope.cancel()
        await conn.exchange([(Query.of("INSERT INTO t VALUES (%s)"), (1,))])
    assert scope.cancelled_caught
    assert raw.execute("SELECT count(*) FROM t").fetchone() == (0,)
    assert conn.usable()


async def test_a_statement_is_prepared_once_per_session(conn: PooledConnection) -> None:
    """A query run again uses the statement prepared on its first run, kept across a rollback."""
    query = Query.of("SELECT %s::int * 2")
    count = Query.of("SELECT count(*) FROM pg_prepared_statements WHERE name = %s")
    assert query.name is not None
    for n in range(3):
        [result] = await conn.exchange([(query, (n,))])
        assert _values(conn, result) == [(2 * n,)]
    await conn.exchange([(BEGIN, ()), (query, (1,)), (ROLLBACK, ())])
    [result] = await conn.exchange([(count, (query.name.decode(),))])
    assert _values(conn, result) == [(1,)]
    assert conn.session is not None
    assert query.name in conn.session.prepared


async def test_thread_calls_never_drop_the_prepared_statements(conn: PooledConnection) -> None:
    """Statements run often then rolled back in a worker thread leave the wire's prepared ones.

    psycopg's own statement cache would answer that ROLLBACK with DEALLOCATE ALL; it is
    off on store connections.
    """
    query = Query.of("SELECT %s::int + 1")
    await conn.exchange([(query, (1,))])

    def often_then_rollback(raw: Any, call: object) -> None:
        for n in range(10):
            raw.execute("SELECT %s::int * 3", (n,))
        raw.execute("BEGIN")
        raw.execute("SELECT %s::int * 3", (0,))
        raw.rollback()

    await conn.run(often_then_rollback)
    [result] = await conn.exchange([(query, (2,))])
    assert _values(conn, result) == [(3,)]


async def test_a_pipeline_larger_than_the_socket_buffers_does_not_stall(
    conn: PooledConnection,
) -> None:
    """Megabytes each way in one exchange: results are read while the rest is still sent."""
    echo = Query.of("SELECT %s::text")
    text = "x" * 4096
    with trio.fail_after(60):
        results = await conn.exchange([(echo, (f"{n}{text}",)) for n in range(3000)])
    assert [_values(conn, r)[0][0][:4] for r in results[:3]] == ["0xxx", "1xxx", "2xxx"]
    assert len(results) == 3000
    assert conn.usable()


async def _cancel_while_locked(
    conn: PooledConnection, blocker: Any
) -> list[tuple[Query, tuple[object, ...]]]:
    """Send BEGIN, a lock ``blocker`` holds (until its ROLLBACK), COMMIT; cancel it 0.3 s in.

    Returns the pipeline, whose lock statement the cancelled exchange prepared.
    """
    blocker.execute("BEGIN")
    blocker.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
    lock = Query.of("SELECT pg_advisory_xact_lock(%s::bigint)")
    pipeline: list[tuple[Query, tuple[object, ...]]] = [
        (BEGIN, ()),
        (lock, (_LOCK_KEY,)),
        (COMMIT, ()),
    ]
    with trio.move_on_after(0.3) as scope:
        await conn.exchange(pipeline)
    assert scope.cancelled_caught
    return pipeline


async def test_a_cancelled_exchange_is_stopped_on_the_server_and_the_connection_kept(
    conn: PooledConnection, raw: Any, blocker: Any
) -> None:
    """Cancelled while a statement waits for a lock: the server stops it, the session is idle."""
    await _cancel_while_locked(conn, blocker)
    assert conn.usable()
    assert not conn.discarded
    pid = conn.raw.info.backend_pid
    state = raw.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    assert state == ("idle",)
    blocker.execute("ROLLBACK")
    [result] = await conn.exchange([(Query.of("SELECT %s::int"), (7,))])
    assert _values(conn, result) == [(7,)]


async def test_a_statement_prepared_by_a_cancelled_exchange_is_known_afterwards(
    conn: PooledConnection, blocker: Any
) -> None:
    """What a cancelled exchange prepared on the server is not prepared again (no 42P05)."""
    pipeline = await _cancel_while_locked(conn, blocker)
    blocker.execute("ROLLBACK")
    results = await conn.exchange(pipeline)
    done, rows = psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK
    assert [result.status for result in results] == [done, rows, done]


@pytest.mark.parametrize("wrong", ["forgotten", "deallocated"])
async def test_a_session_out_of_step_with_the_server_fails_once_then_recovers(
    conn: PooledConnection, wrong: str
) -> None:
    """A statement the server holds unknown to the session, or gone from it: one retryable error."""
    query = Query.of("SELECT %s::int * 5")
    assert query.name is not None
    await conn.exchange([(query, (1,))])
    assert conn.session is not None
    if wrong == "forgotten":
        conn.session.prepared.discard(query.name)
        expected: type[psycopg.Error] = psycopg.errors.DuplicatePreparedStatement
    else:
        await conn.exchange([(Query.of("DEALLOCATE ALL", prepare=False), ())])
        expected = psycopg.errors.InvalidSqlStatementName
    with pytest.raises(expected) as raised:
        await conn.exchange([(query, (2,))])
    assert isinstance(
        translate_error(raised.value, doing="reading", server="here"), TransactionFailed
    )
    for n in range(3):
        [result] = await conn.exchange([(query, (n,))])
        assert _values(conn, result) == [(5 * n,)]


async def test_a_connection_lost_mid_exchange_is_given_up(conn: PooledConnection, raw: Any) -> None:
    """The server ends the session while a statement runs: OperationalError, connection dropped."""
    sleep = Query.of("SELECT pg_sleep(%s::float)")

    async def kill_soon() -> None:
        await trio.sleep(0.2)
        raw.execute("SELECT pg_terminate_backend(%s)", (conn.raw.info.backend_pid,))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(kill_soon)
        with pytest.raises(psycopg.OperationalError):
            await conn.exchange([(sleep, (5,))])
    assert conn.discarded
    assert not conn.usable()


async def test_an_exchange_interrupted_without_settling_marks_its_session_broken(
    conn: PooledConnection,
) -> None:
    """The bare exchange, cancelled mid-flight, marks the session broken (state unknown)."""
    session = conn.session
    if session is None:
        await conn.exchange([(Query.of("SELECT 1"), ())])
        session = conn.session
    assert session is not None
    with trio.move_on_after(0.2):
        await exchange(session, [(Query.of("SELECT pg_sleep(%s::float)"), (5,))])
    assert session.broken


# -- the store on the wire path --


def _open(dsn: str, **options: Any) -> Any:
    return PostgresStore.open(dsn, transcoder=conformance_transcoder(), **options)


async def _commit(store: Any, aggregate_id: str, sequence: int, events: list[Any]) -> int:
    async with store.transaction() as tx:
        _, new_sequence = await store.commit_events(
            tx, Aggregate(aggregate_id, Counter(), sequence), events, ()
        )
    return int(new_sequence)


async def test_commits_and_loads_take_no_worker_thread(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit, a load and a snapshot load run from the Trio thread: no thread call at all."""
    async with _open(postgres_dsn) as store:
        await _commit(store, "warm", 0, [Added(1)])  # connection made (in a thread) first

        async def no_thread(*args: object, **kwargs: object) -> object:
            raise AssertionError("a worker thread was used on the hot path")

        # Only around the hot path: closing the store hands its connections to a thread.
        with monkeypatch.context() as patched:
            patched.setattr(trio.to_thread, "run_sync", no_thread)
            assert await _commit(store, "acc", 0, [Added(1), Added(2)]) == 2
            assert await _commit(store, "acc", 2, [Added(3)]) == 3
            async with store.transaction() as tx:
                events = await store.load_events(tx, "acc", 1)
                snapshot, tail = await store.load_snapshot_and_events(tx, "acc")
        assert [e.sequence for e in events] == [2, 3]
        assert snapshot is None
        assert [e.sequence for e in tail] == [1, 2, 3]


async def test_a_refused_batch_is_redone_in_a_thread_and_the_connection_serves_on(
    postgres_dsn: str,
) -> None:
    """A batch refused on the wire and redone in a worker thread: each plan answered, and the
    connection (its prepared statements) serves the next commits."""
    async with _open(postgres_dsn, pool_size=1) as store:
        await _commit(store, "acc", 0, [Added(1), Added(2)])
        for round_number in range(3):
            plans = [
                _pg.commit_plan(store, {f"a{round_number}": 0}, {f"a{round_number}": 1}),
                _pg.commit_plan(store, {"acc": 1}, {"acc": 1}),  # stale
            ]
            results = await store._commit_batch(plans)
            assert isinstance(results[0], outcome.Value)
            assert isinstance(results[1], outcome.Error)
            assert isinstance(results[1].error, ConcurrencyConflict)
            assert await _commit(store, f"b{round_number}", 0, [Added(1)]) == 1
