"""The PostgreSQL store as a projection source: positions, LISTEN/NOTIFY, leases, faults.

The shared projection-source suite runs in test_postgres_store.py; these are the
PostgreSQL-specific parts: positions through group commit and lost connections, the
NOTIFY of every commit, a listener that loses its connection, and the advisory-lock
lease when its holder's connection or process dies. Every test gets a database of its
own; without a reachable server the tests skip, except with CI=true, where they fail.
"""

from __future__ import annotations

import functools
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import outcome
import psycopg
import psycopg.errors
import pytest
import trio
import trio.testing

from trio_es import Aggregate, CheckpointMoved, ConcurrencyConflict, EventStoreError
from trio_es._postgres_lease import LEASE_APPLICATION_NAME, lease_key
from trio_es._postgres_listen import LISTEN_APPLICATION_NAME
from trio_es._sql import notify_channel
from trio_es._store import Lease, ProjectionSource, Watch, committed_envelopes
from trio_es.postgres_store import PostgresStore
from trio_es.testing import Added, Counter, conformance_transcoder

from . import _pg, _takeover

pytestmark = pytest.mark.postgres

#: Long enough that only a notification (never the poll fallback) can explain a wake-up.
_NO_POLL = 60.0
#: What the timing checks allow for a wake-up that should be immediate.
_PROMPT = 2.0


def _open(dsn: str, **options: Any) -> Any:
    return PostgresStore.open(dsn, transcoder=conformance_transcoder(), **options)


async def _commit(store: Any, aggregate_id: str, sequence: int, events: list[Any]) -> Any:
    """Commit ``events`` in a transaction of their own; return the committed envelopes."""
    async with store.transaction() as tx:
        staged, _ = await store.commit_events(
            tx, Aggregate(aggregate_id, Counter(), sequence), events, ()
        )
    return committed_envelopes(tx, staged)


def _place(envelope: Any) -> tuple[Any, Any, Any]:
    return (envelope.event_id, envelope.global_position, envelope.recorded_at)


async def _stored_places(store: Any) -> dict[Any, tuple[Any, Any, Any]]:
    return {s.envelope.event_id: _place(s.envelope) for s in await store.read_all(0, 1000)}


def _sessions(raw: psycopg.Connection[tuple[Any, ...]], application_name: str) -> list[int]:
    """The pids of the test database's sessions with that application_name."""
    return [
        int(row[0])
        for row in raw.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = %s ORDER BY pid",
            (application_name,),
        ).fetchall()
    ]


def _terminate(raw: psycopg.Connection[tuple[Any, ...]], pid: int) -> None:
    """End session ``pid`` and wait (up to 5 s) until it has exited."""
    row = raw.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()
    assert row == (True,)


async def _wait_until_blocked(raw: psycopg.Connection[tuple[Any, ...]]) -> None:
    """Wait until a store connection waits on a lock."""
    with trio.fail_after(10):
        while True:
            if raw.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'trio_es' AND wait_event_type = 'Lock'"
            ).fetchall():
                return
            await trio.sleep(0.01)


async def _poll(done: Any, seconds: float = 10.0) -> None:
    """Wait until ``done()`` is true, checking every 20 ms; fail after ``seconds``."""
    with trio.fail_after(seconds):
        while True:
            if done():
                return
            await trio.sleep(0.02)


async def test_store_provides_the_projection_source_protocols(postgres_dsn: str) -> None:
    """PostgresStore is a ProjectionSource; its watches and leases are Watch and Lease."""
    async with _open(postgres_dsn) as store:
        source: ProjectionSource[Any] = store
        async with source.watch() as watch, source.projection_lease("p") as lease:
            await _commit(store, "acc", 0, [Added(1)])
            as_watch: Watch = watch
            as_lease: Lease = lease
            with trio.fail_after(_PROMPT):
                await as_watch.wait(0)
            await as_lease.advance(await as_lease.checkpoint(), 1)
            assert await source.head_position() == 1


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("poll_interval", 0, ValueError),
        ("poll_interval", -1.0, ValueError),
        ("poll_interval", "1", TypeError),
        ("takeover_interval", 0.0, ValueError),
        ("takeover_interval", None, TypeError),
    ],
)
async def test_bad_intervals_are_refused(
    postgres_dsn: str, option: str, value: object, error: type[Exception]
) -> None:
    """poll_interval and takeover_interval must be positive numbers of seconds."""
    with pytest.raises(error, match=option):
        async with _open(postgres_dsn, **{option: value}):
            pass  # pragma: no cover


async def test_closed_store_refuses_watches_and_leases(postgres_dsn: str) -> None:
    """A closed store opens no watch and no lease, with a clear error."""
    async with _open(postgres_dsn) as store:
        pass
    with pytest.raises(EventStoreError, match="closed"):
        store.watch()
    with pytest.raises(EventStoreError, match="closed"):
        store.projection_lease("p")
    with pytest.raises(ValueError, match="projection name"):
        async with _open(postgres_dsn) as store:
            store.projection_lease("a\x00b")


# -- positions after commit --


async def test_batched_transactions_each_get_their_positions(
    postgres_dsn: str, raw: Any, blocker: Any
) -> None:
    """Transactions group-committed in one database transaction each get their own places."""
    async with _open(postgres_dsn, pool_size=1) as store:
        results: dict[str, list[Any]] = {}

        async def commit(aggregate_id: str) -> None:
            results[aggregate_id] = list(
                await _commit(store, aggregate_id, 0, [Added(1), Added(2)])
            )

        # The first commit waits for the table while the others queue behind it, so
        # that they are committed as one batch.
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        batches = store._group_commit.batches
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit, "first")
            await _wait_until_blocked(raw)
            for number in range(6):
                nursery.start_soon(commit, f"acc-{number}")
            await trio.testing.wait_all_tasks_blocked()
            blocker.execute("ROLLBACK")
        assert store._group_commit.batches - batches == 2
        stored = await _stored_places(store)
        committed = [e for envelopes in results.values() for e in envelopes]
        assert len(committed) == len(stored) == 14
        assert all(_place(e) == stored[e.event_id] for e in committed)
        assert len({e.recorded_at for e in results["acc-0"] + results["acc-5"]}) == 1


async def test_commit_lost_after_it_landed_reads_its_positions_back(postgres_dsn: str) -> None:
    """A COMMIT whose reply was lost is resolved as landed, with positions read back by id."""
    async with trio.open_nursery() as nursery:
        proxy = _pg.FaultInjectingProxy(postgres_dsn)
        dsn = await nursery.start(proxy.serve)
        async with _open(dsn, pool_size=1) as store:
            await _commit(store, "acc", 0, [Added(1)])
            proxy.drop_at_next_commit(landed=True)
            committed = await _commit(store, "acc", 1, [Added(2), Added(3)])
            assert proxy.drops == 1
            stored = await _stored_places(store)
            assert [_place(e) for e in committed] == [stored[e.event_id] for e in committed]
            assert all(isinstance(e.global_position, int) for e in committed)
        nursery.cancel_scope.cancel()


async def test_refused_batch_split_gives_each_plan_its_positions(
    postgres_dsn: str, raw: Any, blocker: Any
) -> None:
    """A batch split after PostgreSQL refused one plan's row: the others get their places."""
    too_long = secrets.token_hex(5000)
    async with _open(postgres_dsn, pool_size=1) as store:
        results: dict[str, outcome.Outcome[Any]] = {}

        async def commit(aggregate_id: str) -> None:
            results[aggregate_id] = await outcome.acapture(
                _commit, store, aggregate_id, 0, [Added(1)]
            )

        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit, "first")
            await _wait_until_blocked(raw)
            for aggregate_id in ("a", too_long, "b"):
                nursery.start_soon(commit, aggregate_id)
            await trio.testing.wait_all_tasks_blocked()
            blocker.execute("ROLLBACK")
        with pytest.raises(EventStoreError, match="too long"):
            results.pop(too_long).unwrap()
        stored = await _stored_places(store)
        committed = [e for result in results.values() for e in result.unwrap()]
        assert len(committed) == len(stored) == 3
        assert all(_place(e) == stored[e.event_id] for e in committed)


# -- NOTIFY and watches --


async def test_every_commit_is_announced_with_its_last_position(
    postgres_dsn: str, raw: Any
) -> None:
    """A commit NOTIFYs the table's channel with its last position; a rolled-back one does not.

    (A refused commit may use up a position: PostgreSQL draws identity values before the
    check in the insert fails, so later positions may skip it; never reuse it.)
    """
    raw.execute(f"LISTEN {notify_channel('events')}")
    async with _open(postgres_dsn) as store:
        committed = await _commit(store, "acc", 0, [Added(1), Added(2)])
        with pytest.raises(ConcurrencyConflict):
            await _commit(store, "acc", 0, [Added(3)])
        async with store.transaction() as tx:  # a snapshot-free, event-free commit
            await store.commit_events(tx, Aggregate("acc", Counter(), 2), [], ())
        other = await _commit(store, "other", 0, [Added(4)])

    def received() -> list[str]:
        return [n.payload for n in raw.notifies(timeout=0.5, stop_after=3)]

    payloads = await trio.to_thread.run_sync(received)
    head, last = committed[-1].global_position, other[-1].global_position
    assert last is not None
    assert head is not None
    assert last > head
    assert payloads == [str(head), str(last)]


async def test_watch_wakes_at_once_on_another_processes_commit(postgres_dsn: str) -> None:
    """A commit through another store object (a process of its own) wakes a watcher by NOTIFY."""
    async with (
        _open(postgres_dsn, poll_interval=_NO_POLL) as store,
        _open(postgres_dsn) as other,
        store.watch() as watch,
    ):
        await _commit(other, "acc", 0, [Added(1)])
        with trio.fail_after(_PROMPT):
            await watch.wait(0)  # announced before this wait began
        for sequence in range(1, 4):
            head = await store.head_position()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_commit, other, "acc", sequence, [Added(1)])
                with trio.fail_after(_PROMPT):
                    await watch.wait(head)
            assert await store.head_position() > head


async def test_announcements_at_or_below_after_do_not_wake(postgres_dsn: str) -> None:
    """A notification of a position the subscriber has read already does not end its wait."""
    async with (
        _open(postgres_dsn, poll_interval=0.5) as store,
        _open(postgres_dsn) as other,
        store.watch() as watch,
    ):
        await _commit(other, "acc", 0, [Added(1), Added(2)])
        head = await store.head_position()
        started = trio.current_time()
        await watch.wait(head)  # only the poll interval ends it
        assert trio.current_time() - started >= 0.45


async def test_other_aggregate_types_wake_at_most_once(postgres_dsn: str) -> None:
    """Another type's commit on the shared table wakes a subscriber once, never in a loop."""
    async with (
        _open(postgres_dsn, poll_interval=0.5) as store,
        _open(postgres_dsn, aggregate_type="others") as other,
        store.watch() as watch,
    ):
        await _commit(store, "acc", 0, [Added(1)])
        head = await store.head_position()
        await _commit(other, "x", 0, [Added(1), Added(2)])
        with trio.fail_after(_PROMPT):
            while True:  # wait for the announcement to arrive
                started = trio.current_time()
                await watch.wait(head)
                if trio.current_time() - started < 0.4:
                    break
        started = trio.current_time()
        await watch.wait(head)  # nothing new for this type: a poll interval
        assert trio.current_time() - started >= 0.45


async def test_lost_listener_reconnects_and_the_subscriber_catches_up(
    postgres_dsn: str, raw: Any
) -> None:
    """Listener backend terminated: the next wait returns at once, then NOTIFY works again."""
    async with (
        _open(postgres_dsn, poll_interval=_NO_POLL) as store,
        _open(postgres_dsn) as other,
        store.watch() as watch,
    ):
        [listener] = _sessions(raw, LISTEN_APPLICATION_NAME)
        assert watch.backend is not None
        assert watch.backend[0] == listener
        seen: list[int] = []

        async def subscriber(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            after = 0
            task_status.started()
            while True:
                await watch.wait(after)
                for stored in await store.read_all(after, 100):
                    seen.append(stored.envelope.payload.amount)
                    after = stored.global_position

        async with trio.open_nursery() as nursery:
            await nursery.start(subscriber)
            await trio.testing.wait_all_tasks_blocked()
            _terminate(raw, listener)
            # Committed while nobody listens: only the catch-up after reconnecting finds it.
            await _commit(other, "acc", 0, [Added(1)])
            with trio.fail_after(_PROMPT * 2):
                await _poll(lambda: seen == [1])
            [again] = _sessions(raw, LISTEN_APPLICATION_NAME)
            assert again != listener
            await _commit(other, "acc", 1, [Added(2)])
            with trio.fail_after(_PROMPT):
                await _poll(lambda: seen == [1, 2])
            nursery.cancel_scope.cancel()


async def test_watch_closes_its_connection_and_passes_errors_through(
    postgres_dsn: str, raw: Any
) -> None:
    """Leaving a watch closes its LISTEN session; an error in its block comes out as itself."""
    listening: list[int] = []

    async def subscriber_breaks(store: Any) -> None:
        async with store.watch():
            listening.extend(_sessions(raw, LISTEN_APPLICATION_NAME))
            raise KeyError("subscriber broke")

    async with _open(postgres_dsn) as store:
        with pytest.raises(KeyError, match="subscriber broke"):
            await subscriber_breaks(store)
        assert len(listening) == 1
        await _poll(lambda: _sessions(raw, LISTEN_APPLICATION_NAME) == [])
        with trio.move_on_after(0.2):
            async with store.watch() as watch:
                await watch.wait(10**9)
        await _poll(lambda: _sessions(raw, LISTEN_APPLICATION_NAME) == [])


async def test_listener_and_lease_sessions_outlive_idle_session_timeout(
    postgres_dsn: str, raw: Any
) -> None:
    """A server that ends idle sessions leaves the (idle by design) LISTEN and lease sessions."""
    if raw.info.server_version < 140000:
        pytest.skip("idle_session_timeout needs PostgreSQL 14")
    [(database,)] = raw.execute("SELECT current_database()").fetchall()
    # New sessions only: this test's own connection is not ended.
    raw.execute(f'ALTER DATABASE "{database}" SET idle_session_timeout = 200')
    async with (
        _open(postgres_dsn) as store,
        store.watch(),
        store.projection_lease("p") as lease,
    ):
        sessions = (_sessions(raw, LISTEN_APPLICATION_NAME), _sessions(raw, LEASE_APPLICATION_NAME))
        await trio.sleep(0.6)
        assert (
            _sessions(raw, LISTEN_APPLICATION_NAME),
            _sessions(raw, LEASE_APPLICATION_NAME),
        ) == sessions
        await lease.advance(await lease.checkpoint(), 1)


async def test_lease_session_gives_up_on_a_silent_client_within_seconds(postgres_dsn: str) -> None:
    """The lease's session has short TCP keepalives, so a vanished machine's lease ends soon."""
    settings: dict[str, str] = {}

    def show(connection: Any, batch: list[Any]) -> None:
        for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count"):
            settings[name] = connection.execute(f"SHOW {name}").fetchone()[0]
        settings["tcp_user_timeout"] = connection.execute("SHOW tcp_user_timeout").fetchone()[0]

    async with _open(postgres_dsn) as store, store.projection_lease("p") as lease:
        await lease.advance_with(await lease.checkpoint(), 1, show, [])
    # Over TCP (the test DSN's host is an address) these bound the server's wait to ~7 s.
    assert settings == {
        "tcp_keepalives_idle": "4",
        "tcp_keepalives_interval": "1",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": "7000",
    }


# -- leases --


async def test_lease_is_an_advisory_lock_on_a_session_of_its_own(
    postgres_dsn: str, raw: Any
) -> None:
    """The holder's session holds the lease's advisory lock; exiting the block ends it."""
    key = lease_key("events", "default", "balances")
    async with _open(postgres_dsn) as store:
        async with store.projection_lease("balances"):
            [holder] = _sessions(raw, LEASE_APPLICATION_NAME)
            # A bigint advisory key shows as classid (high half) and objid (low half).
            rows = raw.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND objsubid = 1 AND (classid::bigint << 32 | objid::bigint) = %s",
                (key,),
            ).fetchall()
            assert [row[0] for row in rows] == [holder]
        await _poll(lambda: _sessions(raw, LEASE_APPLICATION_NAME) == [])


async def test_takeover_after_the_holders_connection_is_terminated(
    postgres_dsn: str, raw: Any
) -> None:
    """Holder's session terminated: a standby takes over, the old lease raises from then on."""
    async with (
        _open(postgres_dsn, takeover_interval=0.05) as first,
        _open(postgres_dsn, takeover_interval=0.05) as second,
    ):
        took_over = trio.Event()

        async def standby(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            async with second.projection_lease("balances") as lease:
                assert await lease.checkpoint() == 4
                took_over.set()
                await trio.sleep_forever()

        async with first.projection_lease("balances") as old, trio.open_nursery() as nursery:
            await old.advance(await old.checkpoint(), 4)
            [holder] = _sessions(raw, LEASE_APPLICATION_NAME)
            await nursery.start(standby)
            await trio.sleep(0.3)
            assert not took_over.is_set()
            _terminate(raw, holder)
            with trio.fail_after(_PROMPT):
                await took_over.wait()
            calls = [
                old.checkpoint(),
                old.advance(4, 5),
                old.advance_with(4, 5, lambda connection, batch: None, []),
                old.reset(),
                old.checkpoint(),
            ]
            for call in calls:
                with pytest.raises(EventStoreError, match=r"lost the connection .* lease"):
                    await call
            nursery.cancel_scope.cancel()
        async with second.projection_lease("balances") as lease:
            assert await lease.checkpoint() == 4


_HOLDER = """
import sys, trio
from trio_es.postgres_store import PostgresStore
from trio_es.testing import conformance_transcoder

async def main():
    async with PostgresStore.open(sys.argv[1], transcoder=conformance_transcoder()) as store:
        async with store.projection_lease("balances") as lease:
            await lease.advance(await lease.checkpoint(), 7)
            print("held", flush=True)
            await trio.sleep_forever()

trio.run(main)
"""


async def test_takeover_after_the_holding_process_is_killed(postgres_dsn: str) -> None:
    """A process holding the lease is SIGKILLed: a standby takes over within 10 seconds."""
    holder = functools.partial(
        trio.run_process,
        [sys.executable, "-c", _HOLDER, postgres_dsn],
        stdout=subprocess.PIPE,
        check=False,
    )
    async with _open(postgres_dsn, takeover_interval=0.2) as store, trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(holder)
        await _takeover.assert_taken_over_after_the_holder_is_killed(
            store, process, start_within=30
        )


# -- checkpoints on the lease's connection --


@asynccontextmanager
async def _lease(dsn: str, name: str = "p") -> AsyncIterator[Any]:
    async with _open(dsn) as store, store.projection_lease(name) as lease:
        yield lease


async def test_advance_with_runs_on_the_lease_connection_in_one_transaction(
    postgres_dsn: str, raw: Any
) -> None:
    """fn runs in a transaction on the lease's session; the checkpoint moves in it."""
    raw.execute("CREATE TABLE model (position BIGINT)")
    seen: list[tuple[str, Any]] = []

    def write(connection: Any, batch: list[Any]) -> None:
        row = connection.execute("SELECT current_setting('application_name')").fetchone()
        seen.append((row[0], connection.info.transaction_status))
        connection.execute("INSERT INTO model VALUES (%s)", (len(batch),))

    async with _lease(postgres_dsn) as lease:
        await lease.advance_with(await lease.checkpoint(), 3, write, [1, 2, 3])
        assert await lease.checkpoint() == 3
    assert seen == [(LEASE_APPLICATION_NAME, psycopg.pq.TransactionStatus.INTRANS)]
    assert raw.execute("SELECT position FROM model").fetchall() == [(3,)]
    assert raw.execute("SELECT position FROM trio_es_checkpoints").fetchall() == [(3,)]


async def test_advance_with_passes_fn_errors_through_and_keeps_the_lease(
    postgres_dsn: str, raw: Any
) -> None:
    """fn's own psycopg error propagates as itself (not translated); nothing is kept."""
    raw.execute("CREATE TABLE model (position BIGINT)")

    def bad_sql(connection: Any, batch: list[Any]) -> None:
        connection.execute("INSERT INTO model VALUES (1)")
        connection.execute("SELECT * FROM no_such_table")

    def commits(connection: Any, batch: list[Any]) -> None:
        connection.commit()

    async with _lease(postgres_dsn) as lease:
        with pytest.raises(psycopg.errors.UndefinedTable):
            await lease.advance_with(await lease.checkpoint(), 3, bad_sql, [])
        with pytest.raises(psycopg.ProgrammingError, match="commit"):
            await lease.advance_with(0, 3, commits, [])
        assert await lease.checkpoint() == 0
        with pytest.raises(CheckpointMoved):
            await lease.advance_with(2, 3, lambda connection, batch: None, [])
        await lease.advance(0, 1)
    assert raw.execute("SELECT count(*) FROM model").fetchone() == (0,)


async def test_cancelling_advance_with_cancels_the_statement(postgres_dsn: str, raw: Any) -> None:
    """A cancelled advance_with stops fn's running statement; the lease stays usable."""

    def slow(connection: Any, batch: list[Any]) -> None:
        connection.execute("SELECT pg_sleep(60)")

    async with _lease(postgres_dsn) as lease:
        await lease.checkpoint()
        started = trio.current_time()
        with trio.move_on_after(0.3):
            await lease.advance_with(0, 5, slow, [])
        assert trio.current_time() - started < 5
        rows = raw.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE 'SELECT pg_sleep%%' AND state = 'active'"
        ).fetchone()
        assert rows == (0,)
        assert await lease.checkpoint() == 0
        await lease.advance(0, 5)
        assert await lease.checkpoint() == 5


async def test_checkpoint_rows_are_per_table_type_and_name(postgres_dsn: str, raw: Any) -> None:
    """Checkpoints of other names, aggregate types and tables are separate rows and leases."""
    async with (
        _open(postgres_dsn) as a,
        _open(postgres_dsn, aggregate_type="other") as b,
        _open(postgres_dsn, events_table="more_events", snapshots_table="more_snaps") as c,
    ):
        with trio.fail_after(_PROMPT):
            async with (
                a.projection_lease("p") as first,
                b.projection_lease("p") as second,
                c.projection_lease("p") as third,
            ):
                await first.advance(await first.checkpoint(), 1)
                await second.advance(await second.checkpoint(), 2)
                await third.advance(await third.checkpoint(), 3)
    assert raw.execute(
        "SELECT events_table, aggregate_type, name, position FROM trio_es_checkpoints "
        "ORDER BY position"
    ).fetchall() == [
        ("events", "default", "p", 1),
        ("events", "other", "p", 2),
        ("more_events", "default", "p", 3),
    ]
