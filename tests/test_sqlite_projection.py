"""The SQLite store as a projection source: positions of commits, file-lock leases, checkpoints.

The shared suite (``ProjectionSourceConformance``) runs in test_sqlite_store.py; these are
what only SQLite does. Real files under ``tmp_path``; nothing is mocked.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_es import Aggregate, CheckpointMoved, EventStoreError
from trio_es._sql import EventRow
from trio_es._sqlite_projection import lock_path
from trio_es._sqlite_store import _Commit
from trio_es._store import committed_envelopes
from trio_es.sqlite_store import SqliteStore
from trio_es.testing import Added, Counter, conformance_transcoder

from . import _takeover

# A lease holder in another process: takes the lease, moves the checkpoint to 7, says so,
# and holds on until it is killed.
_HOLDER = """
import sys, trio
from trio_es.sqlite_store import SqliteStore
from trio_es.testing import conformance_transcoder

async def main() -> None:
    async with SqliteStore.open(sys.argv[1], transcoder=conformance_transcoder()) as store:
        async with store.projection_lease("balances") as lease:
            await lease.advance(await lease.checkpoint(), 7)
            print("held", flush=True)
            await trio.sleep_forever()

trio.run(main)
"""

_ENDLESS = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"


def _open(path: Path, **options: Any) -> Any:
    options.setdefault("takeover_interval", 0.05)
    return SqliteStore.open(path, transcoder=conformance_transcoder(), **options)


async def _commit(store: Any, aggregate_id: str, sequence: int, events: list[Any]) -> Any:
    async with store.transaction() as tx:
        envelopes, _ = await store.commit_events(
            tx, Aggregate(aggregate_id, Counter(), sequence), events, ()
        )
    return committed_envelopes(tx, envelopes)


def _place(envelope: Any) -> tuple[Any, Any, Any]:
    return (envelope.event_id, envelope.global_position, envelope.recorded_at)


# -- positions of commits --


async def test_group_commits_of_two_stores_on_one_file_get_their_places(tmp_path: Path) -> None:
    """Two stores (two types) group-committing at once: each event's place is what read_all says."""
    path = tmp_path / "store.db"
    async with _open(path, aggregate_type="a") as first, _open(path, aggregate_type="b") as second:
        committed: list[Any] = []

        async def commit(store: Any, number: int) -> None:
            committed.extend(await _commit(store, f"acc-{number}", 0, [Added(number)] * 3))

        async with trio.open_nursery() as nursery:
            for number in range(30):
                nursery.start_soon(commit, first, number)
                nursery.start_soon(commit, second, number)
        # Batched: the check is about positions of plans that shared a transaction.
        assert first._group_commit.batches < first._group_commit.plans == 30
        stored = [*await first.read_all(0, 1000), *await second.read_all(0, 1000)]
        assert len(stored) == len(committed) == 180
        assert sorted(_place(e) for e in committed) == sorted(_place(s.envelope) for s in stored)
        assert len({s.global_position for s in stored}) == 180


async def test_positions_follow_a_row_another_program_wrote(
    tmp_path: Path, raw_connections: list[sqlite3.Connection]
) -> None:
    """After a foreign row at position 1000, a commit's places continue from it, as stored."""
    path = tmp_path / "store.db"
    async with _open(path, aggregate_type="mine") as store:
        await _commit(store, "acc", 0, [Added(1)])
        raw = sqlite3.connect(path, isolation_level=None)
        raw_connections.append(raw)
        raw.execute(
            "INSERT INTO events (global_position, aggregate_type, aggregate_id, sequence, "
            "event_type, event_version, payload, metadata, recorded_at, event_id) VALUES "
            "(1000, 'theirs', 'x', 1, 't', 1, '{}', '[]', '2024-01-01T00:00:00+00:00', ?)",
            (str(uuid.uuid4()),),
        )
        placed = await _commit(store, "acc", 1, [Added(2), Added(3), Added(4)])
        assert [e.global_position for e in placed] == [1001, 1002, 1003]
        stored = await store.read_all(1, 10)
        assert [_place(e) for e in placed] == [_place(s.envelope) for s in stored]
        assert await store.head_position() == 1003


async def test_batch_with_a_plan_stored_before_gives_every_plan_its_places(
    tmp_path: Path,
) -> None:
    """A batch refused for a stored event id is retried plan by plan; all get their places."""
    async with _open(tmp_path / "store.db") as store:
        [old] = await _commit(store, "acc", 0, [Added(1)])
        assert old.event_id is not None
        # The same event id again, as a resent plan would carry it (on a free sequence, so
        # that only the id collides).
        resent = EventRow("acc", 2, "conformance.Added", 1, '{"amount":1}', "[]", old.event_id)
        fresh = EventRow("new", 1, "conformance.Added", 1, '{"amount":2}', "[]", uuid.uuid4())
        plans = [
            _Commit(store._statements, "default", {"acc": 1}, [resent], [], 100),
            _Commit(store._statements, "default", {"new": 0}, [fresh], [], 100),
        ]
        first, second = await store._commit_batch(plans)
        stored = await store.read_all(0, 10)
        assert first.unwrap() == {old.event_id: (old.global_position, old.recorded_at)}
        assert second.unwrap() == {
            fresh.event_id: (stored[-1].global_position, stored[-1].recorded_at)
        }
        assert [s.envelope.payload for s in stored] == [Added(1), Added(2)]
        assert await store.head_position() == stored[-1].global_position


# -- leases: the file lock --


async def test_lease_excludes_another_process_until_it_is_killed(tmp_path: Path) -> None:
    """A lease held in another process excludes this one; after its SIGKILL this one takes over."""
    path = tmp_path / "store.db"
    async with _open(path) as store, trio.open_nursery() as nursery:
        command = [sys.executable, "-c", _HOLDER, str(path)]
        holder: trio.Process = await nursery.start(
            functools.partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
        )
        try:
            await _takeover.assert_taken_over_after_the_holder_is_killed(
                store, holder, start_within=20
            )
        finally:
            holder.kill()


async def test_lock_files_are_one_per_table_type_and_name(tmp_path: Path) -> None:
    """The lease's lock file sits next to the database and differs per table, type and name."""
    path = tmp_path / "store.db"
    async with _open(path) as store, store.projection_lease("balances"):
        expected = lock_path(str(path), "events", "default", "balances")
        assert expected.startswith(f"{path}-trio_es-")
        assert expected.endswith(".lock")
        assert Path(expected).name in os.listdir(tmp_path)
    keys = [
        ("events", "default", "balances"),
        ("other_events", "default", "balances"),
        ("events", "other", "balances"),
        ("events", "default", "totals"),
        # JSON keeps the parts apart: no two keys join to the same text.
        ("events", "default,balances", ""),
    ]
    assert len({lock_path(str(path), *key) for key in keys}) == len(keys)
    # Kept after the lease ended: removing it could let two holders lock two files.
    assert Path(lock_path(str(path), "events", "default", "balances")).name in os.listdir(tmp_path)


async def test_other_types_and_tables_have_their_own_leases_and_checkpoints(
    tmp_path: Path,
) -> None:
    """A projection name in another aggregate type or events table is another projection."""
    path = tmp_path / "store.db"
    async with (
        _open(path) as plain,
        _open(path, aggregate_type="other") as other_type,
        _open(path, events_table="more_events", snapshots_table="more_snapshots") as other_table,
    ):
        with trio.fail_after(5):
            async with (
                plain.projection_lease("p") as a,
                other_type.projection_lease("p") as b,
                other_table.projection_lease("p") as c,
            ):
                await a.advance(await a.checkpoint(), 3)
                assert (await b.checkpoint(), await c.checkpoint()) == (0, 0)
                await c.advance(0, 5)
                assert (await a.checkpoint(), await b.checkpoint()) == (3, 0)


async def test_a_removed_lock_file_is_opened_again(tmp_path: Path) -> None:
    """A standby whose lock file was removed meanwhile locks the file there now, not the old one."""
    path = tmp_path / "store.db"
    lock = lock_path(str(path), "events", "default", "p")
    took_over = trio.Event()
    async with _open(path) as store, trio.open_nursery() as nursery:

        async def standby() -> None:
            async with store.projection_lease("p"):
                took_over.set()

        async with store.projection_lease("p"):
            nursery.start_soon(standby)
            await trio.testing.wait_all_tasks_blocked()
            os.remove(lock)
        with trio.fail_after(5):
            await took_over.wait()
    assert Path(lock).name in os.listdir(tmp_path)


# -- leases: the connection and its transactions --


async def test_lease_connection_is_its_own_with_the_stores_settings(tmp_path: Path) -> None:
    """fn gets the lease's own connection, in a transaction, with the store's synchronous."""
    async with _open(tmp_path / "store.db", synchronous="NORMAL") as store:
        seen: list[Any] = []

        def inspect(connection: sqlite3.Connection, batch: list[Any]) -> None:
            seen.append(connection is store._writer.raw)
            seen.append(connection.in_transaction)
            seen.append(connection.execute("PRAGMA synchronous").fetchone())
            seen.append(batch)

        async with store.projection_lease("p") as lease:
            await lease.advance_with(await lease.checkpoint(), 0, inspect, ["batch"])
        assert seen == [False, True, (1,), ["batch"]]


async def test_fn_sqlite_errors_propagate_as_themselves(tmp_path: Path) -> None:
    """A sqlite3 error raised by fn reaches the caller untranslated, and nothing is kept."""
    async with _open(tmp_path / "store.db") as store, store.projection_lease("p") as lease:
        errors: list[sqlite3.Error] = []

        def bad_sql(connection: sqlite3.Connection, _: list[Any]) -> None:
            try:
                connection.execute("INSERT INTO no_such_table VALUES (1)")
            except sqlite3.Error as error:
                errors.append(error)
                raise

        with pytest.raises(sqlite3.OperationalError, match="no such table") as info:
            await lease.advance_with(await lease.checkpoint(), 5, bad_sql, [])
        assert info.value is errors[0]
        assert await lease.checkpoint() == 0


async def test_fn_that_commits_is_refused(tmp_path: Path) -> None:
    """fn ending the transaction itself is an EventStoreError, and the checkpoint stays."""
    async with _open(tmp_path / "store.db") as store, store.projection_lease("p") as lease:

        def commits(connection: sqlite3.Connection, _: list[Any]) -> None:
            connection.execute("COMMIT")

        with pytest.raises(EventStoreError, match="committed or rolled back"):
            await lease.advance_with(await lease.checkpoint(), 5, commits, [])
        assert await lease.checkpoint() == 0
        await lease.advance_with(0, 6, lambda connection, batch: None, [])
        assert await lease.checkpoint() == 6


async def test_cancelling_advance_with_interrupts_fn(tmp_path: Path) -> None:
    """Cancelled while fn runs a long statement: it is interrupted, nothing kept, lease usable."""
    async with _open(tmp_path / "store.db") as store, store.projection_lease("p") as lease:

        def endless(connection: sqlite3.Connection, _: list[Any]) -> None:
            connection.execute("CREATE TABLE model (n INTEGER)")
            connection.execute(_ENDLESS).fetchall()

        start = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            await lease.advance_with(await lease.checkpoint(), 5, endless, [])
        assert scope.cancelled_caught
        assert trio.current_time() - start < 2
        seen: list[Any] = []

        def tables(connection: sqlite3.Connection, _: list[Any]) -> None:
            seen.extend(connection.execute("SELECT name FROM sqlite_master").fetchall())

        await lease.advance_with(0, 0, tables, [])
        assert ("model",) not in seen
        assert await lease.checkpoint() == 0


async def test_cancelling_advance_waiting_for_the_write_lock(
    tmp_path: Path, raw_connections: list[sqlite3.Connection]
) -> None:
    """An advance waiting for another connection's write lock is cancelled at once."""
    path = tmp_path / "store.db"
    async with _open(path, busy_timeout_ms=20_000) as store, store.projection_lease("p") as lease:
        await lease.checkpoint()
        blocker = sqlite3.connect(path, isolation_level=None)
        raw_connections.append(blocker)
        blocker.execute("BEGIN IMMEDIATE")
        start = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            await lease.advance(0, 5)
        assert scope.cancelled_caught
        assert trio.current_time() - start < 2
        blocker.execute("ROLLBACK")
        await lease.advance(0, 5)
        assert await lease.checkpoint() == 5


async def test_checkpoint_moved_by_a_rebuild_elsewhere(tmp_path: Path) -> None:
    """A checkpoint reset by another lease holder later makes advance raise CheckpointMoved."""
    path = tmp_path / "store.db"
    async with _open(path) as store:
        async with store.projection_lease("p") as lease:
            await lease.advance(await lease.checkpoint(), 9)
        async with store.projection_lease("p") as lease:
            await lease.reset()
        async with store.projection_lease("p") as lease:
            with pytest.raises(CheckpointMoved) as info:
                await lease.advance(9, 12)
            assert (info.value.expected, info.value.found) == (9, 0)
