"""The in-memory event store, plain (:class:`MemoryStore`) or as supervised actors.

Events live in per-aggregate Python lists: appending costs O(events appended), reading a
tail costs O(tail). Nothing survives the process; use it for tests and prototypes.

Both are projection sources (see :class:`~trio_es._store.ProjectionSource`): events get
global positions from 1 in commit order, a commit wakes the store's watches at once, and
projection leases and checkpoints live in the store object (one lease per projection
name at a time; checkpoints are lost with the process, like the events).
"""

from __future__ import annotations

import datetime
import types
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, TypeVar, final

import attrs
import outcome
import trio

from ._errors import CheckpointMoved, ConcurrencyConflict, EventStoreError
from ._event_id import new_event_id
from ._store import check_events, check_read_all, placed
from ._subject import Name, Subject, named_subject, new_subject, receive
from ._supervisor import ChildSpecification, StaticSupervisor, Strategy, worker
from ._trio_util import AsyncValue, async_value
from ._types import (
    Aggregate,
    EventEnvelope,
    MemoryStoreEventEnvelope,
    Metadata,
    Snapshot,
    StoredEvent,
    utc_now,
)
from ._validated import Timeout, check_int, check_seconds
from ._watch import HeadWatch, check_projection_name, raise_head

__all__ = ["MemoryStore", "MemoryTransaction", "SupervisedMemoryStore", "supervised"]

EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")


@final
@attrs.define(eq=False)
class MemoryTransaction(Generic[EventT, EntityT]):
    """Writes buffered by one memory-store transaction, applied together on commit."""

    appends: dict[str, list[MemoryStoreEventEnvelope[EventT]]] = attrs.Factory(dict)
    #: The stored sequence each appended aggregate had when the transaction first wrote it.
    expected: dict[str, int] = attrs.Factory(dict)
    snapshots: dict[str, Snapshot[EntityT]] = attrs.Factory(dict)
    #: Once committed: each committed event's id mapped to its ``(global_position,
    #: recorded_at)``, for :func:`~trio_es._store.committed_envelopes`.
    recorded: dict[uuid.UUID, tuple[int, datetime.datetime]] = attrs.Factory(dict)


@final
@attrs.define(eq=False)
class _Log(Generic[EventT, EntityT]):
    """The stored data, shared by the plain store and by the actors of the supervised one."""

    events: dict[str, list[MemoryStoreEventEnvelope[EventT]]] = attrs.Factory(dict)
    snapshots: dict[str, Snapshot[EntityT]] = attrs.Factory(dict)
    #: Every event in commit order; event at global position p sits at index p - 1.
    log: list[StoredEvent[EventT]] = attrs.Factory(list)
    #: The last global position committed, raised right after each commit.
    head: AsyncValue[int] = attrs.Factory(lambda: async_value(0))
    #: Projection checkpoints by name (a name is missing until its first checkpoint()).
    checkpoints: dict[str, int] = attrs.Factory(dict)
    #: One token per projection name: its holder is the projection's active instance. A
    #: semaphore, not a lock: a task may wait for a lease it holds itself (a second
    #: instance of the projection started from the same task).
    leases: dict[str, trio.Semaphore] = attrs.Factory(dict)

    def sequence(self, aggregate_id: str) -> int:
        stream = self.events.get(aggregate_id)
        return 0 if stream is None else len(stream)

    def read(self, aggregate_id: str, start_from: int) -> list[MemoryStoreEventEnvelope[EventT]]:
        # Sequences are contiguous from 1, so event n sits at index n - 1.
        return self.events.get(aggregate_id, [])[max(start_from, 0) :]

    def apply_events(self, tx: MemoryTransaction[EventT, EntityT]) -> None:
        # Check every aggregate before touching any, so a conflict writes nothing.
        for aggregate_id, expected in tx.expected.items():
            actual = self.sequence(aggregate_id)
            if actual != expected:
                raise ConcurrencyConflict(
                    aggregate_id=aggregate_id, expected_sequence=expected, actual_sequence=actual
                )
        now = utc_now()
        position = len(self.log)
        for aggregate_id, envelopes in tx.appends.items():
            stream = self.events.setdefault(aggregate_id, [])
            for envelope in envelopes:
                position += 1
                # The staged envelope stays as commit_events returned it; the stored one
                # knows its place (committed_envelopes gives the caller the same).
                stored = placed(envelope, position, now)
                stream.append(stored)
                self.log.append(StoredEvent(position, stored, now))
                if envelope.event_id is not None:
                    tx.recorded[envelope.event_id] = (position, now)
        raise_head(self.head, position)

    async def read_all(self, after_position: object, limit: object) -> list[StoredEvent[EventT]]:
        after, count = check_read_all(after_position, limit)
        # A checkpoint, as every Trio async call: a subscriber paging through a long log
        # lets other tasks (committers among them) run between pages.
        await trio.lowlevel.checkpoint()
        return self.log[after : after + count]

    async def checkpoint_position(self, name: object) -> int:
        name = check_projection_name(name)
        await trio.lowlevel.checkpoint()
        return self.checkpoints.get(name, 0)

    @asynccontextmanager
    async def lease(self, name: object) -> AsyncIterator[_MemoryLease]:
        name = check_projection_name(name)
        token = self.leases.setdefault(name, trio.Semaphore(1))
        # Fair: standbys take over in the order they asked.
        async with token:
            lease = _MemoryLease(self, name)
            try:
                yield lease
            finally:
                lease.ended = True

    def apply_snapshots(self, tx: MemoryTransaction[EventT, EntityT]) -> None:
        self.snapshots.update(tx.snapshots)


_NO_DATABASE = (
    "transactional projections need a SQL store (SqliteStore or PostgresStore): the memory "
    "store keeps no database connection to pass to {what}; use a SQL store, or a projection "
    "with transactional=False"
)


@final
@attrs.define(eq=False)
class _MemoryLease:
    """A projection's lease in a memory store: its checkpoint lives in the store object."""

    _log: _Log[Any, Any]
    name: str
    ended: bool = False

    def _check(self) -> None:
        if self.ended:
            raise EventStoreError(
                f"the lease of projection {self.name!r} has ended; use it only inside its "
                "async with store.projection_lease(...) block"
            )

    async def checkpoint(self) -> int:
        """The stored checkpoint (0 for a projection that never ran)."""
        await trio.lowlevel.checkpoint()
        self._check()
        return self._log.checkpoints.setdefault(self.name, 0)

    async def advance(self, expected: int, position: int) -> None:
        """Move the checkpoint from ``expected`` to ``position``.

        Raises:
            CheckpointMoved: the stored checkpoint is not ``expected``; nothing changed.
        """
        expected = check_int("expected", expected, minimum=0)
        position = check_int("position", position, minimum=0)
        await trio.lowlevel.checkpoint()
        self._check()
        found = self._log.checkpoints.get(self.name)
        if found != expected:
            raise CheckpointMoved(name=self.name, expected=expected, found=found)
        self._log.checkpoints[self.name] = position

    async def advance_with(
        self,
        expected: int,
        position: int,
        fn: Callable[[Any, list[EventEnvelope[Any]]], None],
        batch: list[EventEnvelope[Any]],
    ) -> None:
        """Refused: the memory store has no database transaction to run ``fn`` in.

        Raises:
            TypeError: always; nothing changes.
        """
        raise TypeError(_NO_DATABASE.format(what="advance_with's fn"))

    async def reset(self, fn: Callable[[Any], None] | None = None) -> None:
        """Set the checkpoint to 0; ``fn`` must be ``None`` (there is no database).

        Raises:
            TypeError: ``fn`` is given; nothing changes.
        """
        if fn is not None:
            raise TypeError(_NO_DATABASE.format(what="reset's fn"))
        await trio.lowlevel.checkpoint()
        self._check()
        self._log.checkpoints[self.name] = 0


@final
class _Block(Generic[EventT, EntityT]):
    """A :class:`MemoryStore` transaction block (a class: this runs for every command)."""

    __slots__ = ("_log", "_tx")

    def __init__(self, log: _Log[EventT, EntityT], tx: MemoryTransaction[EventT, EntityT]) -> None:
        self._log = log
        self._tx = tx

    async def __aenter__(self) -> MemoryTransaction[EventT, EntityT]:
        return self._tx

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        if exc_type is None:
            # No await between the check and the write: the commit is atomic in Trio.
            self._log.apply_events(self._tx)
            self._log.apply_snapshots(self._tx)


def _stage(
    tx: MemoryTransaction[EventT, EntityT],
    stored_sequence: int,
    aggregate: Aggregate[EntityT],
    events: list[EventT],
    metadata: Metadata,
) -> tuple[list[MemoryStoreEventEnvelope[EventT]], int]:
    """Buffer ``events`` in ``tx`` after checking the optimistic-concurrency expectation.

    Every check comes before the first change, so a refused call leaves ``tx`` as it was.
    """
    aggregate_id = aggregate.aggregate_id
    pending = tx.appends.get(aggregate_id)
    current = stored_sequence + (0 if pending is None else len(pending))
    if current != aggregate.sequence:
        raise ConcurrencyConflict(
            aggregate_id=aggregate_id,
            expected_sequence=aggregate.sequence,
            actual_sequence=current,
        )
    envelopes = [
        MemoryStoreEventEnvelope(
            aggregate_id, aggregate.sequence + i, event, metadata, event_id=new_event_id()
        )
        for i, event in enumerate(events, start=1)
    ]
    if pending is None:
        tx.expected[aggregate_id] = stored_sequence
        tx.appends[aggregate_id] = list(envelopes)
    else:
        pending.extend(envelopes)
    return envelopes, aggregate.sequence + len(events)


def _with_pending(
    stored: list[MemoryStoreEventEnvelope[EventT]],
    tx: MemoryTransaction[EventT, EntityT],
    aggregate_id: str,
    start_from: int,
) -> list[MemoryStoreEventEnvelope[EventT]]:
    pending = tx.appends.get(aggregate_id)
    if not pending:
        return stored
    return stored + [e for e in pending if e.sequence > start_from]


def _check_poll(_: object, __: object, value: object) -> None:
    check_seconds("poll_interval", value, hint="1.0 suits most uses")


class _FeedsProjections(Generic[EventT, EntityT]):
    """What both memory stores offer subscriptions and projections, from their shared data."""

    poll_interval: float
    _log: _Log[EventT, EntityT]

    async def read_all(
        self, after_position: int = 0, limit: int = 1000
    ) -> list[StoredEvent[EventT]]:
        """Up to ``limit`` committed events after ``after_position``, in commit order.

        Positions start at 1 and have no gaps: a rolled-back transaction takes none.
        """
        return await self._log.read_all(after_position, limit)

    async def head_position(self) -> int:
        """The global position of the last committed event (0 with none)."""
        await trio.lowlevel.checkpoint()
        return len(self._log.log)

    @asynccontextmanager
    async def watch(self) -> AsyncIterator[HeadWatch]:
        """Wake-ups for one subscriber: at once on each commit, else every poll interval."""
        yield HeadWatch(self._log.head, self.poll_interval)

    async def checkpoint_position(self, name: str) -> int:
        """Projection ``name``'s checkpoint (0 when it never ran), read without its lease."""
        return await self._log.checkpoint_position(name)

    def projection_lease(self, name: str) -> AbstractAsyncContextManager[_MemoryLease]:
        """Wait until no other lease of projection ``name`` on this store object is held.

        Leases and checkpoints live in this store object: another store object (or
        process) knows nothing of them. ``advance_with`` and ``reset(fn)`` raise
        ``TypeError``: there is no database transaction to run ``fn`` in.

        Raises:
            TypeError: ``name`` is not a str.
            ValueError: ``name`` is empty.
        """
        return self._log.lease(name)


@final
@attrs.define(eq=False)
class MemoryStore(_FeedsProjections[EventT, EntityT]):
    """An in-memory event store that needs no tasks.

    Transactions buffer their writes and apply them atomically on commit: a transaction
    sees its own writes, and a concurrent writer that got there first makes the commit
    fail with ``ConcurrencyConflict`` without writing anything.

    Attributes:
        poll_interval: the longest a watch waits without a commit before returning (its
            subscriber then reads and waits again), in seconds. Every commit of a memory
            store wakes its watches at once, so this matters little here.
    """

    poll_interval: float = attrs.field(default=1.0, kw_only=True, validator=_check_poll)
    _log: _Log[EventT, EntityT] = attrs.field(factory=_Log, init=False)

    def transaction(self) -> AbstractAsyncContextManager[MemoryTransaction[EventT, EntityT]]:
        """A transaction: its writes are applied together when the block exits normally."""
        return _Block(self._log, MemoryTransaction())

    async def load_events(
        self, tx: MemoryTransaction[EventT, EntityT], aggregate_id: str, start_from: int
    ) -> list[MemoryStoreEventEnvelope[EventT]]:
        return _with_pending(self._log.read(aggregate_id, start_from), tx, aggregate_id, start_from)

    async def commit_events(
        self,
        tx: MemoryTransaction[EventT, EntityT],
        aggregate: Aggregate[EntityT],
        events: Iterable[EventT],
        metadata: Metadata,
    ) -> tuple[list[MemoryStoreEventEnvelope[EventT]], int]:
        """Buffer ``events`` (any iterable, read once) after ``aggregate.sequence``.

        Raises:
            TypeError: ``events`` is None, not iterable, or a str, bytes or mapping;
                nothing is buffered and the transaction stays usable.
            ConcurrencyConflict: the stored (plus buffered) sequence is not
                ``aggregate.sequence``.
        """
        materialized = check_events(events)
        stored = self._log.sequence(aggregate.aggregate_id)
        return _stage(tx, stored, aggregate, materialized, metadata)

    async def load_snapshot(
        self, tx: MemoryTransaction[EventT, EntityT], aggregate_id: str
    ) -> Snapshot[EntityT] | None:
        return tx.snapshots.get(aggregate_id) or self._log.snapshots.get(aggregate_id)

    async def save_snapshot(
        self, tx: MemoryTransaction[EventT, EntityT], snapshot: Snapshot[EntityT]
    ) -> None:
        tx.snapshots[snapshot.aggregate_id] = snapshot


# The supervised variant, as in the Gleam package: an events actor and a snapshot actor under a
# supervisor. Their data lives in a shared _Log, not in the tasks, so a restarted actor
# has lost nothing.


@attrs.frozen
class _Sequence:
    aggregate_id: str
    reply_to: Subject[outcome.Outcome[int]]


@attrs.frozen
class _Read:
    aggregate_id: str
    start_from: int
    reply_to: Subject[outcome.Outcome[list[MemoryStoreEventEnvelope[Any]]]]


@attrs.frozen
class _Commit:
    tx: MemoryTransaction[Any, Any]
    reply_to: Subject[outcome.Outcome[None]]


@attrs.frozen
class _LoadSnapshot:
    aggregate_id: str
    reply_to: Subject[outcome.Outcome[Snapshot[Any] | None]]


async def _serve(
    name: Name[Any],
    log: _Log[Any, Any],
    commit: Callable[[MemoryTransaction[Any, Any]], None],
    *,
    task_status: Any,
) -> None:
    """Answer store calls sent to ``name``; ``commit`` applies this actor's part of a commit."""
    mailbox = named_subject(name)
    task_status.started()
    while True:
        message = await mailbox.get()
        match message:
            case _Sequence(aggregate_id, reply_to):
                reply_to.send(outcome.capture(log.sequence, aggregate_id))
            case _Read(aggregate_id, start_from, reply_to):
                reply_to.send(outcome.capture(log.read, aggregate_id, start_from))
            case _Commit(tx, reply_to):
                reply_to.send(outcome.capture(commit, tx))
            case _LoadSnapshot(aggregate_id, reply_to):
                reply_to.send(outcome.Value(log.snapshots.get(aggregate_id)))
            case _:
                raise EventStoreError(f"memory store actor {name.label!r} got {message!r}")


@final
@attrs.define(eq=False)
class SupervisedMemoryStore(_FeedsProjections[EventT, EntityT]):
    """A memory store whose reads and commits are messages to two supervised actors.

    Every call waits at most ``call_timeout`` for the actor's reply, then raises
    ``ActorTimeout``. Events commit before snapshots; a snapshot is derived data, so a
    crash between the two loses nothing that matters.

    The projection-source calls (``read_all``, ``head_position``, ``watch``,
    ``projection_lease``) read the data the actors share directly, as
    :class:`MemoryStore` does: they need no actor, so they work while one restarts.
    """

    events_name: Name[Any]
    snapshot_name: Name[Any]
    call_timeout: Timeout = Timeout(5000)
    #: As :attr:`MemoryStore.poll_interval`.
    poll_interval: float = attrs.field(default=1.0, kw_only=True, validator=_check_poll)
    #: The data the actors serve; give the one they share (``supervised`` does).
    _log: _Log[EventT, EntityT] = attrs.field(factory=_Log, kw_only=True, alias="log")

    async def _call(self, name: Name[Any], make: Any) -> Any:
        reply: Subject[Any] = new_subject(capacity=1, label=f"reply from {name.label}")
        named_subject(name).send(make(reply))
        return await receive(reply, self.call_timeout)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[MemoryTransaction[EventT, EntityT]]:
        tx: MemoryTransaction[EventT, EntityT] = MemoryTransaction()
        yield tx
        if tx.appends:
            await self._call(self.events_name, lambda r: _Commit(tx, r))
        if tx.snapshots:
            await self._call(self.snapshot_name, lambda r: _Commit(tx, r))

    async def load_events(
        self, tx: MemoryTransaction[EventT, EntityT], aggregate_id: str, start_from: int
    ) -> list[MemoryStoreEventEnvelope[EventT]]:
        stored = await self._call(self.events_name, lambda r: _Read(aggregate_id, start_from, r))
        return _with_pending(stored, tx, aggregate_id, start_from)

    async def commit_events(
        self,
        tx: MemoryTransaction[EventT, EntityT],
        aggregate: Aggregate[EntityT],
        events: Iterable[EventT],
        metadata: Metadata,
    ) -> tuple[list[MemoryStoreEventEnvelope[EventT]], int]:
        """As :meth:`MemoryStore.commit_events`; may ask the events actor for the sequence."""
        materialized = check_events(events)
        aggregate_id = aggregate.aggregate_id
        stored = (
            tx.expected[aggregate_id]
            if aggregate_id in tx.expected
            else await self._call(self.events_name, lambda r: _Sequence(aggregate_id, r))
        )
        return _stage(tx, stored, aggregate, materialized, metadata)

    async def load_snapshot(
        self, tx: MemoryTransaction[EventT, EntityT], aggregate_id: str
    ) -> Snapshot[EntityT] | None:
        pending = tx.snapshots.get(aggregate_id)
        if pending is not None:
            return pending
        snapshot: Snapshot[EntityT] | None = await self._call(
            self.snapshot_name, lambda r: _LoadSnapshot(aggregate_id, r)
        )
        return snapshot

    async def save_snapshot(
        self, tx: MemoryTransaction[EventT, EntityT], snapshot: Snapshot[EntityT]
    ) -> None:
        tx.snapshots[snapshot.aggregate_id] = snapshot


def supervised(
    events_name: Name[Any],
    snapshot_name: Name[Any],
    strategy: Strategy = Strategy.ONE_FOR_ONE,
    *,
    poll_interval: float = 1.0,
) -> tuple[SupervisedMemoryStore[Any, Any], ChildSpecification]:
    """Build the Gleam package's supervised memory store: two actors under one supervisor.

    Returns the store and the child specification to start under your supervision tree;
    the store's calls are answered once that supervisor runs. ``poll_interval`` is the
    store's (see :attr:`MemoryStore.poll_interval`).
    """
    log: _Log[Any, Any] = _Log()

    async def events_actor(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await _serve(events_name, log, log.apply_events, task_status=task_status)

    async def snapshot_actor(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await _serve(snapshot_name, log, log.apply_snapshots, task_status=task_status)

    supervisor = (
        StaticSupervisor(strategy, name="memory_store")
        .add(worker(events_actor, name=events_name))
        .add(worker(snapshot_actor, name=snapshot_name))
    )
    store: SupervisedMemoryStore[Any, Any] = SupervisedMemoryStore(
        events_name, snapshot_name, poll_interval=poll_interval, log=log
    )
    return store, supervisor.supervised()
