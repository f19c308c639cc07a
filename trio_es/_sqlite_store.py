"""The SQLite event store: durable, embedded, safe for several processes on one file.

Layout and semantics are shared with the other SQL stores (see :mod:`trio_es._sql`).

How it talks to SQLite: two ``sqlite3`` connections in WAL mode, a writer and a reader,
each used by one worker thread at a time (each has its own ``CapacityLimiter(1)``). A
hop to a worker thread costs more than a SQLite commit, so a transaction makes at most
one hop to write: ``commit_events`` and ``save_snapshot`` only encode and buffer (a
serialization error is raised right there), and leaving the ``async with`` block runs
``BEGIN IMMEDIATE``, the optimistic-concurrency checks, the inserts, the snapshot upserts
and ``COMMIT`` in a single thread call. Reads are one hop each on the reader connection
and see the latest committed data plus the transaction's own buffered writes; a
transaction that only reads never touches the writer.

Where events land: the commit thread reports each committed event's ``global_position``
and ``recorded_at`` back (also for a transaction that shared a group commit, and, read
back by id, for one found already stored), and the store puts them on the transaction
handle as ``recorded`` and raises its in-process head, which wakes its watches at once
(other processes' commits are found by polling). Projection leases and their
connections are in ``_sqlite_projection.py``; the connection machinery that the writer,
the reader and the leases share is in ``_sqlite_connection.py``.

Cancellation: a thread call is never abandoned (its connection would be left mid-way).
When the calling task is cancelled, the store asks the running statement to stop
(``sqlite3.Connection.interrupt``), stops waiting for a lock held by another process,
rolls back whatever was begun, and only then lets ``trio.Cancelled`` through. A commit
that had already reached ``COMMIT`` stays committed, as with any cancelled I/O: the
caller gets ``Cancelled``, never a failure, for a commit that happened.

A failed ``COMMIT``: SQLite commits locally, so the store can mostly tell. If the
transaction is still open after the error, or the error is one that SQLite raises before
it writes the commit (a full disk, a lock, an interrupt), nothing was committed and the
error is reported as such. Any other error from ``COMMIT`` (an I/O error while syncing the
write-ahead log, for instance) may come after the commit frame reached the file, where a
later recovery finds it: the caller gets ``CommitOutcomeUnknown``.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, TypeVar, final

import attrs
import outcome
import trio

from ._errors import CommitOutcomeUnknown, ConcurrencyConflict, EventStoreError, TransactionFailed
from ._group_commit import GroupCommit
from ._serialization import Transcoder
from ._sql import (
    EVENT_COLUMNS_V1,
    SCHEMA_VERSION,
    Dialect,
    EventRow,
    Queryable,
    SnapshotRow,
    Statements,
    check_aggregate_type,
    check_existing_tables,
    check_schema_version,
    check_text,
    check_version_to_open,
    events_table_ddl,
    find_conflict,
    max_sequence,
    parse_utc,
    utc_text,
)
from ._sql_store import (
    PendingWrites,
    SqlReads,
    SqlStoreShell,
    SqlTransaction,
    TransactionBlock,
    translate_outcomes,
)
from ._sqlite_connection import (
    BUSY_SLICE_MS,
    CLOSE_TIMEOUT_S,
    Connection,
    Interrupt,
    Interrupted,
    begin_immediate,
    error_code,
    rollback,
    translate_error,
)
from ._sqlite_projection import LeaseSettings, SqliteLease, open_lease
from ._trio_util import AsyncValue, async_value
from ._types import utc_now
from ._validated import check_int, check_seconds
from ._watch import HeadWatch, check_projection_name, raise_head

__all__ = ["SqliteStore", "SqliteTransaction"]

logger: Final = logging.getLogger("trio_es.sqlite_store")

EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")
T = TypeVar("T")

_DIALECT: Final = Dialect(
    placeholder="?",
    # An alias of the rowid: max + 1 under the single writer, so commit order.
    position_type="INTEGER PRIMARY KEY",
    integer_type="INTEGER",
    json_type="TEXT",
    timestamp_type="TEXT",
    uuid_type="TEXT",
    json_parameter="?",
)
_SYNCHRONOUS: Final = ("OFF", "NORMAL", "FULL", "EXTRA")


# Errors SQLite raises from COMMIT before it writes the commit: nothing was committed.
_COMMIT_NOT_WRITTEN: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_CONSTRAINT,
    }
)


#: Where each event of a committed plan is: its id mapped to ``(global_position,
#: recorded_at)`` (what ``SqliteTransaction.recorded`` holds).
_Recorded = dict[uuid.UUID, tuple[int, datetime.datetime]]

# How many event ids one ``select_recorded`` call binds: below SQLite's variable limit
# (999 in builds before 3.32) whatever the build.
_IDS_PER_SELECT: Final = 500


class _CommitOutcomeUnknown(Exception):
    """Internal: ``COMMIT`` failed in a way that may have come after the commit was written.

    ``results`` are the batch's outcomes as they would have been had it committed (a
    refused plan keeps its own error); the store turns each accepted plan's into
    ``CommitOutcomeUnknown``.
    """

    def __init__(self, reason: str, results: list[outcome.Outcome[_Recorded]]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.results = results


@attrs.frozen
class _Commit:
    """Everything the commit thread needs, so that it touches no shared state."""

    statements: Statements
    aggregate_type: str
    expected: dict[str, int]
    events: list[EventRow]
    snapshots: list[SnapshotRow]
    busy_timeout_ms: int


def _write(connection: sqlite3.Connection, plans: Sequence[_Commit]) -> list[_Recorded]:
    """Insert the events and upsert the snapshots of ``plans`` (all of one store).

    Returns where each plan's events were stored, plan by plan.
    """
    statements, aggregate_type = plans[0].statements, plans[0].aggregate_type
    recorded_at = utc_text(utc_now())
    # As read_all will return it: the stored text, parsed back.
    moment = parse_utc(recorded_at)
    rows = [
        row.parameters(aggregate_type, recorded_at, text_ids=True)
        for plan in plans
        for row in plan.events
    ]
    position = 0
    if rows:
        connection.executemany(statements.insert_event, rows)
        # global_position is the rowid, and SQLite gives a new row max(rowid) + 1. This
        # transaction holds the write lock, so nobody inserts in between: the rows got
        # consecutive positions, ending at the last insert's.
        last = connection.execute("SELECT last_insert_rowid()").fetchone()[0]
        position = int(last) - len(rows)
    recorded: list[_Recorded] = []
    for plan in plans:
        places: _Recorded = {}
        for row in plan.events:
            position += 1
            places[row.event_id] = (position, moment)
        recorded.append(places)
    for plan in plans:
        for snapshot in plan.snapshots:
            connection.execute(
                statements.upsert_snapshot,
                snapshot.parameters(aggregate_type, utc_text(snapshot.recorded_at)),
            )
    return recorded


def _read_recorded(connection: sqlite3.Connection, plan: _Commit) -> _Recorded:
    """Where ``plan``'s events are stored, read back by id (for a plan committed before)."""
    ids = [str(row.event_id) for row in plan.events]
    recorded: _Recorded = {}
    for start in range(0, len(ids), _IDS_PER_SELECT):
        chunk = ids[start : start + _IDS_PER_SELECT]
        sql = plan.statements.select_recorded("?", len(chunk))
        for event_id, position, recorded_at in connection.execute(sql, chunk).fetchall():
            recorded[uuid.UUID(event_id)] = (int(position), parse_utc(recorded_at))
    return recorded


def _send_commit(connection: sqlite3.Connection, results: list[outcome.Outcome[_Recorded]]) -> None:
    """``COMMIT``; raise ``_CommitOutcomeUnknown`` if its error leaves the outcome open."""
    try:
        connection.execute("COMMIT")
    except sqlite3.Error as error:
        # Still in the transaction: the commit did not happen (the caller rolls back).
        if connection.in_transaction or error_code(error) in _COMMIT_NOT_WRITTEN:
            raise
        raise _CommitOutcomeUnknown(str(error), results) from error


def _is_event_id_violation(error: sqlite3.IntegrityError) -> bool:
    return "UNIQUE" in str(error) and str(error).rstrip().endswith(".event_id")


def _commit(connection: sqlite3.Connection, interrupt: Interrupt, plan: _Commit) -> _Recorded:
    """Check every expected sequence, write everything, commit; or write nothing.

    Returns where the plan's events are stored, also when they already were (their ids
    are taken: the same plan was committed before).
    """
    begin_immediate(connection, interrupt, plan.busy_timeout_ms)
    try:
        conflict = _check(connection, plan, {})
        if conflict is not None:
            raise conflict
        try:
            [recorded] = _write(connection, [plan])
        except sqlite3.IntegrityError as error:
            if _is_event_id_violation(error):
                # Ids are given once per staged event, so these events are stored
                # already: the plan has committed before. Never a conflict.
                rollback(connection)
                return _read_recorded(connection, plan)
            # The checks above make this unreachable unless something wrote the table
            # without them; it is still a lost race on an aggregate's sequence.
            raise _conflict(connection, plan, error) from error
        if interrupt.requested:
            raise Interrupted
        _send_commit(connection, [outcome.Value(recorded)])
    except BaseException:
        rollback(connection)
        raise
    return recorded


def _check(
    connection: sqlite3.Connection, plan: _Commit, stored: dict[str, int]
) -> ConcurrencyConflict | None:
    """The conflict that refuses ``plan``, if any; ``stored`` caches sequences seen so far."""

    def actual(aggregate_id: str) -> int:
        if aggregate_id not in stored:
            stored[aggregate_id] = max_sequence(
                connection, plan.statements, plan.aggregate_type, aggregate_id
            )
        return stored[aggregate_id]

    return find_conflict(plan.expected, actual)


def _commit_batch(
    connection: sqlite3.Connection, interrupt: Interrupt, plans: list[_Commit]
) -> list[outcome.Outcome[_Recorded]]:
    """Commit several transactions in one: one lock, one fsync; each plan all or nothing.

    A plan whose expected sequence is stale is refused alone. If the database refuses a
    row (which the checks make unreachable unless another program writes the table), the
    batch is rolled back and each plan committed on its own, so only that plan fails;
    each plan's outcome is then its own (committed, refused, or outcome unknown). A
    committed plan's value is where its events are stored.
    """
    if len(plans) == 1:
        return [outcome.Value(_commit(connection, interrupt, plans[0]))]
    begin_immediate(connection, interrupt, plans[0].busy_timeout_ms)
    try:
        stored: dict[str, int] = {}
        results: list[outcome.Outcome[_Recorded]] = []
        accepted: list[int] = []
        for plan in plans:
            conflict = _check(connection, plan, stored)
            if conflict is not None:
                results.append(outcome.Error(conflict))
                continue
            accepted.append(len(results))
            results.append(outcome.Value({}))
            for row in plan.events:
                stored[row.aggregate_id] = row.sequence
        try:
            if accepted:
                written = _write(connection, [plans[index] for index in accepted])
                for index, recorded in zip(accepted, written, strict=True):
                    results[index] = outcome.Value(recorded)
        except sqlite3.IntegrityError:
            rollback(connection)
            return _commit_each(connection, interrupt, plans)
        if interrupt.requested:
            raise Interrupted
        _send_commit(connection, results)
        return results
    except BaseException:
        rollback(connection)
        raise


def _commit_each(
    connection: sqlite3.Connection, interrupt: Interrupt, plans: list[_Commit]
) -> list[outcome.Outcome[_Recorded]]:
    """Commit each plan of a refused batch alone; a plan's failure is its own outcome."""
    results: list[outcome.Outcome[_Recorded]] = []
    for plan in plans:
        try:
            recorded = _commit(connection, interrupt, plan)
        except _CommitOutcomeUnknown as error:
            results.append(outcome.Error(error))
        except (sqlite3.Error, EventStoreError, TransactionFailed) as error:
            # Never raise here: plans before this one may have committed, and their
            # callers must hear so.
            results.append(outcome.Error(error))
        else:
            results.append(outcome.Value(recorded))
    return results


def _conflict(connection: sqlite3.Connection, plan: _Commit, error: sqlite3.Error) -> Exception:
    """The error for a constraint violation while inserting ``plan``'s events."""
    if "UNIQUE" in str(error):
        for row in plan.events:
            actual = max_sequence(
                connection, plan.statements, plan.aggregate_type, row.aggregate_id
            )
            if actual >= row.sequence:
                return ConcurrencyConflict(
                    aggregate_id=row.aggregate_id,
                    expected_sequence=row.sequence - 1,
                    actual_sequence=actual,
                )
    return EventStoreError(f"an event row broke a constraint of the events table ({error})")


def _table_columns(connection: sqlite3.Connection, table: str) -> list[str]:
    # PRAGMA arguments cannot be bound; ``table`` passed check_identifier.
    return [row[1] for row in connection.execute(f"PRAGMA table_info({table})").fetchall()]


def _open_writer(
    path: str,
    statements: Statements,
    events_table: str,
    snapshots_table: str,
    synchronous: str,
    busy_timeout_ms: int,
) -> sqlite3.Connection:
    connection = sqlite3.connect(
        path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
    )
    try:
        # Processes opening a new file at once race to switch it to WAL and to create the
        # tables, and some of those steps report SQLITE_BUSY without waiting: retry them
        # until busy_timeout_ms is spent (wall time, as SQLite's own timeout).
        deadline = time.monotonic() + busy_timeout_ms / 1000
        while True:
            try:
                _prepare(
                    connection,
                    path,
                    statements,
                    events_table,
                    snapshots_table,
                    synchronous,
                    busy_timeout_ms,
                )
                break
            except sqlite3.OperationalError as error:
                if error_code(error) != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
        connection.execute(f"PRAGMA busy_timeout={min(busy_timeout_ms, BUSY_SLICE_MS)}")
    except BaseException:
        connection.close()
        raise
    return connection


def _prepare(
    connection: sqlite3.Connection,
    path: str,
    statements: Statements,
    events_table: str,
    snapshots_table: str,
    synchronous: str,
    busy_timeout_ms: int,
) -> None:
    """Set the pragmas and create or check the tables, in one write transaction."""
    # Reading the header first: a file that is not a database fails here, before any
    # pragma or DDL could write to it.
    connection.execute("PRAGMA schema_version").fetchall()
    mode = connection.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
    if str(mode).lower() != "wal":
        raise EventStoreError(
            f"SQLite could not put {path!r} in WAL mode (journal_mode is {mode!r}); "
            "keep the database on a local file system"
        )
    # Both values passed validation; PRAGMA arguments cannot be bound.
    connection.execute(f"PRAGMA synchronous={synchronous}")
    connection.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    where = f"in {path!r}"
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute(statements.create_schema_version)
        rows = connection.execute(statements.select_schema_version, (events_table,)).fetchall()
        version = rows[0][0] if rows else None
        check_version_to_open(events_table, version, where)
        migrate = check_existing_tables(
            events_table,
            _table_columns(connection, events_table),
            snapshots_table,
            _table_columns(connection, snapshots_table),
            where,
        )
        if migrate:
            _migrate_v1(connection, events_table)
        for ddl in statements.create:
            connection.execute(ddl)
        connection.execute(
            statements.insert_schema_version, (events_table, snapshots_table, SCHEMA_VERSION)
        )
        if version is not None and version < SCHEMA_VERSION:
            connection.execute(statements.update_schema_version, (SCHEMA_VERSION, events_table))
        version = connection.execute(statements.select_schema_version, (events_table,)).fetchall()[
            0
        ][0]
        check_schema_version(events_table, version, where)
        connection.execute("COMMIT")
    except BaseException:
        rollback(connection)
        raise


def _migrate_v1(connection: sqlite3.Connection, events_table: str) -> None:
    """Give a version-1 events table its ``event_id`` column, a fresh UUID per event.

    SQLite cannot add a NOT NULL column without a default, so the table is rebuilt:
    copied into a new table of the current layout (positions kept), then swapped in.
    Runs inside the caller's transaction; the indexes are created afterwards.
    """
    logger.info("migrating SQLite table %r to schema version %d", events_table, SCHEMA_VERSION)
    # check_identifier allows 63 characters; the suffix must fit too.
    rebuilt = f"{events_table[:40]}_trio_es_v2"
    columns = ", ".join(EVENT_COLUMNS_V1)
    connection.create_function("trio_es_uuid4", 0, lambda: str(uuid.uuid4()))
    try:
        connection.execute(events_table_ddl(_DIALECT, rebuilt, if_not_exists=False))
        connection.execute(
            f"INSERT INTO {rebuilt} ({columns}, event_id) "
            f"SELECT {columns}, trio_es_uuid4() FROM {events_table} ORDER BY global_position"
        )
        connection.execute(f"DROP TABLE {events_table}")
        connection.execute(f"ALTER TABLE {rebuilt} RENAME TO {events_table}")
    finally:
        connection.create_function("trio_es_uuid4", 0, None)


def _open_reader(path: str, statements: Statements, busy_timeout_ms: int) -> sqlite3.Connection:
    connection = sqlite3.connect(
        path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
    )
    try:
        connection.execute("PRAGMA query_only=ON")
        # Read the schema and compile a load's two statements now, at open, not in the
        # first load a caller waits for: sqlite3 keeps compiled statements per connection,
        # keyed by their text, and the aggregate type '' matches no row.
        connection.execute(statements.select_snapshot, ("", "")).fetchall()
        connection.execute(statements.select_events, ("", "", 0)).fetchall()
    except BaseException:
        connection.close()
        raise
    return connection


def _check_path(path: object) -> str:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike (got {path!r})")
    text = os.fsdecode(os.fspath(path))
    if text in ("", ":memory:"):
        raise ValueError(
            f"SqliteStore needs a database file that its two connections share (got {text!r}); "
            "for a throwaway store use a file in a temporary directory"
        )
    return text


def _check_busy_timeout(value: object) -> int:
    return check_int("busy_timeout_ms", value, minimum=0)


def _check_synchronous(value: object) -> str:
    if not isinstance(value, str) or value.upper() not in _SYNCHRONOUS:
        raise ValueError(
            f"synchronous must be one of {', '.join(_SYNCHRONOUS)} (got {value!r}); FULL keeps "
            "every acknowledged commit through a power cut"
        )
    return value.upper()


@final
@attrs.define(eq=False)
class SqliteTransaction(SqlTransaction[EventT, EntityT]):
    """A transaction of a :class:`SqliteStore`: buffered writes, applied when the block exits.

    Only meaningful inside its ``async with store.transaction()`` block.
    """


@final
@attrs.define(eq=False)
class SqliteStore(SqlStoreShell[SqliteTransaction[EventT, EntityT], EventT, EntityT]):
    """An event store in a SQLite file; open it with :meth:`SqliteStore.open`.

    Several stores, in one process or several, may use the same file: commits are
    serialized by SQLite's write lock and checked for optimistic concurrency, so two
    writers that decided on the same sequence never both succeed.

    It is also a projection source (see :class:`~trio_es._store.ProjectionSource`): a
    commit through this store object wakes its watches at once, other processes' commits
    are seen by polling, and projection leases are file locks next to the database (see
    ``_sqlite_projection.py``).

    Attributes:
        path: the database file.
        aggregate_type: the value of the ``aggregate_type`` column for this store's rows;
            stores with different types share tables without seeing each other's data.
        transcoder: encodes and decodes events, snapshot entities and metadata.
        poll_interval: the longest a watch waits before its subscriber reads again, in
            seconds: how soon another process's commits are seen.
        takeover_interval: how often a waiting projection lease tries to take over, in
            seconds.
    """

    path: str
    aggregate_type: str
    transcoder: Transcoder
    _statements: Statements
    _writer: Connection
    _reader: Connection
    _busy_timeout_ms: int
    _synchronous: str = attrs.field(kw_only=True)
    poll_interval: float = attrs.field(kw_only=True)
    takeover_interval: float = attrs.field(kw_only=True)
    #: Batches the commits of concurrent transactions (see ``_group_commit.py``).
    _group_commit: GroupCommit[_Commit] = attrs.field(init=False)
    _reads: SqlReads[EventT, EntityT] = attrs.field(init=False, repr=False)
    #: The highest global position committed through this store object.
    _head: AsyncValue[int] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._group_commit = GroupCommit(self._commit_batch, gather=True)
        self._reads = SqlReads(
            self._statements, self.transcoder, self.aggregate_type, self._fetch, self._read
        )
        self._head = async_value(0)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        transcoder: Transcoder,
        aggregate_type: str = "default",
        events_table: str = "events",
        snapshots_table: str = "snapshots",
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
        poll_interval: float = 1.0,
        takeover_interval: float = 1.0,
    ) -> AsyncIterator[SqliteStore[Any, Any]]:
        """Open (creating if needed) the store in ``path``; close it when the block exits.

        The tables and the schema-version row are created on first open, idempotently,
        even when several processes open a new file at once.

        Args:
            path: the database file. ``":memory:"`` is refused: the store's two
                connections must share the data; use a temporary file instead.
            transcoder: with every event class (and, for snapshots, the entity class)
                registered.
            aggregate_type: the ``aggregate_type`` column value of this store's rows.
            events_table: the events table name (a plain identifier).
            snapshots_table: the snapshots table name (a plain identifier).
            synchronous: SQLite's ``PRAGMA synchronous``: ``"FULL"`` (default) makes an
                acknowledged commit survive a power cut; ``"NORMAL"`` is faster and
                survives a process crash but may lose the last commits on power loss.
            busy_timeout_ms: how long a commit waits for another connection's write lock
                before it fails with the retryable ``TransactionFailed``.
            poll_interval: how often, in seconds, a subscriber with nothing new reads
                again: commits through this store object wake it at once, another
                process's are seen within this interval.
            takeover_interval: how often, in seconds, a projection waiting for its lease
                tries to take it over (from a process that ended or died).

        Raises:
            ValueError, TypeError: an argument is invalid (nothing was opened).
            EventStoreError: ``path`` is not a SQLite database (the file is left as it
                was), cannot be opened, or holds tables of another layout.
        """
        if not isinstance(transcoder, Transcoder):
            raise TypeError(f"transcoder must be a Transcoder (got {transcoder!r})")
        text_path = _check_path(path)
        aggregate_type = check_aggregate_type(aggregate_type)
        # cattrs' code generation now, not in the first command or load.
        transcoder.prepare()
        statements = Statements.build(
            _DIALECT, events_table=events_table, snapshots_table=snapshots_table
        )
        synchronous = _check_synchronous(synchronous)
        busy_timeout_ms = _check_busy_timeout(busy_timeout_ms)
        poll_interval = check_seconds("poll_interval", poll_interval, hint="1.0 suits most uses")
        takeover_interval = check_seconds(
            "takeover_interval", takeover_interval, hint="1.0 suits most uses"
        )
        try:
            writer = await trio.to_thread.run_sync(
                _open_writer,
                text_path,
                statements,
                events_table,
                snapshots_table,
                synchronous,
                busy_timeout_ms,
            )
        except sqlite3.Error as error:
            raise translate_error(
                error, doing="opening", path=text_path, busy_timeout_ms=busy_timeout_ms
            ) from error
        store: SqliteStore[Any, Any] | None = None
        try:
            try:
                reader = await trio.to_thread.run_sync(
                    _open_reader, text_path, statements, busy_timeout_ms
                )
            except sqlite3.Error as error:
                raise translate_error(
                    error, doing="opening", path=text_path, busy_timeout_ms=busy_timeout_ms
                ) from error
            store = cls(
                text_path,
                aggregate_type,
                transcoder,
                statements,
                Connection(writer, "writer"),
                Connection(reader, "reader"),
                busy_timeout_ms,
                synchronous=synchronous,
                poll_interval=poll_interval,
                takeover_interval=takeover_interval,
            )
            yield store
        finally:
            if store is None:
                writer.close()
            else:
                await store._close()

    async def _close(self) -> None:
        for connection in (self._writer, self._reader):
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True) as scope:
                await connection.close()
            if scope.cancelled_caught:  # pragma: no cover - a thread call hung
                logger.error(
                    "gave up closing the SQLite %s connection to %r after %s s",
                    connection.role,
                    self.path,
                    CLOSE_TIMEOUT_S,
                )

    async def _run(
        self, connection: Connection, fn: Callable[[sqlite3.Connection, Interrupt], T], doing: str
    ) -> T:
        try:
            return await connection.run(fn)
        except sqlite3.Error as error:
            raise translate_error(
                error, doing=doing, path=self.path, busy_timeout_ms=self._busy_timeout_ms
            ) from error

    async def _fetch(
        self, sql: str, parameters: Sequence[object], doing: str
    ) -> Sequence[Sequence[Any]]:
        """The rows of one read statement, on the reader connection's thread."""
        return await self._read(
            lambda connection: connection.execute(sql, parameters).fetchall(), doing
        )

    async def _read(self, fn: Callable[[Queryable], T], doing: str) -> T:
        # Reads need no interrupt checks of their own: one statement, interrupted in SQLite.
        return await self._run(self._reader, lambda connection, _: fn(connection), doing)

    def transaction(self) -> AbstractAsyncContextManager[SqliteTransaction[EventT, EntityT]]:
        """Open a transaction; its writes are committed together when the block exits.

        Leaving the block with an exception writes nothing. Reads inside the block see
        the latest committed data plus the transaction's own writes.

        Raises on exit:
            ConcurrencyConflict: another writer appended to one of the aggregates first;
                nothing of this transaction was written.
            TransactionFailed: the database stayed locked longer than ``busy_timeout_ms``;
                nothing was written.
            CommitOutcomeUnknown: ``COMMIT`` failed with an error (a disk I/O error, say)
                that may have come after the commit reached the file: it may or may not
                be stored. Never retried automatically.
            EventStoreError: SQLite failed; nothing was written.
        """
        tx: SqliteTransaction[EventT, EntityT] = SqliteTransaction(self, self._pending())
        return TransactionBlock(tx, functools.partial(self._commit_writes, tx))

    async def _commit_writes(
        self, tx: SqliteTransaction[Any, Any], pending: PendingWrites[Any, Any]
    ) -> None:
        plan = _Commit(
            self._statements,
            self.aggregate_type,
            pending.expected,
            pending.event_rows,
            pending.snapshot_rows(),
            self._busy_timeout_ms,
        )
        recorded: _Recorded = await self._group_commit.commit(plan)
        tx.recorded = recorded

    async def _commit_batch(self, plans: list[_Commit]) -> list[outcome.Outcome[_Recorded]]:
        doing = "committing a transaction"
        try:
            results = await self._run(
                self._writer, functools.partial(_commit_batch, plans=plans), doing
            )
        except _CommitOutcomeUnknown as unknown:
            # The whole batch was one transaction: every plan it accepted shares its fate.
            # Not known to be stored, so no watch is woken: polling finds it if it is.
            results = [
                outcome.Error(unknown) if isinstance(result, outcome.Value) else result
                for result in unknown.results
            ]
        else:
            # Right after the commit, before any checkpoint: a cancelled caller still
            # wakes the watches for what it committed.
            positions = [
                position
                for result in results
                if isinstance(result, outcome.Value)
                for position, _ in result.value.values()
            ]
            if positions:
                raise_head(self._head, max(positions))
        results = [
            outcome.Error(self._unknown(plan, result.error))
            if isinstance(result, outcome.Error) and isinstance(result.error, _CommitOutcomeUnknown)
            else result
            for plan, result in zip(plans, results, strict=True)
        ]
        return translate_outcomes(
            results,
            sqlite3.Error,
            lambda error: translate_error(
                error, doing=doing, path=self.path, busy_timeout_ms=self._busy_timeout_ms
            ),
        )

    def _unknown(self, plan: _Commit, error: _CommitOutcomeUnknown) -> CommitOutcomeUnknown:
        aggregates = list(plan.expected) or [row.aggregate_id for row in plan.snapshots]
        unknown = CommitOutcomeUnknown(
            f"COMMIT failed in the SQLite database {self.path!r} ({error.reason}) at a point "
            f"where the commit may already be in the file (aggregates "
            f"{', '.join(repr(a[:80]) for a in aggregates)})",
            aggregate_id=aggregates[0][:80] if aggregates else None,
        )
        unknown.__cause__ = error.__cause__
        return unknown

    @asynccontextmanager
    async def watch(self) -> AsyncIterator[HeadWatch]:
        """Wake-ups for one subscriber while the block runs.

        ``await watch.wait(after)`` returns at once when this store object has committed
        beyond ``after``, as soon as it does, and otherwise after :attr:`poll_interval`
        seconds (SQLite announces nothing: other processes' commits are found by reading).
        """
        yield HeadWatch(self._head, self.poll_interval)

    async def checkpoint_position(self, name: str) -> int:
        """Projection ``name``'s stored checkpoint (0 when it never ran), read without its lease.

        Read on the store's reader connection: what a standby instance follows.

        Raises:
            TypeError, ValueError: ``name`` is not a non-empty str.
            EventStoreError: SQLite failed.
        """
        name = check_text(check_projection_name(name), "projection name")
        key = (self._statements.events_table_key, self.aggregate_type, name)

        def read(connection: Queryable) -> int:
            rows = connection.execute(self._statements.select_checkpoint, key).fetchall()
            return int(rows[0][0]) if rows else 0

        return await self._read(read, f"reading the checkpoint of projection {name!r}")

    def projection_lease(self, name: str) -> AbstractAsyncContextManager[SqliteLease]:
        """Wait until this is the one active instance of projection ``name``; hold it.

        The lease is an exclusive ``flock`` on ``{path}-trio_es-{digest}.lock`` next to
        the database (kept there afterwards), tried every :attr:`takeover_interval`
        seconds while another lease, in this process or another, holds it; a holder's
        lock ends with its block or its process. The lease has its own connection for
        the checkpoint and ``advance_with``; it is closed, then the lock released, when
        the block exits.

        Raises:
            TypeError, ValueError: ``name`` is not a non-empty str.
            EventStoreError: the lock file or the database cannot be opened.
        """
        settings = LeaseSettings(
            self.path,
            self._statements,
            self.aggregate_type,
            self._synchronous,
            self._busy_timeout_ms,
            self.takeover_interval,
        )
        return open_lease(settings, name)
