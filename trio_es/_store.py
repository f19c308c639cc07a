"""The event store interface: what the runtime needs from any store.

A store is transactional. The runtime opens ``async with store.transaction() as tx`` and
calls the other methods with ``tx``; leaving the block normally commits everything done
through ``tx`` atomically, leaving it with an exception writes nothing. A user can write
their own store against :class:`EventStore`; ``trio_es.testing`` (with the durable stores)
holds the conformance suite.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar

from ._types import Aggregate, EventEnvelope, Metadata, Snapshot

__all__ = ["EventStore", "check_read_all"]

TxT = TypeVar("TxT")
EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")


class EventStore(Protocol[TxT, EventT, EntityT]):
    """An append-only, per-aggregate event log with snapshots.

    Type parameters: the store's transaction handle, the event type, the entity type.
    """

    def transaction(self) -> AbstractAsyncContextManager[TxT]:
        """Open a transaction; it commits when the block exits normally.

        Raises (on exit):
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
        events: Sequence[EventT],
        metadata: Metadata,
    ) -> tuple[Sequence[EventEnvelope[EventT]], int]:
        """Append ``events`` after ``aggregate.sequence``; return their envelopes, new sequence.

        Optimistic concurrency: the write is refused with ``ConcurrencyConflict`` when the
        stored sequence is not ``aggregate.sequence`` (now or when the transaction commits).
        ``metadata`` is stored with every event of the call.
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
        ValueError: either is not an int in range.
    """
    if (
        isinstance(after_position, bool)
        or not isinstance(after_position, int)
        or after_position < 0
    ):
        raise ValueError(f"after_position must be an int >= 0 (got {after_position!r})")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an int >= 1 (got {limit!r})")
    return after_position, limit
