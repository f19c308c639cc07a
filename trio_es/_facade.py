"""An async facade over the message API, for Trio code that awaits results.

``open_eventsourcing`` starts the whole supervision tree in a nursery of its own and
stops it when the block exits. Its methods wait for room in the mailbox instead of
raising ``MailboxFull`` (backpressure), then wait for the reply.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar, final

import attrs
import trio

from ._api import check_start_from, new_reply
from ._runtime import ApplyFn, HandleFn, Query, RuntimeOptions, build_runtime
from ._store import EventStore
from ._subject import Name, Subject, named_subject, new_name, wait_for
from ._types import (
    Aggregate,
    AggregateStats,
    EventEnvelope,
    ExecuteCommandWithResponse,
    GetAggregateStats,
    GetSystemStats,
    LoadAggregate,
    LoadEvents,
    LoadLatestSnapshot,
    Message,
    Reply,
    Snapshot,
    SnapshotConfig,
    SystemStats,
    check_aggregate_id,
    metadata_tuple,
)
from ._validated import Timeout

__all__ = ["EventSourcing", "open_eventsourcing"]

CommandT = TypeVar("CommandT")
EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")
T = TypeVar("T")


@final
@attrs.define(eq=False)
class EventSourcing(Generic[CommandT, EventT, EntityT]):
    """A running eventsourcing system, as :func:`open_eventsourcing` yields it.

    Calls for one aggregate are processed in the order they were made; a load made after
    an ``execute`` returned sees that command's effect. Every call waits at most
    ``call_timeout`` for its reply (then raises ``ActorTimeout``), or forever if it is
    ``None``; wrap calls in your own Trio cancel scopes for finer control.

    Attributes:
        subject: the public subject, for the message API (``execute``, ``receive`` ...).
        call_timeout: the longest a call waits for its reply.
    """

    subject: Subject[Message]
    call_timeout: Timeout | None = Timeout(30_000)
    _send: Callable[[Message], Awaitable[None]] | None = attrs.field(default=None, repr=False)

    async def _call(self, operation: str, make: Callable[[Reply[Any]], Message]) -> Any:
        reply: Reply[Any] = new_reply(f"{operation} reply")
        message = make(reply)
        if self._send is None:
            await self.subject.send_wait(message)
        else:
            await self._send(message)
        return await wait_for(reply, self.call_timeout, operation)

    async def execute(
        self, aggregate_id: str, command: CommandT, metadata: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Run ``command`` on the aggregate and return once its events are committed.

        Raises:
            DomainError: the domain rejected the command; nothing was committed.
            TransactionFailed: the commit kept failing after the configured retries.
            ActorTimeout: no reply within ``call_timeout``.
            Exception: ``handle``, ``apply`` or the store crashed on this command.
        """
        aggregate_id = check_aggregate_id(aggregate_id)
        pairs = metadata_tuple(metadata)
        await self._call(
            "execute", lambda r: ExecuteCommandWithResponse(aggregate_id, command, pairs, r)
        )

    async def load_aggregate(self, aggregate_id: str) -> Aggregate[EntityT]:
        """The aggregate's current state.

        Raises:
            EntityNotFound: the aggregate has no events.
        """
        aggregate_id = check_aggregate_id(aggregate_id)
        aggregate: Aggregate[EntityT] = await self._call(
            "load_aggregate", lambda r: LoadAggregate(aggregate_id, r)
        )
        return aggregate

    async def load_events(
        self, aggregate_id: str, start_from: int = 0
    ) -> list[EventEnvelope[EventT]]:
        """The aggregate's events with sequence greater than ``start_from``, in order."""
        aggregate_id = check_aggregate_id(aggregate_id)
        start = check_start_from(start_from)
        events: list[EventEnvelope[EventT]] = await self._call(
            "load_events", lambda r: LoadEvents(aggregate_id, start, r)
        )
        return events

    async def latest_snapshot(self, aggregate_id: str) -> Snapshot[EntityT] | None:
        """The latest snapshot; ``None`` when snapshots are off or none exists yet."""
        aggregate_id = check_aggregate_id(aggregate_id)
        snapshot: Snapshot[EntityT] | None = await self._call(
            "latest_snapshot", lambda r: LoadLatestSnapshot(aggregate_id, r)
        )
        return snapshot

    async def system_stats(self) -> SystemStats:
        """The number of queries and of commands processed so far."""
        stats: SystemStats = await self._call("system_stats", GetSystemStats)
        return stats

    async def aggregate_stats(self, aggregate_id: str) -> AggregateStats:
        """The aggregate's event count, current sequence and whether it has a snapshot."""
        aggregate_id = check_aggregate_id(aggregate_id)
        stats: AggregateStats = await self._call(
            "aggregate_stats", lambda r: GetAggregateStats(aggregate_id, r)
        )
        return stats


@asynccontextmanager
async def open_eventsourcing(
    *,
    eventstore: EventStore[Any, EventT, EntityT],
    handle: HandleFn[EntityT, CommandT, EventT],
    apply: ApplyFn[EntityT, EventT],
    empty_state: EntityT,
    queries: Sequence[Query] = (),
    snapshot_config: SnapshotConfig | None = None,
    options: RuntimeOptions | None = None,
    name: Name[Message] | None = None,
    call_timeout: Timeout | int | None = 30_000,
) -> AsyncIterator[EventSourcing[CommandT, EventT, EntityT]]:
    """Run an eventsourcing system for the duration of an ``async with`` block.

    Takes the arguments of :func:`trio_es.supervised` (``name`` is optional here), plus
    ``call_timeout`` in milliseconds (``None``: wait forever). The system is stopped,
    every aggregate and query task with it, when the block exits.
    """
    limit = (
        call_timeout
        if call_timeout is None or isinstance(call_timeout, Timeout)
        else Timeout(call_timeout)
    )
    name = new_name("eventsourcing") if name is None else name
    runtime = build_runtime(
        name=name,
        eventstore=eventstore,
        handle=handle,
        apply=apply,
        empty_state=empty_state,
        queries=queries,
        snapshot_config=snapshot_config,
        options=options,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.spec().start)
        yield EventSourcing(named_subject(name), limit, runtime.send)
        nursery.cancel_scope.cancel()
