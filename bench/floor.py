"""The floor: what the database itself does with the same rows, without any library.

Rows are what trio_es keeps for a deposit (its documented ``events`` layout: aggregate
type and id, sequence, event type and version, JSON payload, JSON metadata, UTC
timestamp), in a table with the same keys (an integer primary key in commit order and
a unique ``(aggregate_type, aggregate_id, sequence)``), written by plain ``sqlite3`` or
``psycopg`` calls:

- **one row per transaction**: what a store without group commit must do per command;
- **batched**: ``floor_batch`` rows per transaction, the most a group commit could
  gather from the same number of concurrent callers as W3;
- **one row per transaction from Trio**: the same single-row transactions issued by a
  Trio program that keeps the rule trio_es keeps (a blocking database call never runs on
  the Trio thread). SQLite: each is handed to one long-lived worker thread through a
  queue and awaited, the cheapest hop there is (no library code, see :class:`_Hop`).
  PostgreSQL: libpq's non-blocking calls on the Trio thread, no thread at all (what
  trio_es's PostgreSQL store does). This bounds what any Trio store can do for one caller
  awaiting each command (W1, W2).

And for every store, the **Trio command round trip**: a bare-Trio caller sends a command to
a task that owns it and waits for the reply, with the machinery trio_es's guarantees need
and nothing else: a deadline for the call, a mailbox (memory channel), the owner's idle
deadline while it waits (both deadlines as entries of a dict that one timer task would
watch, as trio_es keeps them, rather than a cancel scope each), a shielded section for the
commit, and a one-shot reply. No store and no domain: it bounds what a task-per-aggregate
runtime can do on the memory store (W1, W2).

SQLite uses the durability of trio_es's store (WAL, ``synchronous=FULL``); PostgreSQL
uses the server's settings. The rows are spread over 1,000 aggregates like W3's.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import json
import queue
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import outcome
import trio

__all__ = [
    "LOAD_TRIALS",
    "postgres_floor",
    "postgres_floor_from_trio",
    "round_trip_floor",
    "rows",
    "sqlite_floor",
    "sqlite_floor_from_trio",
    "sqlite_load_floor_from_trio",
]

_AGGREGATES: Final = 1_000

Row = tuple[str, str, int, str, int, str, str, str]

_SQLITE_DDL: Final = (
    "CREATE TABLE floor_events ("
    " global_position INTEGER PRIMARY KEY,"
    " aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, sequence INTEGER NOT NULL,"
    " event_type TEXT NOT NULL, event_version INTEGER NOT NULL,"
    " payload TEXT NOT NULL, metadata TEXT NOT NULL, recorded_at TEXT NOT NULL,"
    " UNIQUE (aggregate_type, aggregate_id, sequence))"
)
_POSTGRES_DDL: Final = (
    "CREATE TABLE floor_events ("
    " global_position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, sequence BIGINT NOT NULL,"
    " event_type TEXT NOT NULL, event_version BIGINT NOT NULL,"
    " payload JSONB NOT NULL, metadata JSONB NOT NULL, recorded_at TIMESTAMPTZ NOT NULL,"
    " UNIQUE (aggregate_type, aggregate_id, sequence))"
)
_COLUMNS: Final = (
    "aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,"
    " recorded_at"
)


def rows(count: int) -> list[Row]:
    """``count`` deposit rows over 1,000 aggregates, each aggregate's sequences from 1."""
    sequences: dict[str, int] = {}
    balances: dict[str, int] = {}
    recorded_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    result: list[Row] = []
    for i in range(count):
        aggregate_id = f"floor-{i % _AGGREGATES:05d}"
        sequence = sequences[aggregate_id] = sequences.get(aggregate_id, 0) + 1
        balance = balances[aggregate_id] = balances.get(aggregate_id, 0) + 7
        payload = json.dumps({"amount": 7, "balance": balance}, separators=(",", ":"))
        result.append(
            (
                "default",
                aggregate_id,
                sequence,
                "CustomerDepositedCash",
                1,
                payload,
                "[]",
                recorded_at,
            )
        )
    return result


def _chunks(values: Sequence[Row], size: int) -> Iterator[Sequence[Row]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def sqlite_floor(path: str, count: int, batch: int) -> float:
    """Rows per second inserting ``count`` rows, ``batch`` per transaction, into ``path``."""
    data = rows(count)
    insert = f"INSERT INTO floor_events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(_SQLITE_DDL)
        started = time.perf_counter()
        for chunk in _chunks(data, batch):
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(insert, chunk)
            connection.execute("COMMIT")
        elapsed = time.perf_counter() - started
        stored = connection.execute("SELECT count(*) FROM floor_events").fetchone()[0]
    if stored != count:
        raise AssertionError(f"the SQLite floor stored {stored} rows, not {count}")
    return count / elapsed


def postgres_floor(dsn: str, count: int, batch: int) -> float:
    """Rows per second inserting ``count`` rows, ``batch`` per transaction, at ``dsn``."""
    import psycopg

    data = rows(count)
    insert = (
        f"INSERT INTO floor_events ({_COLUMNS})"
        " VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s)"
    )
    connection: Any
    with psycopg.connect(dsn, connect_timeout=5) as connection:
        connection.execute(_POSTGRES_DDL)
        connection.commit()
        started = time.perf_counter()
        with connection.cursor() as cursor:
            for chunk in _chunks(data, batch):
                if len(chunk) == 1:
                    cursor.execute(insert, chunk[0], prepare=True)
                else:
                    cursor.executemany(insert, chunk)
                connection.commit()
        elapsed = time.perf_counter() - started
        row = connection.execute("SELECT count(*) FROM floor_events").fetchone()
        connection.execute("DROP TABLE floor_events")
        connection.commit()
    stored = row[0] if row else 0
    if stored != count:
        raise AssertionError(f"the PostgreSQL floor stored {stored} rows, not {count}")
    return count / elapsed


class _Hop:
    """One long-lived worker thread that runs blocking calls handed over from Trio."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    async def run(self, fn: Callable[[], Any]) -> Any:
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()

        def job() -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, outcome.capture(fn))

        self._jobs.put(job)
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


def _from_trio(count: int, commit_one: Callable[[Row], None]) -> float:
    """Rows per second committing ``count`` rows one per call, each awaited through a hop."""
    data = rows(count)

    async def main() -> float:
        hop = _Hop()
        try:
            started = time.perf_counter()
            for row in data:
                await hop.run(functools.partial(commit_one, row))
            return count / (time.perf_counter() - started)
        finally:
            hop.close()

    return trio.run(main)


def sqlite_floor_from_trio(path: str, count: int) -> float:
    """:func:`sqlite_floor` with one row per transaction, each awaited from Trio via a hop."""
    insert = f"INSERT INTO floor_events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    with contextlib.closing(
        sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    ) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(_SQLITE_DDL)

        def commit_one(row: Row) -> None:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(insert, row)
            connection.execute("COMMIT")

        rate = _from_trio(count, commit_one)
        stored = connection.execute("SELECT count(*) FROM floor_events").fetchone()[0]
    if stored != count:
        raise AssertionError(f"the SQLite floor stored {stored} rows, not {count}")
    return rate


#: Fresh starts per round of the load floor; their median is the round's value.
LOAD_TRIALS: Final = 11

_SNAPSHOT_DDL: Final = (
    "CREATE TABLE floor_snapshots ("
    " aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, sequence INTEGER NOT NULL,"
    " payload TEXT NOT NULL, recorded_at TEXT NOT NULL,"
    " PRIMARY KEY (aggregate_type, aggregate_id))"
)
_SELECT_SNAPSHOT: Final = (
    "SELECT sequence, payload FROM floor_snapshots WHERE aggregate_type = ? AND aggregate_id = ?"
)
_SELECT_TAIL: Final = (
    "SELECT sequence, event_type, event_version, payload, metadata, recorded_at"
    " FROM floor_events WHERE aggregate_type = ? AND aggregate_id = ? AND sequence > ?"
    " ORDER BY sequence"
)


def sqlite_load_floor_from_trio(path: str, events: int, snapshot_every: int, trials: int) -> float:
    """The median time (s) of a first load with snapshots handed from Trio to a worker thread.

    R1's first load with snapshots without any library: one stream of ``events`` rows
    with a snapshot row (its state as JSON) every ``snapshot_every`` events, written
    untimed. Each trial is a fresh process-like start: a new connection and a new
    long-lived worker thread (:class:`_Hop`) that compiles the two reads once, as a store
    does when it opens, and then waits; after ``gc.collect()``, one hop from Trio reads
    the latest snapshot and the events after it and decodes them (``json.loads``). This
    is the least any Trio program keeping the rule (no blocking database call on the
    Trio thread) spends on R1's load; the peer reads on the calling thread, with no hop.
    """
    key = ("default", "floor-load")
    recorded_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(_SQLITE_DDL)
        connection.execute(_SNAPSHOT_DDL)
        connection.execute("BEGIN IMMEDIATE")
        for sequence in range(1, events + 1):
            payload = json.dumps({"amount": 1, "balance": sequence - 1}, separators=(",", ":"))
            connection.execute(
                f"INSERT INTO floor_events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, sequence, "CustomerDepositedCash", 1, payload, "[]", recorded_at),
            )
            if sequence % snapshot_every == 0:
                state = {"account_id": key[1], "balance": sequence - 1, "opened": True}
                connection.execute(
                    "INSERT OR REPLACE INTO floor_snapshots VALUES (?, ?, ?, ?, ?)",
                    (*key, sequence, json.dumps(state), recorded_at),
                )
        connection.execute("COMMIT")

    def load(reader: sqlite3.Connection) -> tuple[int, object]:
        found = reader.execute(_SELECT_SNAPSHOT, key).fetchone()
        sequence, state = (0, None) if found is None else (found[0], json.loads(found[1]))
        tail = reader.execute(_SELECT_TAIL, (*key, sequence)).fetchall()
        for row in tail:
            state = json.loads(row[3])
        return sequence + len(tail), state

    async def trial() -> float:
        with contextlib.closing(
            sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        ) as reader:
            hop = _Hop()
            try:

                def compile_reads() -> None:
                    reader.execute(_SELECT_SNAPSHOT, ("", "")).fetchall()
                    reader.execute(_SELECT_TAIL, ("", "", 0)).fetchall()

                await hop.run(compile_reads)
                gc.collect()
                started = time.perf_counter()
                sequence, _ = await hop.run(functools.partial(load, reader))
                elapsed = time.perf_counter() - started
            finally:
                hop.close()
        if sequence != events:
            raise AssertionError(f"the SQLite load floor loaded {sequence} events, not {events}")
        return elapsed

    return statistics.median(trio.run(trial) for _ in range(trials))


def postgres_floor_from_trio(dsn: str, count: int) -> float:
    """:func:`postgres_floor` with one row per transaction, each awaited from Trio.

    The way a Trio program reaches PostgreSQL without any thread: libpq's non-blocking
    calls (``psycopg.pq``, a prepared INSERT in autocommit, one round trip) on the Trio
    thread, waiting for the socket with ``trio.lowlevel.wait_readable``. Parameters are
    sent as text.
    """
    import psycopg
    from psycopg import pq

    insert = (
        f"INSERT INTO floor_events ({_COLUMNS})"
        " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8)"
    ).encode()
    connection: Any
    with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as connection:
        connection.execute(_POSTGRES_DDL)
        pgconn = connection.pgconn
        pgconn.nonblocking = 1

        async def round_trip() -> list[Any]:
            while pgconn.flush():
                await trio.lowlevel.wait_writable(pgconn.socket)
            results: list[Any] = []
            while True:
                pgconn.consume_input()
                while not pgconn.is_busy():
                    result = pgconn.get_result()
                    if result is None:
                        return results
                    results.append(result)
                await trio.lowlevel.wait_readable(pgconn.socket)

        async def main() -> float:
            pgconn.send_prepare(b"floor_insert", insert)
            await round_trip()
            started = time.perf_counter()
            for row in rows(count):
                pgconn.send_query_prepared(b"floor_insert", [str(v).encode() for v in row])
                [result] = await round_trip()
                if result.status != pq.ExecStatus.COMMAND_OK:
                    raise AssertionError(f"the floor insert failed: {result.error_message!r}")
            return count / (time.perf_counter() - started)

        rate = trio.run(main)
        row = connection.execute("SELECT count(*) FROM floor_events").fetchone()
        connection.execute("DROP TABLE floor_events")
    stored = row[0] if row else 0
    if stored != count:
        raise AssertionError(f"the PostgreSQL floor stored {stored} rows, not {count}")
    return rate


def round_trip_floor(count: int) -> float:
    """Bare-Trio command round trips per second (see the module docstring)."""

    async def main() -> float:
        send, receive = trio.open_memory_channel[tuple[int, trio.lowlevel.Task]](10_000)
        # The call's and the owner's idle deadlines, kept as entries of a dict that one
        # timer task would watch (the cheapest way to time many waits, and trio_es's): a
        # cancel scope per wait costs more than the rest of the round trip. No timer task
        # runs here, since none would fire.
        deadlines: dict[object, float] = {}

        async def owner() -> None:
            idle = object()
            # A commit runs shielded: the owner's own scope is switched to shielded and
            # back, as trio_es does (entering a shielded scope per commit costs more). A
            # memory commit does not await, so neither does this one.
            with trio.CancelScope() as guard:
                while True:
                    deadlines[idle] = trio.current_time() + 3600
                    command, caller = await receive.receive()
                    del deadlines[idle]
                    guard.shield = True
                    result = command + 1
                    guard.shield = False
                    trio.lowlevel.reschedule(caller, outcome.Value(result))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner)
            started = time.perf_counter()
            for number in range(count):
                call = object()
                deadlines[call] = trio.current_time() + 30
                send.send_nowait((number, trio.lowlevel.current_task()))
                answer = await trio.lowlevel.wait_task_rescheduled(
                    lambda _: trio.lowlevel.Abort.SUCCEEDED
                )
                del deadlines[call]
                if answer != number + 1:
                    raise AssertionError(f"the round trip floor got {answer}, not {number + 1}")
            rate = count / (time.perf_counter() - started)
            nursery.cancel_scope.cancel()
        return rate

    return trio.run(main)
