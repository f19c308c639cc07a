"""A whole system on a fresh memory store, for integration tests without fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, TypeVar, final

import attrs

from .._facade import EventSourcing, open_eventsourcing
from .._memory_store import MemoryStore
from .._projection import Projection
from .._runtime import Query, RuntimeOptions
from .._types import SnapshotConfig
from .._validated import Timeout
from ._given import ApplyFn, HandleFn

__all__ = ["SystemUnderTest", "open_test_system"]

CommandT = TypeVar("CommandT")
EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")


@final
@attrs.frozen
class SystemUnderTest(Generic[CommandT, EventT, EntityT]):
    """A running system and the memory store it writes to, as :func:`open_test_system` yields.

    Attributes:
        es: the usual facade: ``execute``, ``load_aggregate``, ``load_events`` ...
        store: the store, to read what was committed without going through the system.
    """

    es: EventSourcing[CommandT, EventT, EntityT]
    store: MemoryStore[EventT, EntityT]

    async def stored_events(self, aggregate_id: str) -> list[EventT]:
        """The events committed for ``aggregate_id``, read from the store, in order."""
        async with self.store.transaction() as tx:
            envelopes = await self.store.load_events(tx, aggregate_id, 0)
        return [envelope.payload for envelope in envelopes]


def open_test_system(
    *,
    handle: HandleFn[EntityT, CommandT, EventT],
    apply: ApplyFn[EntityT, EventT],
    empty_state: EntityT,
    queries: Sequence[Query] = (),
    snapshot_config: SnapshotConfig | None = None,
    options: RuntimeOptions | None = None,
    call_timeout: Timeout | int | None = 30_000,
    store: MemoryStore[EventT, EntityT] | None = None,
    projections: Sequence[Projection[Any]] = (),
) -> AbstractAsyncContextManager[SystemUnderTest[CommandT, EventT, EntityT]]:
    """Run ``handle`` and ``apply`` as a real system on a memory store, in an ``async with``.

    The system is the one :func:`trio_es.open_eventsourcing` runs (supervised aggregates,
    batching, queries, snapshots, projections), on a new :class:`~trio_es.memory_store.MemoryStore`
    unless ``store`` is given; it stops when the block exits. Needs a running Trio loop
    (``trio.run``, or an async test under pytest-trio) and nothing else: no fixture,
    no database.

    Args:
        handle: as for ``open_eventsourcing``.
        apply: as for ``open_eventsourcing``.
        empty_state: as for ``open_eventsourcing``.
        queries: as for ``open_eventsourcing``.
        snapshot_config: as for ``open_eventsourcing``.
        options: as for ``open_eventsourcing``.
        call_timeout: as for ``open_eventsourcing`` (milliseconds; ``None``: no limit).
        store: a memory store to use, e.g. one shared with a second system in the same
            test; ``None``: a new, empty one.
        projections: as for ``open_eventsourcing`` (``transactional=False`` ones: the
            memory store keeps their checkpoints); ``es.wait_for_projection`` then reads
            your own writes.
    """
    used: MemoryStore[EventT, EntityT] = MemoryStore() if store is None else store
    system = open_eventsourcing(
        eventstore=used,
        handle=handle,
        apply=apply,
        empty_state=empty_state,
        queries=queries,
        snapshot_config=snapshot_config,
        options=options,
        call_timeout=call_timeout,
        projections=projections,
    )
    return _with_store(system, used)


@asynccontextmanager
async def _with_store(
    system: AbstractAsyncContextManager[EventSourcing[CommandT, EventT, EntityT]],
    store: MemoryStore[EventT, EntityT],
) -> AsyncIterator[SystemUnderTest[CommandT, EventT, EntityT]]:
    async with system as es:
        yield SystemUnderTest(es, store)
