"""Catch-up subscriptions: a store's events in commit order, the backlog first, then live.

A subscription pulls: a reader task reads the store after the last position it read,
pages of at most ``batch_size`` events, and when it has read everything it waits for the
store to announce a commit (or for its poll interval) and reads again. It reads one page
ahead: the next page is read while the subscriber handles the current one. So:

* there is no gap and no duplicate at the switch from backlog to live, or anywhere: every
  read starts right after the last event read, and the stores make positions visible in
  commit order (a reader never later finds an event at a position it already passed);
* memory is bounded by two pages (the subscriber's, and the one read ahead), however far
  behind the subscriber is;
* a slow subscriber slows only itself: the reader waits for it, nothing is pushed, so no
  command ever waits for a subscriber.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeAlias, TypeVar, final

import attrs
import outcome
import trio

from ._store import ProjectionSource, Watch
from ._trio_util import AsyncValue, async_value, background
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


#: What the reader hands the subscriber: a page, or the error reading it raised.
_Page: TypeAlias = outcome.Outcome[Sequence[StoredEvent[Any]]]


async def _read_ahead(
    store: ProjectionSource[Any],
    watch: Watch,
    position: int,
    batch_size: int,
    pages: trio.MemorySendChannel[_Page],
    asks: AsyncValue[int],
) -> None:
    """Read pages after ``position`` into ``pages``, waiting for commits when caught up.

    Never raises: a failed read is handed to the subscriber, and tried again only once
    the subscriber asks for another batch (``asks`` counts its asks), so a failing store
    is not read in a loop, and the subscriber gets one error per ask.
    """
    while True:
        try:
            stored = await store.read_all(position, batch_size)
            if not stored:
                await watch.wait(position)
                continue
        except Exception as error:
            await pages.send(outcome.Error(error))
            # Until the count of asks exceeds this one's: the subscriber asks again.
            await asks.wait_value(functools.partial(operator.lt, asks.value))
            continue
        # Waits until the subscriber asks for it: one page ahead at most.
        await pages.send(outcome.Value(stored))
        position = stored[-1].global_position


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

    _pages: trio.MemoryReceiveChannel[_Page]
    _asks: AsyncValue[int]
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
        self._asks.value += 1
        page = await self._pages.receive()
        stored = page.unwrap()
        batch = [_envelope(event) for event in stored]
        self.position = stored[-1].global_position
        return batch


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
    send, receive = trio.open_memory_channel[_Page](0)
    asks = async_value(0)
    # The reader is stopped (the background block exits) before its channel closes.
    async with source.watch() as watch, send, receive, background() as nursery:
        nursery.start_soon(_read_ahead, source, watch, after, batch_size, send, asks)
        yield Subscription(receive, asks, after, batch_size)
