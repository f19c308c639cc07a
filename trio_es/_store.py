"""The event store interface: what the runtime needs from any store.

A store is transactional. The runtime opens ``async with store.transaction() as tx`` and
calls the other methods with ``tx``; leaving the block normally commits everything done
through ``tx`` atomically, leaving it with an exception writes nothing. A user can write
their own store against :class:`EventStore`; ``trio_es.testing`` (with the durable stores)
holds the conformance suite.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

from ._types import Aggregate, EventEnvelope, Metadata, Snapshot
from ._validated import check_int

__all__ = ["EventStore", "check_events", "check_read_all", "events_iterator"]

TxT = TypeVar("TxT")
EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")


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
