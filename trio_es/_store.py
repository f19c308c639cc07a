"""The event store interface: what the runtime needs from any store.

A store is transactional. The runtime opens ``async with store.transaction() as tx`` and
calls the other methods with ``tx``; leaving the block normally commits everything done
through ``tx`` atomically, leaving it with an exception writes nothing. A user can write
their own store against :class:`EventStore`; ``trio_es.testing`` (with the durable stores)
holds the conformance suite.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

import attrs

from ._types import (
    Aggregate,
    EventEnvelope,
    MemoryStoreEventEnvelope,
    Metadata,
    SerializedEventEnvelope,
    Snapshot,
    StoredEvent,
)
from ._validated import check_int

__all__ = [
    "load_snapshot_and_events",
    "placed",
    "EventStore",
    "Lease",
    "ProjectionSource",
    "Watch",
    "check_events",
    "check_read_all",
    "committed_envelopes",
    "events_iterator",
]

TxT = TypeVar("TxT")
EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")
EnvelopeT = TypeVar("EnvelopeT", bound="EventEnvelope[Any]")


class EventStore(Protocol[TxT, EventT, EntityT]):
    """An append-only, per-aggregate event log with snapshots.

    Type parameters: the store's transaction handle, the event type, the entity type.
    """

    def transaction(self) -> AbstractAsyncContextManager[TxT]:
        """Open a transaction; it commits when the block exits normally.

        Raises on exit:
            ConcurrencyConflict: another writer appended to an aggregate this transaction
                appended to; nothing of this transaction was written.
            EventStoreError: the store failed; nothing was written.
        """
        ...

    async def load_events(
        self, tx: TxT, aggregate_id: str, start_from: int
    ) -> Sequence[EventEnvelope[EventT]]:
        """The aggregate's events with ``sequence > start_from``, in sequence order."""
        ...

    async def commit_events(
        self,
        tx: TxT,
        aggregate: Aggregate[EntityT],
        events: Iterable[EventT],
        metadata: Metadata,
    ) -> tuple[Sequence[EventEnvelope[EventT]], int]:
        """Append ``events`` after ``aggregate.sequence``; return their envelopes, new sequence.

        ``events`` may be any iterable (a generator too; see :func:`check_events`): it is
        read once and every event is stored exactly once. A call that raises leaves the
        transaction as it was, still usable: the runtime relies on that to fail only the
        command whose events the store refused.

        Optimistic concurrency: the write is refused with ``ConcurrencyConflict`` when the
        stored sequence is not ``aggregate.sequence`` (now or when the transaction commits).
        ``metadata`` is stored with every event of the call.

        Raises:
            TypeError: ``events`` is not an iterable of events (see :func:`check_events`).
            ConcurrencyConflict: the stored sequence is not ``aggregate.sequence``.
            EventStoreError: the store cannot hold these events (e.g. not serializable).
        """
        ...

    async def load_snapshot(self, tx: TxT, aggregate_id: str) -> Snapshot[EntityT] | None:
        """The aggregate's latest snapshot, or ``None``."""
        ...

    async def save_snapshot(self, tx: TxT, snapshot: Snapshot[EntityT]) -> None:
        """Keep ``snapshot`` as the aggregate's latest (it replaces an older one)."""
        ...


def check_read_all(after_position: object, limit: object) -> tuple[int, int]:
    """Validate ``read_all`` arguments: ``after_position >= 0`` and ``limit >= 1`` ints.

    Raises:
        TypeError: either is not an int.
        NonPositiveArgument: either is out of range (also a ``ValueError``).
    """
    return check_int("after_position", after_position, minimum=0), check_int(
        "limit", limit, minimum=1
    )


def check_events(events: object) -> list[Any]:
    """``events`` as a list, read once: any iterable of events but a str, bytes or mapping.

    Stores take any iterable (a generator too) and must store each event exactly once,
    so they read it here, once, before anything is staged.

    Raises:
        TypeError: ``events`` is None, not iterable, or a str, bytes or mapping (which
            iterate as characters, integers or keys, never as events).
    """
    if type(events) is list:
        return events  # the common case: stores copy the events into rows anyway
    iterator = events_iterator(events)
    if iterator is not None:
        return list(iterator)
    raise TypeError(
        f"events must be an iterable of events such as a list (got {type(events).__name__} "
        f"{events!r:.80}); pass a list, e.g. [event] for one event or [] for none"
    )


def events_iterator(events: object) -> Iterator[Any] | None:
    """An iterator over ``events``, or ``None`` when it is no iterable of events.

    ``None``, non-iterables, and str, bytes or mappings (which iterate as characters,
    integers or keys) are no iterable of events. Nothing is read yet, so an error raised
    while iterating (a generator's own bug) is not mistaken for a wrong type.
    """
    if isinstance(events, str | bytes | bytearray | memoryview | Mapping):
        return None
    try:
        return iter(events)  # type: ignore[call-overload, no-any-return]
    except TypeError:
        return None


#: What a committed transaction handle may carry as ``recorded``: each committed event's
#: id mapped to its ``(global_position, recorded_at)``.
Recorded = Mapping[uuid.UUID, tuple[int, datetime.datetime]]


def committed_envelopes(tx: object, envelopes: Sequence[EnvelopeT]) -> Sequence[EnvelopeT]:
    """``envelopes`` (as ``commit_events`` staged them in ``tx``) with their place in the store.

    Once its block committed, a transaction handle of the stores in this package carries
    ``recorded`` (see :data:`Recorded`); the envelopes are returned with
    ``global_position`` and ``recorded_at`` filled in from it. A store without it (one a
    user wrote) leaves them as they are (``None``).
    """
    recorded: Recorded | None = getattr(tx, "recorded", None)
    if not recorded or not envelopes:
        return envelopes
    positioned: list[EnvelopeT] = []
    for envelope in envelopes:
        place = recorded.get(envelope.event_id) if envelope.event_id is not None else None
        if place is None:
            positioned.append(envelope)
        else:
            positioned.append(placed(envelope, place[0], place[1]))
    return positioned


def placed(envelope: EnvelopeT, position: int, recorded_at: datetime.datetime) -> EnvelopeT:
    """``envelope`` with its place; built directly for the package's own envelope classes,
    since ``attrs.evolve`` introspects the class on every call (this runs per event)."""
    e: Any = envelope
    if type(envelope) is MemoryStoreEventEnvelope:
        placed: Any = MemoryStoreEventEnvelope(
            e.aggregate_id,
            e.sequence,
            e.payload,
            e.metadata,
            event_id=e.event_id,
            global_position=position,
            recorded_at=recorded_at,
        )
    elif type(envelope) is SerializedEventEnvelope:
        placed = SerializedEventEnvelope(
            e.aggregate_id,
            e.sequence,
            e.payload,
            e.metadata,
            e.event_type,
            e.event_version,
            e.aggregate_type,
            event_id=e.event_id,
            global_position=position,
            recorded_at=recorded_at,
        )
    else:
        placed = attrs.evolve(e, global_position=position, recorded_at=recorded_at)
    return placed  # type: ignore[no-any-return]


class Watch(Protocol):
    """Wake-ups for a subscriber: tells it when new events may have been committed."""

    async def wait(self, after: int) -> None:
        """Return once events after global position ``after`` may have been committed.

        Returns at once when the store already knows of such events (committed through
        this store object, or announced by the database), else on the next
        announcement, and at the latest after the store's poll interval (commits that
        nobody announces, e.g. another process's on SQLite). A spurious return is
        allowed: the subscriber reads and waits again.
        """
        ...


class Lease(Protocol):
    """A projection's single-active lease in one store, with its checkpoint.

    Held from when ``projection_lease`` yielded it until its block exits; only one lease
    per (events table, aggregate type, projection name) exists at a time, across every
    process using the database. The checkpoint is the global position of the last event
    the projection processed (0: none).
    """

    async def checkpoint(self) -> int:
        """The stored checkpoint (0 for a projection that never ran)."""
        ...

    async def advance(self, expected: int, position: int) -> None:
        """Move the checkpoint from ``expected`` to ``position``.

        Raises:
            CheckpointMoved: the stored checkpoint is not ``expected`` (a rebuild reset
                it); nothing changed.
            EventStoreError: the store failed (or the lease was lost with its
                connection); nothing changed.
        """
        ...

    async def advance_with(
        self,
        expected: int,
        position: int,
        fn: Callable[[Any, list[EventEnvelope[Any]]], None],
        batch: list[EventEnvelope[Any]],
    ) -> None:
        """Run ``fn(connection, batch)`` and move the checkpoint, in one transaction.

        ``fn`` runs in a worker thread with the database connection (a
        ``sqlite3.Connection``, or a ``psycopg.Connection`` in a transaction) and must
        not commit or roll back; if it raises, nothing of it and no checkpoint move is
        kept, and its exception propagates as itself.

        Raises:
            CheckpointMoved: as :meth:`advance`; nothing of ``fn`` is kept.
            TypeError: the store keeps no database for ``fn`` (the memory store).
            EventStoreError: the store failed; nothing is kept.
        """
        ...

    async def reset(self, fn: Callable[[Any], None] | None = None) -> None:
        """Set the checkpoint to 0, running ``fn(connection)`` in the same transaction."""
        ...


class ProjectionSource(Protocol[EventT]):
    """What :func:`trio_es.subscribe` and projections need from a store.

    The memory, SQLite and PostgreSQL stores provide it.
    """

    async def read_all(
        self, after_position: int = 0, limit: int = 1000
    ) -> Sequence[StoredEvent[EventT]]:
        """Up to ``limit`` committed events after ``after_position``, in position order.

        Their envelopes carry ``global_position``, ``event_id`` and ``recorded_at``.
        """
        ...

    async def head_position(self) -> int:
        """The global position of the last committed event (0 with none)."""
        ...

    async def checkpoint_position(self, name: str) -> int:
        """Projection ``name``'s stored checkpoint (0 when it never ran), read without
        its lease: what a standby instance follows."""
        ...

    def watch(self) -> AbstractAsyncContextManager[Watch]:
        """Wake-ups for one subscriber while the block runs (see :class:`Watch`)."""
        ...

    def projection_lease(self, name: str) -> AbstractAsyncContextManager[Lease]:
        """Wait until this is the one active instance of projection ``name``; hold it.

        Waits (cancellably) while another instance, in this process or another, holds
        it; takes over within the store's takeover interval after that one ends or its
        process dies. The lease ends when the block exits.
        """
        ...


async def load_snapshot_and_events(
    store: Any, tx: Any, aggregate_id: str
) -> tuple[Snapshot[Any] | None, Sequence[EventEnvelope[Any]]]:
    """``store``'s latest snapshot of the aggregate and the events after it.

    A store of this package's SQL kind reads both in one worker-thread call (its own
    ``load_snapshot_and_events``); any other store is asked with ``load_snapshot`` then
    ``load_events``. Wrappers of stores (the testing ones) pass this through, so that
    the runtime takes the same path through them as without them.
    """
    both = getattr(store, "load_snapshot_and_events", None)
    if both is not None:
        result: tuple[Snapshot[Any] | None, Sequence[EventEnvelope[Any]]] = await both(
            tx, aggregate_id
        )
        return result
    snapshot = await store.load_snapshot(tx, aggregate_id)
    start = 0 if snapshot is None else snapshot.sequence
    return snapshot, await store.load_events(tx, aggregate_id, start)
