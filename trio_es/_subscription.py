"""Catch-up subscriptions: a store's events in commit order, the backlog first, then live.

A subscription pulls: it reads the store after the last position it delivered, pages of
at most ``batch_size`` events, and when it has read everything it waits for the store to
announce a commit (or for its poll interval) and reads again. So:

* there is no gap and no duplicate at the switch from backlog to live, or anywhere: every
  read starts right after the last event delivered, and the stores make positions visible
  in commit order (a reader never later finds an event at a position it already passed);
* memory is bounded by one page, however far behind the subscriber is;
* a slow subscriber slows only itself: nothing is pushed to it, so no command ever waits
  for a subscriber.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar, final

import attrs

from ._store import ProjectionSource, Watch
from ._types import EventEnvelope, StoredEvent
from ._validated import check_int

__all__ = ["Subscription", "check_source", "subscribe"]

EventT = TypeVar("EventT")

#: The methods a store needs for subscriptions (see :class:`~trio_es._store.ProjectionSource`).
_SOURCE_METHODS = ("read_all", "head_position", "watch", "projection_lease")


def check_source(store: object, what: str = "store") -> ProjectionSource[Any]:
    """Return ``store`` if it can feed subscriptions and projections, else raise ``TypeError``."""
    missing = [name for name in _SOURCE_METHODS if not callable(getattr(store, name, None))]
    if missing:
        raise TypeError(
            f"{what} must be a store that feeds subscriptions, such as MemoryStore, SqliteStore "
            f"or PostgresStore (got {type(store).__name__}, which lacks {', '.join(missing)})"
        )
    return store  # type: ignore[return-value]


def _envelope(stored: StoredEvent[EventT]) -> EventEnvelope[EventT]:
    envelope = stored.envelope
    if envelope.global_position is None:
        # A store that keeps the position beside the envelope only (a user's own store).
        envelope = attrs.evolve(
            envelope, global_position=stored.global_position, recorded_at=stored.recorded_at
        )
    return envelope


@final
@attrs.define(eq=False)
class Subscription(Generic[EventT]):
    """An async iterator of non-empty lists of envelopes, in ``global_position`` order.

    It never ends by itself: after the backlog it waits for new commits. Leave the
    ``async for`` (or the :func:`subscribe` block) to stop.

    Attributes:
        position: the ``global_position`` of the last event delivered (the ``after``
            the subscription started from, before the first batch).
        batch_size: the most events one batch holds.
    """

    _store: ProjectionSource[EventT]
    _watch: Watch
    position: int
    batch_size: int

    def __aiter__(self) -> Subscription[EventT]:
        return self

    async def __anext__(self) -> list[EventEnvelope[EventT]]:
        """The next batch: at once when events are waiting, else once some are committed.

        Raises:
            EventStoreError: the store failed; the subscription may be iterated again
                and goes on from :attr:`position`.
        """
        while True:
            stored = await self._store.read_all(self.position, self.batch_size)
            if stored:
                batch = [_envelope(event) for event in stored]
                self.position = stored[-1].global_position
                return batch
            await self._watch.wait(self.position)


@asynccontextmanager
async def subscribe(
    store: ProjectionSource[EventT], *, after: int = 0, batch_size: int = 500
) -> AsyncIterator[Subscription[EventT]]:
    """Subscribe to ``store``'s events after global position ``after``.

    Yields an async iterator of non-empty lists of envelopes in ``global_position``
    order: the backlog first, read in pages of at most ``batch_size`` events, then live
    events as they commit, with no gap and no duplicate, while other tasks and other
    processes write. Each envelope carries its ``global_position``, ``event_id`` and
    ``recorded_at``. Commits through the same store object wake the subscriber at once;
    other processes' commits are seen on the store's notification (PostgreSQL) or poll
    interval (SQLite), within a few seconds.

    A subscriber that processes slowly only falls behind; it never slows commands.

    Example::

        async with trio_es.subscribe(store, after=checkpoint) as batches:
            async for batch in batches:
                for envelope in batch:
                    print(envelope.global_position, envelope.payload)

    Raises:
        TypeError: ``store`` cannot feed subscriptions, or an argument is no int.
        NonPositiveArgument: ``after < 0`` or ``batch_size < 1``.
    """
    source = check_source(store)
    after = check_int("after", after, minimum=0, hint="pass 0 to start from the beginning")
    batch_size = check_int("batch_size", batch_size, minimum=1, hint="500 suits most uses")
    async with source.watch() as watch:
        yield Subscription(source, watch, after, batch_size)
