"""An async facade over the runtime, for Trio code that awaits results.

``open_eventsourcing`` starts the whole supervision tree in a nursery of its own and
stops it when the block exits. Each call puts its message straight into its aggregate's
mailbox, waiting for room instead of raising ``MailboxFull`` (backpressure: memory stays
bounded by the mailboxes plus one message per waiting caller), then waits for the reply;
``call_timeout`` bounds the whole call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, TypeVar, final

import attrs
import trio

from ._errors import ActorTimeout, SystemStopped
from ._runtime import ApplyFn, HandleFn, Query, RuntimeOptions, _Runtime, build_runtime
from ._store import EventStore
from ._subject import Name, Subject, named_subject, new_name, new_reply
from ._types import (
    Aggregate,
    AggregateMessage,
    AggregateStats,
    EventEnvelope,
    ExecuteCommandWithResponse,
    GetAggregateStats,
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
from ._validated import Timeout, check_start_from

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
    an ``execute`` returned sees that command's effect. Every call ends within
    ``call_timeout`` (then raises ``ActorTimeout``), or waits as long as it takes if it
    is ``None``; wrap calls in your own Trio cancel scopes for finer control.

    What a caller may assume when ``execute`` ends:

    * it returned: the command's events are committed, exactly once, and the queries
      were handed them;
    * ``DomainError``, ``TypeError`` (``handle`` returned no sequence), ``EventStoreError``
      (other than ``CommitOutcomeUnknown``), ``TransactionFailed``, a crash's own
      exception, ``AggregateCrashed`` or ``SystemStopped``: nothing of it was committed;
    * ``CommitOutcomeUnknown``, ``ActorTimeout`` or a cancellation of the caller: it may
      or may not be committed (it is never committed twice); read the aggregate's events
      to find out. A cancelled or timed-out command that was already queued still runs,
      and its events still reach every query.

    Attributes:
        subject: the public subject, for the message API (``execute``, ``receive`` ...).
        call_timeout: the longest a call may take.
    """

    subject: Subject[Message]
    call_timeout: Timeout | None = Timeout(30_000)
    _runtime: _Runtime[Any, Any, Any] | None = attrs.field(default=None, repr=False)

    async def _call(self, operation: str, make: Callable[[Reply[Any]], AggregateMessage]) -> Any:
        runtime = self._runtime
        if runtime is None or runtime.stopped:
            # Raised before any await: a call after the block exited fails at once.
            raise SystemStopped(operation)
        reply: Reply[Any] = new_reply(f"{operation} reply")
        message = make(reply)
        limit = self.call_timeout
        if limit is None:
            await runtime.deliver(message, operation)
            return (await reply.get()).unwrap()
        try:
            with trio.fail_after(limit.seconds):
                await runtime.deliver(message, operation)
                result = await reply.get()
        except trio.TooSlowError:
            raise ActorTimeout(operation, limit.milliseconds) from None
        return result.unwrap()

    async def execute(
        self, aggregate_id: str, command: CommandT, metadata: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Run ``command`` on the aggregate and return once its events are committed.

        Raises:
            DomainError: the domain rejected the command; nothing was committed.
            TransactionFailed: the commit kept failing after the configured retries;
                nothing was committed.
            CommitOutcomeUnknown: the store could not tell whether the commit landed.
            EventStoreError: the store refused the events (e.g. they cannot be
                serialized) or failed; nothing was committed.
            TypeError: ``handle`` returned something that is not a sequence of events.
            ActorTimeout: no reply within ``call_timeout``: maybe committed.
            SystemStopped: the system stopped before the command ran.
            Exception: ``handle`` or ``apply`` crashed on this command (the aggregate's
                task restarts); nothing was committed.
        """
        aggregate_id = check_aggregate_id(aggregate_id)
        pairs = metadata_tuple(metadata)
        await self._call(
            "execute", lambda r: ExecuteCommandWithResponse(aggregate_id, command, pairs, r)
        )

    async def load_aggregate(self, aggregate_id: str) -> Aggregate[EntityT]:
        """The aggregate's current state, caught up with the store first.

        Other processes' commits to the same store are included.

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
        """The number of queries, of commands processed so far, of live aggregates."""
        runtime = self._runtime
        if runtime is None or runtime.stopped:
            raise SystemStopped("system_stats")
        await trio.lowlevel.checkpoint()
        return runtime.stats()

    async def aggregate_stats(self, aggregate_id: str) -> AggregateStats:
        """The aggregate's event count, current sequence and whether it has a snapshot."""
        aggregate_id = check_aggregate_id(aggregate_id)
        stats: AggregateStats = await self._call(
            "aggregate_stats", lambda r: GetAggregateStats(aggregate_id, r)
        )
        return stats


def open_eventsourcing(
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
) -> AbstractAsyncContextManager[EventSourcing[CommandT, EventT, EntityT]]:
    """Run an eventsourcing system for the duration of an ``async with`` block.

    Takes the arguments of :func:`trio_es.supervised` (``name`` is optional here), plus
    ``call_timeout`` in milliseconds (``None``: wait forever). The system is stopped,
    every aggregate and query task with it, when the block exits: commits under way
    finish (within ``RuntimeOptions.shutdown_grace``) and answer their callers, calls
    still queued and calls made afterwards raise ``SystemStopped``.
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
    # A plain function around a private generator: mypy infers the type parameters from
    # every argument at once this way (an @asynccontextmanager function loses that).
    return _running(runtime, limit)


@asynccontextmanager
async def _running(
    runtime: _Runtime[CommandT, EventT, EntityT], limit: Timeout | None
) -> AsyncIterator[EventSourcing[CommandT, EventT, EntityT]]:
    """Run ``runtime``'s supervision tree while the block runs; stop it afterwards."""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.spec().start)
            try:
                yield EventSourcing(named_subject(runtime.name), limit, runtime)
            finally:
                # Calls from now on fail at once; commits under way get a grace period.
                runtime.begin_stop()
                nursery.cancel_scope.cancel()
    finally:
        runtime.finish_stop()
