"""The Trio side of a SQL store: buffered writes, reads, and the shell both stores share.

``_sql.py`` says what is stored (tables, statements, rows); this module says how a
store's transaction and reads use it, the same way for SQLite and PostgreSQL:

* :class:`PendingWrites` buffers a transaction's writes, encoded when staged, so that
  a write the database cannot hold is refused by the call that made it;
* :class:`TransactionBlock` commits them when the ``async with`` block exits;
* :class:`SqlReads` reads, merging what the transaction buffered;
* :class:`SqlStoreShell` is the ``EventStore`` methods written once, over those, with
  small hooks per database: :meth:`SqlStoreShell._check_id` (what an id must be) and
  :meth:`SqlStoreShell._refuse` (what encoded rows the database cannot hold). Each
  store adds its own ``transaction()``, commit and error translation.
"""

from __future__ import annotations

import datetime
import types
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar, final

import attrs
import outcome

from ._errors import ConcurrencyConflict, EventStoreError
from ._event_id import new_event_id
from ._serialization import Transcoder
from ._sql import (
    EventRow,
    Queryable,
    SnapshotRow,
    Statements,
    check_events,
    check_read_all,
    check_text,
    decode_event_row,
    decode_snapshot_row,
    parse_utc,
    utc_text,
)
from ._types import Aggregate, Metadata, SerializedEventEnvelope, Snapshot, StoredEvent

__all__ = [
    "FetchRows",
    "PendingWrites",
    "Refuse",
    "RunRead",
    "SqlReads",
    "SqlStoreShell",
    "SqlTransaction",
    "TransactionBlock",
    "pending_writes",
    "translate_outcomes",
]

EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")
T = TypeVar("T")
TxT = TypeVar("TxT", bound="SqlTransaction[Any, Any]")
ErrorT = TypeVar("ErrorT", bound=Exception)


class Refuse(Protocol):
    """A store's check of encoded writes: raise ``EventStoreError`` for what it cannot hold.

    Called with the aggregate, the call's metadata and its new event rows (or snapshot
    row) before anything of the call is staged.
    """

    def __call__(
        self,
        aggregate_id: str,
        metadata: Metadata,
        events: Sequence[EventRow],
        snapshots: Sequence[SnapshotRow],
        /,
    ) -> None: ...


@final
@attrs.define(eq=False)
class PendingWrites(Generic[EventT, EntityT]):
    """The writes a SQL store transaction buffers until it commits, already encoded.

    Encoding happens when a write is staged, so a serialization error surfaces from
    ``commit_events`` or ``save_snapshot`` before anything reaches the database. At
    commit the store checks, for every aggregate in :attr:`expected`, that its stored
    ``MAX(sequence)`` (0 without events) still equals the expected value, then inserts
    :attr:`event_rows` in order and upserts :attr:`snapshot_rows`, all in one database
    transaction.
    """

    transcoder: Transcoder
    aggregate_type: str
    #: The store's check of what its database cannot hold (see :class:`SqlStoreShell`),
    #: run on each call's encoded rows before anything of the call is staged.
    refuse: Refuse | None = None
    #: The stored sequence each aggregate must still have at commit, per aggregate.
    expected: dict[str, int] = attrs.Factory(dict)
    #: Every staged event, in staging order (which becomes commit order).
    event_rows: list[EventRow] = attrs.Factory(list)
    #: The staged envelopes per aggregate, for reads inside the transaction.
    envelopes: dict[str, list[SerializedEventEnvelope[EventT]]] = attrs.Factory(dict)
    #: The staged snapshot per aggregate: its row, and the snapshot for reads.
    snapshots: dict[str, tuple[SnapshotRow, Snapshot[EntityT]]] = attrs.Factory(dict)

    @property
    def has_writes(self) -> bool:
        """Whether committing needs the database (a zero-event commit still checks)."""
        return bool(self.expected or self.snapshots)

    def stage_events(
        self, aggregate: Aggregate[EntityT], events: Iterable[EventT], metadata: Metadata
    ) -> tuple[list[SerializedEventEnvelope[EventT]], int]:
        """Encode and buffer ``events`` after ``aggregate.sequence``, each with a new id.

        ``events`` may be any iterable (see :func:`check_events`); it is read once. A
        refused call leaves the transaction as it was, so the caller may go on with it.

        Raises:
            TypeError: ``events`` is not an iterable of events; nothing staged.
            ConcurrencyConflict: this transaction already staged events for the aggregate
                and ``aggregate.sequence`` does not continue them.
            EventStoreError: an event or the metadata cannot be encoded; nothing staged.
        """
        events = check_events(events)
        aggregate_id = check_text(aggregate.aggregate_id, "aggregate_id")
        if not aggregate_id:
            raise EventStoreError("aggregate_id must be a non-empty str (got '')")
        base = aggregate.sequence
        if isinstance(base, bool) or not isinstance(base, int) or base < 0:
            raise EventStoreError(
                f"aggregate.sequence must be an int >= 0 (got {base!r})", aggregate_id=aggregate_id
            )
        staged = self.envelopes.get(aggregate_id)
        if staged is not None:
            current = self.expected[aggregate_id] + len(staged)
            if current != base:
                raise ConcurrencyConflict(
                    aggregate_id=aggregate_id, expected_sequence=base, actual_sequence=current
                )
        transcoder = self.transcoder
        metadata_text = transcoder.encode_metadata(metadata)
        rows: list[EventRow] = []
        envelopes: list[SerializedEventEnvelope[EventT]] = []
        for sequence, event in enumerate(events, start=base + 1):
            encoded = transcoder.encode_event(event, aggregate_id=aggregate_id, sequence=sequence)
            rows.append(
                EventRow(
                    aggregate_id,
                    sequence,
                    encoded.event_type,
                    encoded.event_version,
                    encoded.payload,
                    metadata_text,
                    new_event_id(),
                )
            )
            envelopes.append(
                SerializedEventEnvelope(
                    aggregate_id,
                    sequence,
                    event,
                    metadata,
                    encoded.event_type,
                    encoded.event_version,
                    self.aggregate_type,
                    event_id=rows[-1].event_id,
                )
            )
        if self.refuse is not None:
            self.refuse(aggregate_id, metadata, rows, ())
        # Only now, with everything encoded and checked, does the transaction change.
        if staged is None:
            self.expected[aggregate_id] = base
            self.envelopes[aggregate_id] = list(envelopes)
        else:
            staged.extend(envelopes)
        self.event_rows.extend(rows)
        return envelopes, base + len(envelopes)

    def stage_snapshot(self, snapshot: Snapshot[EntityT]) -> None:
        """Encode and buffer ``snapshot``, replacing one staged earlier for its aggregate.

        Raises:
            EventStoreError: the entity cannot be encoded, the timestamp is naive, or the
                database cannot hold the snapshot; nothing staged.
        """
        aggregate_id = check_text(snapshot.aggregate_id, "aggregate_id")
        encoded = self.transcoder.encode_entity(snapshot.entity, aggregate_id=aggregate_id)
        timestamp = parse_utc(utc_text(snapshot.timestamp))
        row = SnapshotRow(
            aggregate_id,
            snapshot.sequence,
            encoded.entity_type,
            encoded.entity_version,
            encoded.payload,
            timestamp,
        )
        if self.refuse is not None:
            self.refuse(aggregate_id, (), (), (row,))
        self.snapshots[aggregate_id] = (row, snapshot)

    def merge_events(
        self,
        aggregate_id: str,
        start_from: int,
        stored: list[SerializedEventEnvelope[EventT]],
    ) -> list[SerializedEventEnvelope[EventT]]:
        """The transaction's view: ``stored`` events, then its own staged ones.

        Stored events beyond the expected sequence (another writer's, which will make
        this transaction fail) are left out so the view stays contiguous.
        """
        staged = self.envelopes.get(aggregate_id)
        if not staged:
            return stored
        base = self.expected[aggregate_id]
        return [e for e in stored if e.sequence <= base] + [
            e for e in staged if e.sequence > start_from
        ]

    def needs_stored_events(self, aggregate_id: str, start_from: int) -> bool:
        """Whether a read of the aggregate after ``start_from`` must ask the database."""
        base = self.expected.get(aggregate_id)
        return base is None or start_from < base

    def snapshot(self, aggregate_id: str) -> Snapshot[EntityT] | None:
        """The snapshot this transaction staged for the aggregate, if any."""
        staged = self.snapshots.get(aggregate_id)
        return None if staged is None else staged[1]

    def snapshot_rows(self) -> list[SnapshotRow]:
        """The staged snapshots, one per aggregate."""
        return [row for row, _ in self.snapshots.values()]


@attrs.define(eq=False)
class SqlTransaction(Generic[EventT, EntityT]):
    """A SQL store's transaction handle: its store and the writes it buffers.

    The stores' public handle types subclass this and add nothing, so that each keeps
    its own name. Only meaningful inside its ``async with store.transaction()`` block.
    """

    _store: object
    _pending: PendingWrites[EventT, EntityT]
    _finished: bool = False
    #: Once the block committed: each committed event's id mapped to its
    #: ``(global_position, recorded_at)``, for :func:`trio_es._store.committed_envelopes`.
    recorded: dict[uuid.UUID, tuple[int, datetime.datetime]] = attrs.field(
        factory=dict, kw_only=True
    )


def pending_writes(
    tx: SqlTransaction[EventT, EntityT], store: object
) -> PendingWrites[EventT, EntityT]:
    """The writes ``tx`` buffers, once it is checked to be an open transaction of ``store``.

    Raises:
        EventStoreError: ``tx`` is not a handle ``store.transaction()`` yielded, or its
            block has already exited.
    """
    if not isinstance(tx, SqlTransaction) or tx._store is not store:
        raise EventStoreError(
            f"{tx!r:.80} is not a transaction of this store; pass the handle that "
            "this store's transaction() yielded"
        )
    if tx._finished:
        raise EventStoreError(
            "the transaction has already ended; use the handle only inside its async with block"
        )
    return tx._pending


@final
class TransactionBlock(Generic[TxT]):
    """``async with TransactionBlock(tx, commit)``: yields ``tx``; when the block exits
    without an exception, commits what it buffered.

    The handle is finished however the block exits, so a handle kept past its block
    is refused. A block that raised writes nothing, and one that buffered nothing costs
    no ``commit`` call (no database call at all). A class rather than a generator-based
    context manager: every command enters one.
    """

    __slots__ = ("_commit", "_tx")

    def __init__(
        self, tx: TxT, commit: Callable[[PendingWrites[Any, Any]], Awaitable[None]]
    ) -> None:
        self._tx = tx
        self._commit = commit

    async def __aenter__(self) -> TxT:
        return self._tx

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        tx = self._tx
        tx._finished = True
        if exc_type is None and tx._pending.has_writes:
            await self._commit(tx._pending)


def translate_outcomes(
    results: list[outcome.Outcome[T]],
    driver_error: type[ErrorT],
    translate: Callable[[ErrorT], Exception],
) -> list[outcome.Outcome[T]]:
    """``results`` of a batch commit, with each plan's driver error as a trio_es error.

    A plan's own failure (a refused row) comes back from the worker thread as the
    driver's exception; callers of ``transaction()`` only ever see trio_es errors.
    """
    return [
        outcome.Error(translate(result.error))
        if isinstance(result, outcome.Error) and isinstance(result.error, driver_error)
        else result
        for result in results
    ]


class RunRead(Protocol):
    """How a store runs ``fn(connection)`` in a worker thread on a connection that reads.

    The store supplies its own connection handling (cancellation included) and turns
    driver errors into trio_es errors, with ``doing`` (e.g. ``"loading events"``) in
    the message.
    """

    def __call__(self, fn: Callable[[Queryable], T], doing: str, /) -> Awaitable[T]: ...


class FetchRows(Protocol):
    """How a store runs one read statement from the Trio thread (no worker thread): its rows.

    Rows are what a DB-API cursor's ``fetchall`` gives for ``sql`` and ``parameters``;
    errors are turned into trio_es errors as by :class:`RunRead`.
    """

    def __call__(
        self, sql: str, parameters: Sequence[object], doing: str, /
    ) -> Awaitable[Sequence[Sequence[Any]]]: ...


@final
@attrs.frozen
class SqlReads(Generic[EventT, EntityT]):
    """The reads of a SQL store: each is one statement through :attr:`fetch`, except a
    cold load, which is one call through :attr:`run` where the store has it.

    Reads inside a transaction see the latest committed data merged with what the
    transaction buffered (see :class:`PendingWrites`). Ids are checked by the store
    before they get here, since what a database can hold differs. Frozen, so the worker
    thread may read its fields while the Trio thread goes on.
    """

    statements: Statements
    transcoder: Transcoder
    aggregate_type: str
    #: Runs one read statement (SQLite: on its reader thread; PostgreSQL: from the Trio
    #: thread, no thread at all).
    fetch: FetchRows
    #: Runs several statements in one worker-thread call, where a store has threads: a
    #: cold load then costs one hop, not two. Without it, they are fetched one by one.
    run: RunRead | None = None

    async def _rows(
        self, sql: str, parameters: Sequence[object], doing: str
    ) -> Sequence[Sequence[Any]]:
        """The rows of one read statement."""
        return await self.fetch(sql, parameters, doing)

    def _events(
        self, aggregate_id: str, rows: Sequence[Sequence[Any]]
    ) -> list[SerializedEventEnvelope[Any]]:
        return [
            decode_event_row(self.transcoder, self.aggregate_type, aggregate_id, row)
            for row in rows
        ]

    async def load_events(
        self, pending: PendingWrites[EventT, EntityT], aggregate_id: str, start_from: int
    ) -> list[SerializedEventEnvelope[EventT]]:
        """The aggregate's events with ``sequence > start_from``, stored then buffered.

        Raises:
            EventStoreError: a stored event cannot be decoded, or the database failed.
        """
        start_from = max(start_from, 0)
        if not pending.needs_stored_events(aggregate_id, start_from):
            return pending.merge_events(aggregate_id, start_from, [])

        rows = await self._rows(
            self.statements.select_events,
            (self.aggregate_type, aggregate_id, start_from),
            "loading events",
        )
        return pending.merge_events(aggregate_id, start_from, self._events(aggregate_id, rows))

    async def load_snapshot_and_events(
        self, pending: PendingWrites[EventT, EntityT], aggregate_id: str
    ) -> tuple[Snapshot[EntityT] | None, list[SerializedEventEnvelope[EventT]]]:
        """The latest snapshot (as :meth:`load_snapshot`) and the events after it.

        Both are read in one worker-thread call, where :meth:`load_snapshot` then
        :meth:`load_events` would take two: a cold load is mostly those hops. The events
        are read after the snapshot, so a commit in between is included, never skipped.

        Raises:
            EventStoreError: a stored snapshot or event cannot be decoded, or the
                database failed.
        """
        staged = pending.snapshot(aggregate_id)
        if staged is not None:
            return staged, await self.load_events(pending, aggregate_id, staged.sequence)
        if self.run is None:
            # No worker thread: two statements from the Trio thread, the events read
            # after the snapshot, as below.
            snapshot = await self.load_snapshot(pending, aggregate_id)
            start = 0 if snapshot is None else snapshot.sequence
            return snapshot, await self.load_events(pending, aggregate_id, start)

        def read(
            connection: Queryable,
        ) -> tuple[Snapshot[Any] | None, list[SerializedEventEnvelope[Any]]]:
            rows = connection.execute(
                self.statements.select_snapshot, (self.aggregate_type, aggregate_id)
            ).fetchall()
            snapshot = decode_snapshot_row(self.transcoder, aggregate_id, rows[0]) if rows else None
            start = 0 if snapshot is None else snapshot.sequence
            rows = connection.execute(
                self.statements.select_events, (self.aggregate_type, aggregate_id, start)
            ).fetchall()
            return snapshot, [
                decode_event_row(self.transcoder, self.aggregate_type, aggregate_id, row)
                for row in rows
            ]

        snapshot, stored = await self.run(read, "loading a snapshot and the events after it")
        start = 0 if snapshot is None else snapshot.sequence
        return snapshot, pending.merge_events(aggregate_id, start, stored)

    async def load_snapshot(
        self, pending: PendingWrites[EventT, EntityT], aggregate_id: str
    ) -> Snapshot[EntityT] | None:
        """The snapshot the transaction buffered, else the stored one if it decodes."""
        staged = pending.snapshot(aggregate_id)
        if staged is not None:
            return staged

        rows = await self._rows(
            self.statements.select_snapshot,
            (self.aggregate_type, aggregate_id),
            "loading a snapshot",
        )
        return decode_snapshot_row(self.transcoder, aggregate_id, rows[0]) if rows else None

    async def read_all(self, after_position: int, limit: int) -> list[StoredEvent[EventT]]:
        """Up to ``limit`` events of the aggregate type after ``after_position``, in order.

        Raises:
            ValueError: ``after_position < 0`` or ``limit < 1``.
            EventStoreError: a stored event cannot be decoded, or the database failed.
        """
        after_position, limit = check_read_all(after_position, limit)
        rows = await self._rows(
            self.statements.select_all,
            (self.aggregate_type, after_position, limit),
            "reading all events",
        )
        stored: list[StoredEvent[Any]] = []
        for aggregate_id, *rest in rows:
            envelope = decode_event_row(self.transcoder, self.aggregate_type, aggregate_id, rest)
            # decode_event_row filled both from this row, so neither is None here.
            position, recorded_at = rest[6], envelope.recorded_at
            stored.append(StoredEvent(position, envelope, recorded_at))  # type: ignore[arg-type]
        return stored

    async def head_position(self) -> int:
        """The ``global_position`` of the store's last committed event (0 with none)."""
        rows = await self._rows(
            self.statements.select_head, (self.aggregate_type,), "reading the head position"
        )
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0


class SqlStoreShell(Generic[TxT, EventT, EntityT]):
    """The ``EventStore`` methods both SQL stores share, written once.

    Reads go through the store's :class:`SqlReads`, writes are staged in the
    transaction's :class:`PendingWrites`; a store supplies those (``_reads``, and its
    ``transaction()`` building the buffer with :meth:`_pending`), its commit, and two
    hooks: :meth:`_check_id` and :meth:`_refuse`.
    """

    __slots__ = ()

    transcoder: Transcoder
    aggregate_type: str
    _reads: SqlReads[EventT, EntityT]

    def _check_id(self, value: object, what: str) -> str:
        """``value`` if this database can store it as an id, else raise ``EventStoreError``."""
        return check_text(value, what)

    def _refuse(
        self,
        aggregate_id: str,
        metadata: Metadata,
        events: Sequence[EventRow],
        snapshots: Sequence[SnapshotRow],
    ) -> None:
        """Raise ``EventStoreError`` for encoded rows this database cannot hold (see
        :class:`Refuse`); by default it holds everything."""

    def _pending(self) -> PendingWrites[EventT, EntityT]:
        """An empty write buffer for a new transaction of this store."""
        return PendingWrites(self.transcoder, self.aggregate_type, self._refuse)

    async def load_events(
        self, tx: TxT, aggregate_id: str, start_from: int
    ) -> list[SerializedEventEnvelope[EventT]]:
        """The aggregate's events with ``sequence > start_from``, in sequence order.

        What the transaction sees: the stored events, then the ones it staged.

        Raises:
            EventStoreError: a stored event cannot be decoded (the message names the
                aggregate, sequence, type and version), the id cannot be stored in this
                database, or the database failed.
            TransactionFailed: the connection was lost (PostgreSQL).
        """
        return await self._reads.load_events(
            pending_writes(tx, self), self._check_id(aggregate_id, "aggregate_id"), start_from
        )

    async def load_snapshot_and_events(
        self, tx: TxT, aggregate_id: str
    ) -> tuple[Snapshot[EntityT] | None, list[SerializedEventEnvelope[EventT]]]:
        """The latest snapshot and the events after it, read together.

        What :meth:`load_snapshot` then :meth:`load_events` after its sequence return,
        in one worker-thread call (SQLite) or without a thread (PostgreSQL); the
        runtime loads aggregates with it. The events are read after the snapshot, so a
        commit in between is included, never skipped.

        Raises:
            EventStoreError: a stored event cannot be decoded, the id cannot be stored
                in this database, or the database failed.
            TransactionFailed: the connection was lost (PostgreSQL).
        """
        return await self._reads.load_snapshot_and_events(
            pending_writes(tx, self), self._check_id(aggregate_id, "aggregate_id")
        )

    async def load_snapshot(self, tx: TxT, aggregate_id: str) -> Snapshot[EntityT] | None:
        """The aggregate's latest snapshot, or ``None`` (also when it cannot be decoded).

        Raises:
            EventStoreError: the id cannot be stored in this database, or the database
                failed.
            TransactionFailed: the connection was lost (PostgreSQL).
        """
        return await self._reads.load_snapshot(
            pending_writes(tx, self), self._check_id(aggregate_id, "aggregate_id")
        )

    async def commit_events(
        self,
        tx: TxT,
        aggregate: Aggregate[EntityT],
        events: Iterable[EventT],
        metadata: Metadata,
    ) -> tuple[list[SerializedEventEnvelope[EventT]], int]:
        """Encode ``events`` and buffer them after ``aggregate.sequence``.

        ``events`` may be any iterable of events (a generator too); it is read once.
        The sequence check happens when the transaction commits (in the same database
        transaction as the write), so a conflict is raised when the block exits. A
        refused call leaves the transaction as it was: its other writes still commit.

        Raises:
            TypeError: ``events`` is None, not iterable, or a str, bytes or mapping;
                nothing is buffered for this call.
            EventStoreError: an event or the metadata cannot be encoded, or cannot be
                held by this database (PostgreSQL: a NUL character); nothing is
                buffered for this call.
        """
        pending = pending_writes(tx, self)
        self._check_id(aggregate.aggregate_id, "aggregate_id")
        return pending.stage_events(aggregate, events, metadata)

    async def save_snapshot(self, tx: TxT, snapshot: Snapshot[EntityT]) -> None:
        """Encode ``snapshot`` and buffer it; it replaces the stored one on commit.

        Raises:
            EventStoreError: the entity cannot be encoded or held by this database, or
                the timestamp is naive; nothing is buffered.
        """
        pending = pending_writes(tx, self)
        self._check_id(snapshot.aggregate_id, "aggregate_id")
        pending.stage_snapshot(snapshot)

    async def read_all(
        self, after_position: int = 0, limit: int = 1000
    ) -> list[StoredEvent[EventT]]:
        """Up to ``limit`` events of this store's aggregate type after ``after_position``.

        In ``global_position`` order, which is commit order: page through the whole log
        by passing the last position seen. A reader that has seen position *p* never
        later finds a new event at a position below *p* (see the store's notes). Not
        part of the ``EventStore`` protocol.

        Raises:
            ValueError: ``after_position < 0`` or ``limit < 1``.
            EventStoreError: a stored event cannot be decoded, or the database failed.
            TransactionFailed: the connection was lost (PostgreSQL).
        """
        return await self._reads.read_all(after_position, limit)

    async def head_position(self) -> int:
        """The ``global_position`` of this aggregate type's last committed event (0: none).

        Raises:
            EventStoreError: the database failed.
            TransactionFailed: the connection was lost (PostgreSQL).
        """
        return await self._reads.head_position()
