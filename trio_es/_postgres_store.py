"""The PostgreSQL event store: several processes, on several machines, share one database.

How it talks to PostgreSQL: commits and reads, the hot path, go from the Trio thread
through libpq's non-blocking calls (``_postgres_wire.py``), with no thread hop; setup,
leases, LISTEN, the lookup after a lost commit and the rare commit shapes run blocking
psycopg calls in a worker thread (``trio.to_thread.run_sync``). The store keeps a small
pool of connections (``_postgres_pool.py``), each with its own ``CapacityLimiter(1)``: at
most one task or thread ever uses a connection, and a task that takes a connection whose
previous (cancelled) call is still finishing waits for it first (see
``_postgres_connection.py``, which watches and projection leases use too).

A transaction makes, as a rule, one round trip to write: ``commit_events`` and
``save_snapshot`` only encode and buffer (a serialization error is raised right there),
and leaving the ``async with`` block sends BEGIN, the snapshot upserts, the commit lock,
the inserts (which carry the optimistic-concurrency checks) and COMMIT as one pipeline
(see ``_commit_wire``); a transaction of one event is a single statement that commits
itself (see ``_commit_alone_statement``). Each read is one round trip and sees the latest
committed data plus the transaction's own buffered writes; a transaction that only reads
writes nothing.

Commit order: every transaction that inserts events takes one transaction-scoped
advisory lock per events table just before its INSERT and holds it until it commits, so
``global_position`` values are drawn and made visible in one serial order. That is what
lets a reader page through :meth:`PostgresStore.read_all` without ever skipping an event
(see :meth:`PostgresStore.read_all` for the argument). The inserts return their
positions in the same round trip, so a committed transaction handle knows where each
of its events is (``recorded``, for ``committed_envelopes``), and the transaction ends
with ``pg_notify`` of its last position on the table's channel, which PostgreSQL
delivers to every listener when (and only when) it commits: subscribers in other
processes are woken at once (see ``_postgres_listen.py``).

Cancellation: a cancelled call asks the server to cancel the running statement
(``Connection.cancel_safe``), lets the thread finish and roll back, and only then lets
``trio.Cancelled`` through, with the connection back in the pool, idle. A commit that had
already reached COMMIT stays committed, as with any cancelled I/O.

Lost connections: a commit that fails before COMMIT may have reached the server (a lost
connection, an error on BEGIN, a conflict, a refused row) wrote nothing, and says so. One
that fails afterwards, other than by a plain statement ERROR (which aborts the
transaction), may or may not have committed: the store never sends it again, but finds
out on a fresh connection. It first ends the old session if it still lives
(``pg_terminate_backend``, checked by pid and start time, waiting for it to exit), so that
the outcome can no longer change; then, holding the commit lock (so that a commit still
in progress finishes first), it looks one of the batch's event ids up. Found: the batch
committed, every caller is told so, and its events' positions are read back by id. Not
found: nothing was written, the retryable ``TransactionFailed``. Cannot tell within
``_RESOLVE_SECONDS`` (server unreachable, the old session would not stop):
``CommitOutcomeUnknown``.

Projections: :meth:`PostgresStore.projection_lease` makes one instance active across
processes with a session advisory lock on a connection of its own, which also reads and
moves the checkpoint (see ``_postgres_lease.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import logging
import re
import select
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, TypeVar, final

import attrs
import outcome
import psycopg
import psycopg.errors
import trio
from psycopg.pq import TransactionStatus
from psycopg.pq.abc import PGresult

from ._errors import CommitOutcomeUnknown, ConcurrencyConflict, EventStoreError, TransactionFailed
from ._group_commit import GroupCommit
from ._postgres_connection import (
    CLEANUP_SECONDS,
    Backend,
    Call,
    Connection,
    PooledConnection,
    close_quietly,
    describe_server,
    first_line,
    translate_error,
)
from ._postgres_lease import PostgresLease, check_projection_name, hold_lease
from ._postgres_listen import PostgresWatch, open_watch
from ._postgres_pool import Pool, SessionAbandoned
from ._postgres_wire import BEGIN, COMMIT, ROLLBACK, Query
from ._serialization import Transcoder
from ._sql import (
    SCHEMA_VERSION,
    Dialect,
    EventRow,
    SnapshotRow,
    Statements,
    check_aggregate_type,
    check_existing_tables,
    check_schema_version,
    check_text,
    check_version_to_open,
    find_conflict,
    max_sequence,
    notify_channel,
    parse_utc,
)
from ._sql_store import (
    PendingWrites,
    SqlReads,
    SqlStoreShell,
    SqlTransaction,
    TransactionBlock,
    translate_outcomes,
)
from ._trio_util import AsyncValue, async_value
from ._types import Metadata, utc_now
from ._validated import check_int, check_seconds
from ._watch import raise_head

__all__ = ["PostgresStore", "PostgresTransaction"]

logger: Final = logging.getLogger("trio_es.postgres_store")

EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")
T = TypeVar("T")

#: The old name of :func:`describe_server`, which ``trio_es._inspect`` imports from here.
_describe_server: Final = describe_server

#: How long (seconds) finding out whether a commit with a lost connection landed may take.
_RESOLVE_SECONDS: Final = 10.0
#: The pause (seconds) between two attempts at finding out, when one lost its connection.
_RESOLVE_RETRY_SECONDS: Final = 0.05
#: How long (ms) the server waits for the lost session to exit, and for the commit lock.
_RESOLVE_WAIT_MS: Final = 5000


class _CommitOutcomeUnknown(SessionAbandoned):
    """Internal: a commit failed after COMMIT may have reached the server.

    ``plans`` were sent as one database transaction; ``results`` are their outcomes as
    they would be had it committed (a plan refused by a conflict keeps its error).
    ``backend`` is the session that ran it, so that the store can make sure it has
    ended before it looks the outcome up.
    """

    def __init__(
        self,
        reason: str,
        plans: list[_Commit],
        results: list[outcome.Outcome[None]],
        backend: Backend | None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.plans = plans
        self.results = results
        self.backend = backend


# -- the store ---------------------------------------------------------------------------

_DIALECT: Final = Dialect(
    placeholder="%s",
    # Identity columns default to CACHE 1, so values are handed out in the order the
    # INSERTs run; the commit-order argument in read_all relies on that.
    position_type="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    integer_type="BIGINT",
    json_type="JSONB",
    timestamp_type="TIMESTAMPTZ",
    uuid_type="UUID",
    json_parameter="%s::jsonb",
    # The transcoder decodes JSON text; jsonb would otherwise come back parsed.
    json_result="{}::text",
)

#: Longest aggregate type (UTF-8 bytes): it is part of the unique btree key, whose entries
#: must fit in about 2.7 kB after compression, and aggregate ids need the room.
MAX_AGGREGATE_TYPE_BYTES: Final = 255

# Serializes schema creation between processes opening a new database at once: plain
# CREATE TABLE IF NOT EXISTS races with itself in PostgreSQL.
_SETUP_LOCK_KEY: Final = 0x7472696F5F6573  # "trio_es"

# An unescaped \u0000 in JSON text: preceded by an even number of backslashes.
_JSON_NUL: Final = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _commit_lock_key(events_table: str) -> int:
    """The advisory-lock key that orders the commits of one events table.

    Unquoted identifiers fold to lower case in PostgreSQL, so ``Events`` and ``events``
    are one table and must share a key. Advisory locks are per database.
    """
    digest = hashlib.blake2b(f"trio_es commit {events_table.lower()}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def _check_key(value: object, what: str) -> str:
    """``value`` if PostgreSQL text can hold it (a str, valid UTF-8, no NUL), else raise."""
    text = check_text(value, what)
    if "\x00" in text:
        raise EventStoreError(
            f"{what} {text!r:.80} contains a NUL character (\\x00), which PostgreSQL text "
            "cannot hold; remove it from the id"
        )
    return text


def _check_metadata(metadata: Metadata, aggregate_id: str) -> None:
    for key, value in metadata:
        if (isinstance(key, str) and "\x00" in key) or (isinstance(value, str) and "\x00" in value):
            raise EventStoreError(
                f"metadata pair ({key!r:.40}, {value!r:.40}) contains a NUL character (\\x00), "
                "which PostgreSQL jsonb cannot hold; remove it",
                aggregate_id=aggregate_id[:80],
            )


def _check_rows(events: Sequence[EventRow], snapshots: Sequence[SnapshotRow]) -> None:
    """Refuse encoded rows that PostgreSQL cannot store, before anything is sent."""
    for row in events:
        if "\\u0000" in row.payload and _JSON_NUL.search(row.payload):
            raise EventStoreError(
                f"event {row.event_type!r:.80} version {row.event_version} at sequence "
                f"{row.sequence} has a string containing a NUL character (\\x00), which "
                "PostgreSQL jsonb cannot hold; remove it from the event",
                aggregate_id=row.aggregate_id[:80],
            )
        if "\x00" in row.event_type:
            raise EventStoreError(
                f"event type name {row.event_type!r:.80} contains a NUL character (\\x00); "
                "register the event class under a name without it",
                aggregate_id=row.aggregate_id[:80],
            )
    for snapshot in snapshots:
        if ("\\u0000" in snapshot.payload and _JSON_NUL.search(snapshot.payload)) or (
            "\x00" in snapshot.entity_type
        ):
            raise EventStoreError(
                f"the snapshot of entity {snapshot.entity_type!r:.80} at sequence "
                f"{snapshot.sequence} contains a NUL character (\\x00), which PostgreSQL "
                "cannot hold; remove it from the entity",
                aggregate_id=snapshot.aggregate_id[:80],
            )


#: Where each event of a commit was stored: its id mapped to ``(global_position,
#: recorded_at)``; what a committed plan's outcome holds.
_Recorded = dict[uuid.UUID, tuple[int, datetime.datetime]]

#: Most event ids looked up in one ``select_recorded`` statement.
_RECORDED_CHUNK: Final = 1000


def _notify_statement(events_table: str) -> str:
    """``SELECT pg_notify(channel, last position)`` for a commit to ``events_table``.

    pg_notify inside the transaction is delivered when (and only if) it commits. Run
    under the commit lock after the inserts, ``max(global_position)`` (one probe of the
    primary key) is the commit's last position: no other commit inserts meanwhile. (Not
    ``currval``: it needs rights on the sequence, which inserting does not.)
    """
    return f"SELECT pg_notify(%s, (SELECT max(global_position) FROM {events_table})::text)"


@attrs.frozen
class _Commit:
    """Everything the commit thread needs, so that it touches no shared state.

    ``channel`` and ``notify`` (see :func:`_notify_statement`) say where and how a
    commit that inserts events is announced; without them it is not.
    """

    statements: Statements
    aggregate_type: str
    lock_key: int
    expected: dict[str, int]
    events: list[EventRow]
    snapshots: list[SnapshotRow]
    channel: str | None = None
    notify: str | None = None


def _insert_after_statement(events_table: str) -> str:
    """``INSERT ... RETURNING global_position`` of one event, refused unless it comes next.

    The optimistic-concurrency check rides in the insert, so that a commit needs no
    round trip of its own to check: the event's ``sequence`` column is given as ``CASE
    WHEN <the stream's last stored sequence, 0 without events> + 1 = sequence THEN
    sequence END``, i.e. NULL unless the stream ends right before it, and the column's
    NOT NULL constraint (in every layout) then makes the statement fail: the
    transaction aborts, the server skips the rest of the pipeline, COMMIT included, and
    the error is told apart by its column (see :func:`_is_check_refusal`).

    That one check refuses a stale plan (the stream is longer) and one ahead of the
    store (it is shorter: inserting would leave a gap), exactly as comparing
    ``max(sequence)`` with the expected sequence did. Run under the commit lock, each
    statement sees every commit made before it, and the transaction's own earlier
    inserts: later events of a plan, and plans later in a batch, check against those.
    A writer that skips the lock and has not committed yet is invisible here, and the
    unique key ``(aggregate_type, aggregate_id, sequence)`` refuses the row once it
    commits. The last sequence is one probe of that key's index (``ORDER BY ... DESC
    LIMIT 1``, as :attr:`Statements.max_sequence`).

    Parameters: :func:`_insert_after_parameters`.
    """
    return (
        f"INSERT INTO {events_table} (aggregate_type, aggregate_id, sequence, event_type, "
        "event_version, payload, metadata, recorded_at, event_id) VALUES (%s, %s, "
        "CASE WHEN COALESCE((SELECT sequence FROM "
        f"{events_table} WHERE aggregate_type = %s AND aggregate_id = %s "
        "ORDER BY sequence DESC LIMIT 1), 0) + 1 = %s::bigint THEN %s::bigint END, "
        "%s, %s, %s::jsonb, %s::jsonb, %s, %s) RETURNING global_position"
    )


def _insert_after_and_notify_statement(events_table: str) -> str:
    """:func:`_insert_after_statement` that also announces the commit, for its last event.

    ``pg_notify(channel, the event's position)`` in ``RETURNING`` runs as the row is
    inserted, and like :func:`_notify_statement` is delivered when (and only if) the
    transaction commits. The last event inserted under the commit lock has the commit's
    last position, which is what :func:`_notify_statement` announces.

    Parameters: :func:`_insert_after_parameters`, then the channel.
    """
    return f"{_insert_after_statement(events_table)}, pg_notify(%s, global_position::text)"


def _commit_alone_statement(events_table: str) -> str:
    """A lone event's whole commit in one statement: lock, checked insert, announcement.

    :func:`_insert_after_and_notify_statement` with the commit lock taken by the same
    statement, sent without BEGIN and COMMIT: PostgreSQL runs it in a transaction of its
    own, committed at the pipeline's sync. Three statements fewer per commit of one
    event (the commonest: one command, one event) saved about 30 µs of this process's
    CPU and 20 µs of wall time per commit here. It keeps every promise of the pipelined
    form:

    * The lock comes first: it is taken in a materialized CTE (a volatile function is
      never inlined), which yields the only row the insert reads, so no position is
      drawn before the lock is held, and it is held to the commit, as in the pipeline.
    * The check's subquery sees the statement's snapshot, taken before the lock was
      granted: a commit to the same stream that lands while this one waits is not seen
      by the check but by the unique key on ``(aggregate_type, aggregate_id, sequence)``,
      which refuses the row (a conflict, as for a writer that skips the lock). A
      snapshot can only miss rows, so the check never accepts a stale plan or a gap.
    * An error in the statement or at its commit rolls it back (``_rolled_back``); the
      connection lost once it was sent leaves the outcome unknown, as a lost COMMIT.

    Parameters: the lock key, :func:`_insert_after_parameters`, then the channel.
    """
    return (
        "WITH commit_lock AS MATERIALIZED (SELECT pg_advisory_xact_lock(%s::bigint)) "
        f"INSERT INTO {events_table} (aggregate_type, aggregate_id, sequence, event_type, "
        "event_version, payload, metadata, recorded_at, event_id) SELECT %s::text, %s::text, "
        "CASE WHEN COALESCE((SELECT sequence FROM "
        f"{events_table} WHERE aggregate_type = %s AND aggregate_id = %s "
        "ORDER BY sequence DESC LIMIT 1), 0) + 1 = %s::bigint THEN %s::bigint END, "
        "%s::text, %s::bigint, %s::jsonb, %s::jsonb, %s::timestamptz, %s::uuid "
        "FROM commit_lock RETURNING global_position, pg_notify(%s, global_position::text)"
    )


def _insert_after_parameters(
    row: EventRow, aggregate_type: str, recorded_at: datetime.datetime
) -> tuple[object, ...]:
    """``row``'s parameters for :func:`_insert_after_statement`: those of
    ``Statements.insert_event`` with the stream's key and the sequence repeated for the check."""
    columns = row.parameters(aggregate_type, recorded_at)
    # (type, id, | type, id, sequence, | sequence, event_type, ...)
    return columns[:2] + columns[:3] + columns[2:]


def _is_check_refusal(error: BaseException) -> bool:
    """Whether ``error`` is the sequence check of :func:`_insert_after_statement` failing."""
    return (
        isinstance(error, psycopg.errors.NotNullViolation)
        and (error.diag.column_name or "").lower() == "sequence"
    )


def _is_sequence_refusal(error: BaseException, statements: Statements) -> bool:
    """Whether the server refused an event row for its sequence (check or unique key)."""
    return _is_check_refusal(error) or (
        isinstance(error, psycopg.errors.UniqueViolation)
        and not _is_event_id_violation(error, statements)
    )


def _unchecked_expectation(plan: _Commit) -> bool:
    """Whether ``plan`` expects a sequence for an aggregate it adds no event to.

    No insert carries that check (a transaction may stage zero events for an
    aggregate, and then commits only if the aggregate is still where it was).
    """
    written = {row.aggregate_id for row in plan.events}
    return any(aggregate_id not in written for aggregate_id in plan.expected)


def _commit(
    raw: Connection, call: Call, plans: list[_Commit], *, check_first: bool = False
) -> list[outcome.Outcome[_Recorded]]:
    """Commit the plans of one or more transactions together; one outcome per plan.

    Each plan is written whole or not at all. A plan decided on a stale sequence (or
    one ahead of the store) is refused alone (``ConcurrencyConflict``), the others
    commit, each with where its events were stored.

    One round trip, as a rule: BEGIN, the snapshot upserts, the commit lock, the inserts,
    the NOTIFY and COMMIT are pipelined with no wait in between, and each insert checks
    its aggregate's sequence itself (see :func:`_insert_after_statement`). The server's
    part after the lock is all the time the commit lock is held (plus the server's
    commit), which is what bounds commit throughput across all writers; a batch of plans
    shares it and its fsync. The inserts return their positions in that same round trip.
    A refused check aborts the transaction before COMMIT: a lone plan then gets its
    ``ConcurrencyConflict`` (the stored sequence is read to name it), and a batch is
    sent again with ``check_first``, so that only the plans at fault fail.

    With ``check_first``, or when a plan expects a sequence of an aggregate it adds no
    event to (no insert would check it), two round trips: BEGIN with the checks of every
    plan, then the writes of the plans that passed, as above.

    If PostgreSQL refuses a row of a batch that was checked first (a writer that
    slipped in between our check and our lock, an id too long for the index), the
    batch is rolled back and each plan committed on its own, so that only the plan at
    fault fails.

    Raises:
        ConcurrencyConflict: a lone plan's sequence is not the stored one.
        _CommitOutcomeUnknown: the call failed after COMMIT may have reached the server,
            other than by a statement ERROR (which proves a rollback).
        psycopg.OperationalError: the connection failed before COMMIT was sent; nothing
            was committed, so the call may be retried.
    """
    statements, aggregate_type = plans[0].statements, plans[0].aggregate_type
    _refuse_if_closed_while_idle(raw)
    check_first = check_first or any(_unchecked_expectation(plan) for plan in plans)
    results: list[outcome.Outcome[None]] = [outcome.Value(None) for _ in plans]
    accepted = plans
    positions: list[int] = []
    recorded_at = utc_now()  # taken again under the commit lock when events are inserted
    # Whether COMMIT may have reached the server. In pipeline mode ``execute`` queues a
    # statement and may send it at once, so this is set before the call.
    commit_sent = False
    try:
        # The inserts' cursors outlive the pipeline block: their results are read once
        # leaving the block has sent the batch and received them.
        with contextlib.ExitStack() as cursors:
            inserts: list[psycopg.Cursor[tuple[Any, ...]]] = []
            with raw.pipeline() as pipeline, raw.cursor() as cursor:
                cursor.execute("BEGIN")
                if check_first:
                    results, accepted = _check_plans(raw, pipeline, plans)
                call.checkpoint()
                snapshots = [row for plan in accepted for row in plan.snapshots]
                if snapshots:
                    cursor.executemany(
                        statements.upsert_snapshot,
                        [row.parameters(aggregate_type, row.recorded_at) for row in snapshots],
                    )
                events = [row for plan in accepted for row in plan.events]
                if events:
                    # Held until COMMIT: positions are drawn and become visible in one order.
                    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (plans[0].lock_key,))
                    recorded_at = utc_now()
                    insert = _insert_after(statements.events_table_key)
                    # One cursor per row, not executemany(returning=True): that waits for
                    # the rows' results right away, a round trip under the commit lock.
                    for row in events:
                        inserts.append(cursors.enter_context(raw.cursor()))
                        inserts[-1].execute(
                            insert, _insert_after_parameters(row, aggregate_type, recorded_at)
                        )
                    if plans[0].channel is not None and plans[0].notify is not None:
                        cursor.execute(plans[0].notify, (plans[0].channel,))
                commit_sent = True
                cursor.execute("COMMIT")
                # Leaving the pipeline block sends the batch and raises its first error.
            positions = [_returned_position(insert_cursor) for insert_cursor in inserts]
    except Exception as error:
        if commit_sent and not _rolled_back(error):
            # The COMMIT may have been done: sending the plans again could store them
            # twice, so the store must find out instead (see PostgresStore._resolve).
            raise _CommitOutcomeUnknown(first_line(error), plans, results, call.backend) from error
        if isinstance(error, psycopg.Error) and (
            _is_check_refusal(error)
            or isinstance(
                error, psycopg.errors.UniqueViolation | psycopg.errors.ProgramLimitExceeded
            )
        ):
            return _refused(raw, call, plans, error, checked=check_first)
        raise
    return _with_recorded(results, accepted, positions, recorded_at)


async def _commit_wire(
    conn: PooledConnection, plans: list[_Commit]
) -> list[outcome.Outcome[_Recorded]]:
    """:func:`_commit` in one round trip from the Trio thread, with no worker thread.

    The same statements as :func:`_commit`'s one-round-trip case go out as one pipeline
    through :meth:`PooledConnection.exchange`, with the same outcomes and errors; a
    lone event goes out as one statement that commits itself (see
    :func:`_commit_alone_statement`). The
    rare paths (a plan expecting a sequence it writes no event to, a refused row) are
    handed to :func:`_commit` and :func:`_refused` in a worker thread, after this
    transaction was rolled back: they are not worth a second implementation.
    """
    if any(_unchecked_expectation(plan) for plan in plans):
        checked: list[outcome.Outcome[_Recorded]] = await conn.run(
            lambda raw, call: _commit(raw, call, plans)
        )
        return checked
    raw = conn.raw
    _refuse_if_closed_while_idle(raw)
    first = plans[0]
    statements, aggregate_type = first.statements, first.aggregate_type
    recorded_at = utc_now()
    events = [row for plan in plans for row in plan.events]
    # A lone event needs no transaction block: one statement that commits itself.
    alone = (
        len(plans) == 1
        and len(events) == 1
        and not first.snapshots
        and first.channel is not None
        and first.notify is not None
    )
    sent: list[tuple[Query, Sequence[object]]]
    if alone:
        statement = _wire_query(_commit_alone(statements.events_table_key))
        parameters = (
            first.lock_key,
            *_insert_after_parameters(events[0], aggregate_type, recorded_at),
            first.channel,
        )
        sent, first_insert = [(statement, parameters)], 0
    else:
        sent = [(BEGIN, ())]
        upsert = _wire_query(statements.upsert_snapshot)
        for plan in plans:
            sent.extend(
                (upsert, row.parameters(aggregate_type, row.recorded_at)) for row in plan.snapshots
            )
        first_insert = len(sent) + 1
        if events:
            sent.append((_LOCK, (first.lock_key,)))
            table = statements.events_table_key
            insert = _wire_query(_insert_after(table))
            sent.extend(
                (insert, _insert_after_parameters(row, aggregate_type, recorded_at))
                for row in events
            )
            if first.channel is not None and first.notify is not None:
                # The last insert announces the commit itself: one statement fewer to run.
                last = sent[-1][1]
                sent[-1] = (_wire_query(_insert_after_and_notify(table)), (*last, first.channel))
        sent.append((COMMIT, ()))
    try:
        results = await conn.exchange(sent)
    except psycopg.Error as error:
        if not _rolled_back(error):
            # The COMMIT went out with everything else (or the statement commits itself):
            # it may have been done, so the store must find out instead of sending the
            # plans again.
            raise _CommitOutcomeUnknown(
                first_line(error), plans, [outcome.Value(None) for _ in plans], conn.backend
            ) from error
        # A statement's error rolled the transaction back before it committed: nothing
        # landed. A transaction block must still be ended; a lone statement's ended itself.
        if not alone:
            await conn.exchange([(ROLLBACK, ())])
        refusal = error
        if _is_check_refusal(refusal) or isinstance(
            refusal, psycopg.errors.UniqueViolation | psycopg.errors.ProgramLimitExceeded
        ):
            refused: list[outcome.Outcome[_Recorded]] = await conn.run(
                lambda raw, call: _refused(raw, call, plans, refusal, checked=False)
            )
            return refused
        raise
    positions = [_position(result) for result in results[first_insert : first_insert + len(events)]]
    return _with_recorded([outcome.Value(None) for _ in plans], plans, positions, recorded_at)


def _position(result: PGresult) -> int:
    value = result.get_value(0, 0) if result.ntuples else None
    if value is None:  # pragma: no cover - INSERT ... RETURNING returns its row
        raise EventStoreError("PostgreSQL returned no position for an inserted event")
    return int(value)


_LOCK: Final = Query.of("SELECT pg_advisory_xact_lock(%s::bigint)")
#: The prepared form of each statement the wire commit sends.
_wire_query: Final = functools.cache(Query.of)


def _refuse_if_closed_while_idle(raw: Connection) -> None:
    """Close ``raw`` and raise ``OperationalError`` if the server spoke while it was idle.

    An idle session's server says nothing unasked, except goodbye: a terminated backend
    (a restart, ``pg_terminate_backend``, an idle timeout) sends a FATAL message and
    closes the socket. A commit's first bytes already carry its COMMIT, so a failure
    found only once it is sent could not be told from a lost COMMIT: the store would
    have to look it up and fail it. Noticed here (a poll of the socket, no round trip),
    nothing was sent and the pool retries the call on another connection. A goodbye
    still in flight is not seen, and takes the lookup path: safe, only slower.

    Raises:
        psycopg.OperationalError: the socket had something to read (or was hung up).
    """
    if raw.closed:
        return  # the pipeline raises the usual error
    fd = raw.fileno()
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        spoke = bool(poller.poll(0))
    else:  # pragma: no cover - Windows
        spoke = bool(select.select([fd], [], [], 0)[0])
    if spoke:
        close_quietly(raw)
        raise psycopg.OperationalError(
            "the server closed the idle connection (or sent something unasked); "
            "retrying on another one"
        )


#: :func:`_insert_after_statement` per events table (built once).
_insert_after: Final = functools.cache(_insert_after_statement)
_insert_after_and_notify: Final = functools.cache(_insert_after_and_notify_statement)
_commit_alone: Final = functools.cache(_commit_alone_statement)


def _check_plans(
    raw: Connection, pipeline: psycopg.Pipeline, plans: list[_Commit]
) -> tuple[list[outcome.Outcome[None]], list[_Commit]]:
    """Each plan's outcome after checking its expected sequences; and the plans that passed.

    One round trip (the pipeline is synced). A plan expecting what a plan before it in
    the batch will write is checked against that.

    Raises:
        ConcurrencyConflict: a lone plan's sequence is not the stored one.
    """
    statements, aggregate_type = plans[0].statements, plans[0].aggregate_type
    aggregate_ids = list(dict.fromkeys(a for plan in plans for a in plan.expected))
    stored: dict[str, int] = {}
    if aggregate_ids:
        # Checking before the commit lock keeps the serialized section short; a writer
        # that slips in between is caught by the inserts' own check and the unique key.
        # A cursor each, not executemany(returning=True), which would wait for the
        # rows with a flush request before the sync: a round trip more.
        with contextlib.ExitStack() as cursors:
            checks = [cursors.enter_context(raw.cursor()) for _ in aggregate_ids]
            for check, aggregate_id in zip(checks, aggregate_ids, strict=True):
                check.execute(statements.max_sequence, (aggregate_type, aggregate_id))
            pipeline.sync()
            for check, aggregate_id in zip(checks, aggregate_ids, strict=True):
                row = check.fetchone()
                stored[aggregate_id] = 0 if row is None or row[0] is None else int(row[0])
    results: list[outcome.Outcome[None]] = []
    accepted: list[_Commit] = []
    for plan in plans:
        conflict = find_conflict(plan.expected, stored.__getitem__)
        if conflict is not None:
            if len(plans) == 1:
                raise conflict
            results.append(outcome.Error(conflict))
            continue
        accepted.append(plan)
        results.append(outcome.Value(None))
        for event in plan.events:
            stored[event.aggregate_id] = event.sequence
    return results, accepted


def _returned_position(cursor: psycopg.Cursor[tuple[Any, ...]]) -> int:
    row = cursor.fetchone()
    if row is None:  # pragma: no cover - INSERT ... RETURNING returns its row
        raise EventStoreError("PostgreSQL returned no position for an inserted event")
    return int(row[0])


def _with_recorded(
    results: list[outcome.Outcome[None]],
    accepted: list[_Commit],
    positions: list[int],
    recorded_at: datetime.datetime,
) -> list[outcome.Outcome[_Recorded]]:
    """The committed plans' outcomes with their events' places (positions in plan order)."""
    places = iter(positions)
    plans = iter(accepted)
    answers: list[outcome.Outcome[_Recorded]] = []
    for result in results:
        if isinstance(result, outcome.Error):
            answers.append(result)
            continue
        plan = next(plans)
        answers.append(
            outcome.Value({row.event_id: (next(places), recorded_at) for row in plan.events})
        )
    return answers


def _select_recorded(
    raw: Connection, statements: Statements, event_ids: Sequence[uuid.UUID]
) -> _Recorded:
    """Where the stored events among ``event_ids`` are, read back by id."""
    recorded: _Recorded = {}
    for start in range(0, len(event_ids), _RECORDED_CHUNK):
        chunk = event_ids[start : start + _RECORDED_CHUNK]
        rows = raw.execute(statements.select_recorded("%s", len(chunk)), chunk).fetchall()
        for event_id, position, recorded_at in rows:
            recorded[event_id] = (int(position), parse_utc(recorded_at))
    return recorded


def _rolled_back(error: Exception) -> bool:
    """Whether ``error`` proves that the server rolled the transaction back.

    A statement's ERROR aborts the transaction, and in a pipeline the server skips what
    follows up to the sync, COMMIT included (or it is the COMMIT's own failure). A FATAL
    or PANIC ends the session, possibly right after a successful COMMIT; an error without
    a SQLSTATE (a lost connection) comes from the client and tells nothing.
    """
    if not isinstance(error, psycopg.Error) or error.sqlstate is None:
        return False
    severity = error.diag.severity_nonlocalized or error.diag.severity
    return severity == "ERROR"


def _is_event_id_violation(error: psycopg.Error, statements: Statements) -> bool:
    constraint = error.diag.constraint_name
    return constraint is not None and constraint.lower() == statements.event_id_index.lower()


def _refused(
    raw: Connection, call: Call, plans: list[_Commit], error: psycopg.Error, *, checked: bool
) -> list[outcome.Outcome[_Recorded]]:
    """The outcomes after PostgreSQL refused a row of ``plans`` (all rolled back).

    ``checked`` tells whether the plans' sequences were checked before the writes.
    """
    if len(plans) > 1:
        raw.rollback()
        if not checked and _is_sequence_refusal(error, plans[0].statements):
            # Some plan is stale or ahead: checking first finds which, and the others
            # still commit together, in one transaction.
            return _commit(raw, call, plans, check_first=True)
        return _commit_each(raw, call, plans)
    plan = plans[0]
    if _is_check_refusal(error):
        raise _conflict(raw, plan) from error
    if isinstance(error, psycopg.errors.UniqueViolation):
        if _is_event_id_violation(error, plan.statements):
            # Event ids are given once, when an event is staged: these events are
            # stored already, so this plan committed before. Never a conflict.
            raw.rollback()
            event_ids = [row.event_id for row in plan.events]
            return [outcome.Value(_select_recorded(raw, plan.statements, event_ids))]
        # Only a writer that skips the commit lock (another program) and commits while
        # our insert waits for its row gets here: a lost race on a sequence.
        raise _conflict(raw, plan) from error
    raise _too_long(plan, error) from error


def _commit_each(
    raw: Connection, call: Call, plans: list[_Commit]
) -> list[outcome.Outcome[_Recorded]]:
    """Commit each plan of a refused batch on its own; each failure is that plan's outcome.

    Once one plan has committed, nothing here may raise: the pool would send the whole
    batch again. A broken connection fails the plans not tried yet (nothing of them was
    sent), and a plan whose COMMIT was lost is ``_CommitOutcomeUnknown`` alone.
    """
    results: list[outcome.Outcome[_Recorded]] = []
    for index, plan in enumerate(plans):
        try:
            results.append(_commit(raw, call, [plan])[0])
        except _CommitOutcomeUnknown as unknown:
            results.append(outcome.Error(unknown))
            # The store will end this session before it looks the plan up: use it no more.
            close_quietly(raw)
        except (ConcurrencyConflict, EventStoreError, psycopg.Error) as error:
            results.append(outcome.Error(error))
            with contextlib.suppress(psycopg.Error):
                if not raw.closed and raw.info.transaction_status != TransactionStatus.IDLE:
                    raw.rollback()
        if raw.closed or raw.info.transaction_status != TransactionStatus.IDLE:
            results.extend(
                outcome.Error(
                    TransactionFailed(
                        "the connection to PostgreSQL broke before this transaction was "
                        "sent; nothing was written, retry it"
                    )
                )
                for _ in plans[index + 1 :]
            )
            break
    return results


def _too_long(plan: _Commit, error: psycopg.Error) -> EventStoreError:
    """Name the id that most likely overflowed the unique index (the longest one)."""
    ids = [*plan.expected, *(row.aggregate_id for row in plan.snapshots)]
    longest = max(ids, key=lambda aggregate_id: len(aggregate_id.encode("utf-8")))
    return EventStoreError(
        f"aggregate_id {longest!r:.80} ({len(longest.encode('utf-8'))} bytes) is too long for "
        f"PostgreSQL's unique index ({first_line(error)}): index keys must compress to about "
        "2.7 kB; use a shorter id, e.g. a hash of this one",
        aggregate_id=longest[:80],
    )


def _conflict(raw: Connection, plan: _Commit) -> Exception:
    raw.rollback()
    with raw.cursor() as cursor:
        conflict = find_conflict(
            plan.expected,
            lambda aggregate_id: max_sequence(
                cursor, plan.statements, plan.aggregate_type, aggregate_id
            ),
        )
    if conflict is not None:
        return conflict
    return EventStoreError("an event row broke the unique key of the events table")


def _end_session(raw: Connection, backend: Backend) -> bool:
    """End the session ``backend`` if it still runs; whether it is now known to be gone.

    A session whose connection the client lost may live on in the server for a while
    (until it notices), and could still commit. Terminating it and waiting for it to
    exit freezes the outcome of whatever it was doing.
    """
    pid, started = backend
    try:
        row = raw.execute(
            "SELECT pg_terminate_backend(pid, %s::bigint) FROM pg_stat_activity "
            "WHERE pid = %s::integer AND backend_start = %s",
            (_RESOLVE_WAIT_MS, pid, started),
        ).fetchone()
    except (psycopg.ProgrammingError, psycopg.errors.InsufficientPrivilege) as error:
        # PostgreSQL before 14 (no timeout argument), or not allowed: the lookup can
        # still prove a commit, but not the absence of one.
        logger.warning("could not end the PostgreSQL session %d: %s", pid, first_line(error))
        return False
    return row is None or bool(row[0])


def _find_commit(
    raw: Connection,
    call: Call,
    statements: Statements,
    lock_key: int,
    event_ids: list[uuid.UUID],
    backend: Backend | None,
) -> tuple[bool | None, _Recorded]:
    """Whether the commit that holds ``event_ids`` landed (True, False, or None: unknown),
    and if it did, where its events were stored.

    Runs on a fresh connection after the one that sent the COMMIT was lost. The ids
    are of one database transaction: the first one tells.
    """
    gone = backend is not None and _end_session(raw, backend)
    call.checkpoint()
    with raw.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute(f"SET LOCAL lock_timeout = {_RESOLVE_WAIT_MS}")
        # The lock every commit holds to its COMMIT: a commit still in flight (its
        # session alive, or ending) is done, one way or the other, once we hold it.
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
        found = cursor.execute(statements.find_event_id, (event_ids[0],)).fetchone() is not None
        cursor.execute("COMMIT")
    if found:
        call.checkpoint()
        return True, _select_recorded(raw, statements, event_ids)
    return (False if gone else None), {}


def _table_columns(cursor: psycopg.Cursor[tuple[Any, ...]], table: str) -> list[str]:
    # to_regclass resolves the name through search_path, as the store's statements do.
    rows = cursor.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
        "AND attnum > 0 AND NOT attisdropped",
        (table,),
    ).fetchall()
    return [str(row[0]) for row in rows]


def _setup(
    raw: Connection, statements: Statements, events: str, snapshots: str, server: str
) -> None:
    """Create the tables if needed, check that they are trio_es tables, migrate version 1."""
    where = f"at {server}"
    with raw.cursor() as cursor:
        row = cursor.execute("SHOW server_encoding").fetchone()
        encoding = "" if row is None else str(row[0])
        if encoding.upper().replace("-", "") != "UTF8":
            raise EventStoreError(
                f"the PostgreSQL database at {server} uses encoding {encoding!r}, which cannot "
                "hold all Unicode text; create the database with ENCODING 'UTF8'"
            )
        cursor.execute("BEGIN")
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_SETUP_LOCK_KEY,))
        cursor.execute(statements.create_schema_version)
        row = cursor.execute(statements.select_schema_version, (events,)).fetchone()
        version = None if row is None else row[0]
        check_version_to_open(events, version, where)
        migrate = check_existing_tables(
            events,
            _table_columns(cursor, events),
            snapshots,
            _table_columns(cursor, snapshots),
            where,
        )
        if migrate:
            logger.info("migrating table %r %s to schema version %d", events, where, SCHEMA_VERSION)
            # A volatile default is evaluated per row: every stored event gets its own
            # id, in the one rewrite of the table this costs. Later rows carry their own.
            cursor.execute(
                f"ALTER TABLE {events} ADD COLUMN event_id UUID NOT NULL DEFAULT gen_random_uuid()"
            )
            cursor.execute(f"ALTER TABLE {events} ALTER COLUMN event_id DROP DEFAULT")
        for ddl in statements.create:
            cursor.execute(ddl)
        cursor.execute(statements.insert_schema_version, (events, snapshots, SCHEMA_VERSION))
        if version is not None and version < SCHEMA_VERSION:
            cursor.execute(statements.update_schema_version, (SCHEMA_VERSION, events))
        row = cursor.execute(statements.select_schema_version, (events,)).fetchone()
        check_schema_version(events, None if row is None else row[0], where)
        cursor.execute("COMMIT")


def _check_pool_size(value: object) -> int:
    return check_int("pool_size", value, minimum=1, hint="4 suits most uses")


@final
@attrs.define(eq=False)
class PostgresTransaction(SqlTransaction[EventT, EntityT]):
    """A transaction of a :class:`PostgresStore`: buffered writes, applied when the block exits.

    Only meaningful inside its ``async with store.transaction()`` block.
    """


@final
@attrs.define(eq=False)
class PostgresStore(SqlStoreShell[PostgresTransaction[EventT, EntityT], EventT, EntityT]):
    """An event store in a PostgreSQL database; open it with :meth:`PostgresStore.open`.

    Any number of stores, in any number of processes and machines, may use the same
    tables: a commit checks, in the same database transaction as its write, that each
    aggregate's stored sequence is still the one its events were decided on, and the
    unique key ``(aggregate_type, aggregate_id, sequence)`` backs that check, so two
    writers that decided on the same sequence never both succeed. The loser gets
    ``ConcurrencyConflict`` (the runtime reloads and retries the command).

    Attributes:
        aggregate_type: the value of the ``aggregate_type`` column for this store's rows;
            stores with different types share tables without seeing each other's data.
        transcoder: encodes and decodes events, snapshot entities and metadata.
        server: ``host:port/dbname`` of the database (no credentials), for messages.
        pool_size: the most connections the store opens at once (watches and projection
            leases have a connection each, besides these).
        poll_interval: the longest a :meth:`watch` waits without a wake-up (seconds).
        takeover_interval: how often a standby projection instance tries to take the
            lease over (seconds).
    """

    aggregate_type: str
    transcoder: Transcoder
    server: str
    pool_size: int
    _statements: Statements
    _pool: Pool = attrs.field(repr=False)
    _lock_key: int
    poll_interval: float = attrs.field(default=1.0, kw_only=True)
    takeover_interval: float = attrs.field(default=1.0, kw_only=True)
    #: The LISTEN/NOTIFY channel on which commits to the events table are announced.
    _channel: str = attrs.field(init=False, repr=False)
    #: The statement that announces a commit on it.
    _notify: str = attrs.field(init=False, repr=False)
    #: The last position committed through this store object: wakes its watches at once.
    _head: AsyncValue[int] = attrs.field(init=False, repr=False)
    #: Batches the commits of concurrent transactions (see ``_group_commit.py``).
    _group_commit: GroupCommit[_Commit] = attrs.field(init=False, repr=False)
    _reads: SqlReads[EventT, EntityT] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._channel = notify_channel(self._statements.events_table_key)
        self._notify = _notify_statement(self._statements.events_table_key)
        self._head = async_value(0)
        self._group_commit = GroupCommit(self._commit_batch)
        self._reads = SqlReads(self._statements, self.transcoder, self.aggregate_type, self._fetch)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        dsn: str,
        *,
        transcoder: Transcoder,
        aggregate_type: str = "default",
        events_table: str = "events",
        snapshots_table: str = "snapshots",
        pool_size: int = 4,
        poll_interval: float = 1.0,
        takeover_interval: float = 1.0,
    ) -> AsyncIterator[PostgresStore[Any, Any]]:
        """Open the store in the database ``dsn`` names; close it when the block exits.

        The tables and the schema-version row are created on first open, idempotently,
        even when several processes open a new database at once (they take turns under
        an advisory lock).

        Args:
            dsn: a libpq connection string or URI, e.g.
                ``"postgresql://app@db.example.com:5432/app"``. The database must use
                the UTF8 encoding.
            transcoder: with every event class (and, for snapshots, the entity class)
                registered.
            aggregate_type: the ``aggregate_type`` column value of this store's rows.
            events_table: the events table name (a plain identifier; PostgreSQL folds
                it to lower case).
            snapshots_table: the snapshots table name (a plain identifier).
            pool_size: the most connections open at once. Each concurrent read or
                commit uses one for the duration of its single thread call; callers
                beyond that wait (cancellably) for a free one.
            poll_interval: seconds after which a :meth:`watch` wakes its subscriber
                even without a notification: a fallback, since every commit is
                announced with ``NOTIFY``.
            takeover_interval: seconds between a standby projection instance's attempts
                to take the lease (see :meth:`projection_lease`).

        Raises:
            ValueError, TypeError: an argument is invalid (nothing was opened).
            EventStoreError: the server cannot be reached, the database is not UTF8, or
                the tables belong to another layout.
        """
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a libpq connection string (got {dsn!r:.80})")
        if not isinstance(transcoder, Transcoder):
            raise TypeError(f"transcoder must be a Transcoder (got {transcoder!r:.80})")
        # cattrs' code generation now, not in the first command or load.
        transcoder.prepare()
        aggregate_type = check_aggregate_type(aggregate_type)
        if "\x00" in aggregate_type or len(aggregate_type.encode("utf-8", "surrogatepass")) > (
            MAX_AGGREGATE_TYPE_BYTES
        ):
            raise ValueError(
                f"aggregate_type must be at most {MAX_AGGREGATE_TYPE_BYTES} UTF-8 bytes "
                f"without NUL characters (got {aggregate_type!r:.80}); choose a short name"
            )
        check_text(aggregate_type, "aggregate_type")
        statements = Statements.build(
            _DIALECT, events_table=events_table, snapshots_table=snapshots_table
        )
        pool_size = _check_pool_size(pool_size)
        poll_interval = check_seconds("poll_interval", poll_interval, hint="1.0 suits most uses")
        takeover_interval = check_seconds(
            "takeover_interval", takeover_interval, hint="1.0 suits most uses"
        )
        try:
            psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as error:
            raise ValueError(
                f"dsn is not a valid libpq connection string ({first_line(error)}); use e.g. "
                "'postgresql://user@host:5432/dbname'"
            ) from None
        server = describe_server(dsn)
        pool = Pool(dsn, pool_size)
        store: PostgresStore[Any, Any] = cls(
            aggregate_type,
            transcoder,
            server,
            pool_size,
            statements,
            pool,
            _commit_lock_key(events_table),
            poll_interval=poll_interval,
            takeover_interval=takeover_interval,
        )
        try:
            events, snapshots = events_table.lower(), snapshots_table.lower()
            try:
                await pool.run(lambda raw, _: _setup(raw, statements, events, snapshots, server))
            except TransactionFailed as error:
                raise EventStoreError(f"cannot open the store: {error.reason}") from error
            except psycopg.Error as error:
                raise translate_error(error, doing="creating the tables", server=server) from error
            yield store
        finally:
            with trio.move_on_after(CLEANUP_SECONDS, shield=True):
                await pool.aclose()

    async def _use(self, use: Callable[[PooledConnection], Awaitable[T]], doing: str) -> T:
        try:
            return await self._pool.use(use)
        except psycopg.Error as error:
            raise translate_error(error, doing=doing, server=self.server) from error

    async def _fetch(
        self, sql: str, parameters: Sequence[object], doing: str
    ) -> Sequence[Sequence[Any]]:
        """The rows of one read statement, run from the Trio thread (see ``_postgres_wire``)."""
        query = _wire_query(sql)

        async def fetch(conn: PooledConnection) -> list[tuple[Any, ...]]:
            [result] = await conn.exchange([(query, parameters)])
            return conn.rows(result)

        return await self._use(fetch, doing)

    def _check_id(self, value: object, what: str) -> str:
        return _check_key(value, what)

    def _refuse(
        self,
        aggregate_id: str,
        metadata: Metadata,
        events: Sequence[EventRow],
        snapshots: Sequence[SnapshotRow],
    ) -> None:
        _check_metadata(metadata, aggregate_id)
        _check_rows(events, snapshots)

    def transaction(self) -> AbstractAsyncContextManager[PostgresTransaction[EventT, EntityT]]:
        """Open a transaction; its writes are committed together when the block exits.

        Leaving the block with an exception writes nothing; a block that only read
        costs no database call on exit. Reads inside the block see the latest committed
        data plus the transaction's own writes.

        When the block exits normally and the call returns, the writes are committed,
        also when the connection was lost after COMMIT and the store found out on a new
        connection that the commit had landed.

        Raises on exit:
            ConcurrencyConflict: another writer appended to one of the aggregates first;
                nothing of this transaction was written.
            TransactionFailed: a retryable failure (lost connection before COMMIT, or
                after it when the store made sure that nothing was committed;
                serialization failure, deadlock, cancelled statement); nothing written.
            CommitOutcomeUnknown: the connection was lost after COMMIT was sent and the
                store could not find out whether it landed (server unreachable for
                ``_RESOLVE_SECONDS``); it may or may not be stored. Never retried.
            EventStoreError: PostgreSQL refused the data or failed; nothing was written.
        """
        tx: PostgresTransaction[EventT, EntityT] = PostgresTransaction(self, self._pending())
        return TransactionBlock(tx, lambda pending: self._commit_writes(tx, pending))

    async def _commit_writes(
        self, tx: PostgresTransaction[EventT, EntityT], pending: PendingWrites[Any, Any]
    ) -> None:
        snapshots = pending.snapshot_rows()
        plan = _Commit(
            self._statements,
            self.aggregate_type,
            self._lock_key,
            pending.expected,
            pending.event_rows,
            snapshots,
            self._channel,
            self._notify,
        )
        recorded: _Recorded = await self._group_commit.commit(plan)
        tx.recorded = recorded

    async def _commit_batch(self, plans: list[_Commit]) -> list[outcome.Outcome[_Recorded]]:
        try:
            results = await self._use(
                lambda conn: _commit_wire(conn, plans), "committing a transaction"
            )
        except _CommitOutcomeUnknown as unknown:
            results = await self._resolve(unknown)
        else:
            # A split batch (see _commit_each) reports a lost COMMIT per plan.
            resolved: list[outcome.Outcome[_Recorded]] = []
            for result in results:
                if isinstance(result, outcome.Error) and isinstance(
                    result.error, _CommitOutcomeUnknown
                ):
                    resolved.extend(await self._resolve(result.error))
                else:
                    resolved.append(result)
            results = resolved
        # Wake this store's watchers now; other processes' hear the NOTIFY.
        last = max(
            (
                position
                for result in results
                if isinstance(result, outcome.Value)
                for position, _ in result.value.values()
            ),
            default=0,
        )
        raise_head(self._head, last)
        return translate_outcomes(
            results,
            psycopg.Error,
            lambda error: translate_error(error, doing="committing", server=self.server),
        )

    async def _resolve(self, unknown: _CommitOutcomeUnknown) -> list[outcome.Outcome[_Recorded]]:
        """The outcomes of ``unknown.plans``, one database transaction whose COMMIT was lost.

        Never sends the plans again. Looks one event id of theirs up on a fresh
        connection (one suffices: they were one transaction): found means committed,
        and where its events are is read back by id; absent means not (the old session
        is made to end first, so that it cannot commit later), and no answer means
        ``CommitOutcomeUnknown``.
        """
        accepted = [
            plan
            for plan, result in zip(unknown.plans, unknown.results, strict=True)
            if isinstance(result, outcome.Value)
        ]
        event_ids = [row.event_id for plan in accepted for row in plan.events]
        landed: bool | None
        recorded: _Recorded = {}
        if event_ids:
            landed, recorded = await self._find_commit(event_ids, unknown.backend)
        else:
            # Nothing here can be stored twice: without snapshots the transaction wrote
            # nothing either way; a snapshot may or may not have been replaced.
            landed = None if any(plan.snapshots for plan in accepted) else False
        answers: list[outcome.Outcome[_Recorded]] = []
        for plan, result in zip(unknown.plans, unknown.results, strict=True):
            if isinstance(result, outcome.Error):
                answers.append(outcome.Error(result.error))  # refused: its own error
            elif landed:
                answers.append(
                    outcome.Value({row.event_id: recorded[row.event_id] for row in plan.events})
                )
            else:
                answers.append(outcome.Error(self._unresolved(plan, unknown.reason, landed)))
        return answers

    def _unresolved(self, plan: _Commit, reason: str, landed: bool | None) -> Exception:
        aggregates = list(plan.expected) or [row.aggregate_id for row in plan.snapshots]
        lost = f"lost the connection to PostgreSQL at {self.server} while committing ({reason})"
        if landed is None:
            return CommitOutcomeUnknown(
                f"{lost} and could not find out on a new connection whether the commit "
                f"landed (aggregates {', '.join(repr(a[:80]) for a in aggregates)})",
                aggregate_id=aggregates[0][:80] if aggregates else None,
            )
        return TransactionFailed(
            f"{lost}; a new connection showed that nothing was committed, retry it",
            aggregate_id=aggregates[0][:80] if aggregates else None,
        )

    async def _find_commit(
        self, event_ids: list[uuid.UUID], backend: Backend | None
    ) -> tuple[bool | None, _Recorded]:
        """Whether the commit holding ``event_ids`` landed (and where they are), asking
        until ``_RESOLVE_SECONDS``."""
        with trio.move_on_after(_RESOLVE_SECONDS):
            while True:
                try:
                    return await self._pool.run(
                        lambda raw, call: _find_commit(
                            raw, call, self._statements, self._lock_key, event_ids, backend
                        )
                    )
                except EventStoreError as error:  # the store was closed meanwhile
                    logger.warning("cannot look a lost commit up: %s", error)
                    return None, {}
                except (TransactionFailed, psycopg.Error) as error:
                    # A lookup changes nothing: asking again, on a new connection, is safe.
                    logger.info("looking a lost commit up failed, retrying: %s", error)
                await trio.sleep(_RESOLVE_RETRY_SECONDS)
        logger.warning(
            "could not find out within %s s whether a commit to %s landed",
            _RESOLVE_SECONDS,
            self.server,
        )
        return None, {}

    async def checkpoint_position(self, name: str) -> int:
        """Projection ``name``'s stored checkpoint (0 when it never ran), read without its lease.

        Read on a pooled connection: what a standby instance, or another process's
        statistics, follow.

        Raises:
            TypeError, ValueError: ``name`` is not a non-empty str PostgreSQL can hold.
            EventStoreError: PostgreSQL failed.
            TransactionFailed: the connection was lost.
        """
        name = check_projection_name(name)
        key = (self._statements.events_table_key, self.aggregate_type, name)
        rows = await self._fetch(
            self._statements.select_checkpoint,
            key,
            f"reading the checkpoint of projection {name[:80]!r}",
        )
        return int(rows[0][0]) if rows else 0

    def watch(self) -> AbstractAsyncContextManager[PostgresWatch]:
        """Wake-ups for one subscriber while the block runs (see :class:`~trio_es._store.Watch`).

        The watch has a connection of its own that LISTENs to the commits of the events
        table (every commit announces itself with ``NOTIFY``), in place before the block
        starts. ``await watch.wait(after)`` returns as soon as this store object
        committed beyond ``after`` or a commit beyond it is announced, and after
        ``poll_interval`` seconds at the latest. A lost LISTEN connection is made again
        with back-off (polling meanwhile), and the next wait then returns at once so
        that the subscriber reads what nobody announced.

        Raises:
            EventStoreError: the store is closed.
        """
        if self._pool.closed:
            raise EventStoreError("the PostgreSQL store is closed; open it again to use it")
        return open_watch(self._pool.conninfo, self._channel, self._head, self.poll_interval)

    def projection_lease(self, name: str) -> AbstractAsyncContextManager[PostgresLease]:
        """Wait until this is the one active instance of projection ``name``; hold it.

        The lease is a session advisory lock held by a connection of its own (keyed by
        events table, aggregate type and ``name``), so one instance holds it across
        every process and machine; a standby tries again every ``takeover_interval``
        seconds and takes over once the holder's block exited or its process died. The
        checkpoint is read and moved on that same connection: if it is lost, every later
        call on the lease raises ``EventStoreError`` and the projection must take the
        lease again. Exiting the block closes the connection, releasing the lock.

        Raises:
            TypeError, ValueError: ``name`` is not a non-empty str PostgreSQL can hold.
            EventStoreError: the store is closed.
        """
        name = check_projection_name(name)
        if self._pool.closed:
            raise EventStoreError("the PostgreSQL store is closed; open it again to use it")
        return hold_lease(
            self._pool.conninfo,
            self._statements,
            self.aggregate_type,
            name,
            takeover_interval=self.takeover_interval,
            server=self.server,
        )
