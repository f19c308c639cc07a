"""An async facade over the runtime, for Trio code that awaits results.

``open_eventsourcing`` starts the whole supervision tree in a nursery of its own and
stops it when the block exits. Each call puts its message straight into its aggregate's
mailbox, waiting for room instead of raising ``MailboxFull`` (backpressure: memory stays
bounded by the mailboxes plus one message per waiting caller), then waits for the reply;
``call_timeout`` bounds the whole call. The wait for the reply is timed by the runtime's
:class:`~._subject.CallTimers` (one task for every call) instead of a cancel scope per call;
a call that waits for room in a full mailbox, or outlives that task, times itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, TypeVar, final

import attrs
import trio

from ._errors import ActorTimeout, SystemStopped
from ._memory_store import MemoryStore, SupervisedMemoryStore
from ._projection import Projection, ProjectionRunner, check_projections
from ._runtime import ApplyFn, HandleFn, Query, RuntimeOptions, _Runtime, build_runtime
from ._store import EventStore
from ._subject import (
    CALL_EXPIRED,
    CALL_UNTIMED,
    Name,
    Subject,
    named_subject,
    new_name,
    new_reply,
)
from ._subscription import check_source
from ._types import (
    Aggregate,
    AggregateMessage,
    AggregateStats,
    EventEnvelope,
    ExecuteForResult,
    ExecuteResult,
    GetAggregateStats,
    LoadAggregate,
    LoadEvents,
    LoadLatestSnapshot,
    Message,
    ProjectionStats,
    Reply,
    Snapshot,
    SnapshotConfig,
    SystemStats,
    check_aggregate_id,
    metadata_tuple,
)
from ._validated import Timeout, check_int, check_start_from

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
    _projections: dict[str, ProjectionRunner[Any]] = attrs.field(factory=dict, repr=False)

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
        deadline = trio.current_time() + limit.seconds
        timers = runtime.call_timers
        if timers.watch(reply, deadline):
            # Timed by the system's call timers, not a cancel scope per call (entering and
            # leaving one cost more than the rest of a call's hand-off); see CallTimers.
            try:
                result = (
                    await reply.get()
                    if await runtime.deliver(message, operation, deadline)
                    else CALL_EXPIRED
                )
            finally:
                timers.forget(reply)
            if result is CALL_EXPIRED:
                raise ActorTimeout(operation, limit.milliseconds)
            if result is not CALL_UNTIMED:
                return result.unwrap()
            # The timers stopped while this call waited: it times the rest itself.
            with trio.CancelScope(deadline=deadline) as scope:
                result = await reply.get()
        else:
            with trio.CancelScope(deadline=deadline) as scope:
                await runtime.deliver(message, operation)
                result = await reply.get()
        if scope.cancelled_caught:
            raise ActorTimeout(operation, limit.milliseconds)
        return result.unwrap()

    async def execute(
        self, aggregate_id: str, command: CommandT, metadata: Iterable[tuple[str, str]] = ()
    ) -> ExecuteResult:
        """Run ``command`` on the aggregate and return once its events are committed.

        Returns the aggregate's sequence after the command and the ``global_position``
        of its last event (``None`` when it emitted none): pass that to
        :meth:`wait_for_projection` to read your own write from a projection.

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
        result: ExecuteResult = await self._call(
            "execute", lambda r: ExecuteForResult(aggregate_id, command, pairs, r)
        )
        return result

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

    def _projection(self, operation: str, name: object) -> ProjectionRunner[Any]:
        runtime = self._runtime
        if runtime is None or runtime.stopped:
            raise SystemStopped(operation)
        runner = self._projections.get(name) if isinstance(name, str) else None
        if runner is None:
            known = ", ".join(map(repr, self._projections)) or "none"
            raise ValueError(
                f"no projection named {name!r} runs in this system (projections: {known}); "
                "pass it in open_eventsourcing(projections=[...])"
            )
        return runner

    async def _bounded(self, operation: str, fn: Callable[[], Any]) -> Any:
        limit = self.call_timeout
        if limit is None:
            return await fn()
        try:
            with trio.fail_after(limit.seconds):
                return await fn()
        except trio.TooSlowError:
            raise ActorTimeout(operation, limit.milliseconds) from None

    async def wait_for_projection(self, name: str, position: int | None) -> None:
        """Return once projection ``name`` has processed every event up to ``position``.

        Read-your-writes: ``result = await es.execute(...)``, then
        ``await es.wait_for_projection("balances", result.global_position)``, then read
        the read model: it includes the command's events. ``None`` (a command that
        emitted nothing) returns at once. Works in every process that runs the
        projection, also where it is a standby (it follows the stored checkpoint, so it
        returns within about half a second of the active process getting there).

        Raises:
            ValueError: no projection of that name runs in this system.
            ProjectionFailed: it stopped (a poison batch) before getting there.
            ActorTimeout: it did not get there within ``call_timeout``.
        """
        runner = self._projection("wait_for_projection", name)
        if position is None:
            await trio.lowlevel.checkpoint()
            return
        target = check_int("position", position, minimum=0)
        await self._bounded("wait_for_projection", lambda: runner.wait(target))

    async def projection_stats(self) -> dict[str, ProjectionStats]:
        """Every projection's position, the store's head, lag, status and events/s.

        Raises:
            EventStoreError: the store's head position could not be read.
            ActorTimeout: the store did not answer within ``call_timeout``.
        """
        runtime = self._runtime
        if runtime is None or runtime.stopped:
            raise SystemStopped("projection_stats")

        async def gather() -> dict[str, ProjectionStats]:
            return {name: await runner.stats() for name, runner in self._projections.items()}

        stats: dict[str, ProjectionStats] = await self._bounded("projection_stats", gather)
        return stats

    async def rebuild_projection(
        self, name: str, *, on_progress: Callable[[int, int], object] | None = None
    ) -> int:
        """Reset projection ``name``'s checkpoint (and its read model) and replay it.

        Runs the projection's ``reset`` (with ``transactional=True`` in the transaction
        that sets the checkpoint to 0), then replays every event; returns the head
        position it replayed up to, once it got there. ``on_progress(position, head)`` is
        called as the replay advances. In a process where the projection is a standby,
        the rebuild happens when this process takes it over. Not bounded by
        ``call_timeout`` (a replay may take long): wrap it in your own cancel scope; once
        the reset happened, cancelling the call does not stop the replay.

        Raises:
            ValueError: no projection of that name runs in this system.
            ProjectionFailed: the projection is stopped or failed.
        """
        runner = self._projection("rebuild_projection", name)
        return await runner.rebuild(on_progress)

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
    projections: Sequence[Projection[Any]] = (),
) -> AbstractAsyncContextManager[EventSourcing[CommandT, EventT, EntityT]]:
    """Run an eventsourcing system for the duration of an ``async with`` block.

    Takes the arguments of :func:`trio_es.supervised` (``name`` is optional here), plus
    ``call_timeout`` in milliseconds (``None``: wait forever) and ``projections``:
    durable read models (see :class:`~trio_es.Projection`), each run by a task of its
    own that resumes from its stored checkpoint. The system is stopped, every aggregate,
    query and projection task with it, when the block exits: commits under way finish
    (within ``RuntimeOptions.shutdown_grace``) and answer their callers, calls still
    queued and calls made afterwards raise ``SystemStopped``; each projection's
    checkpoint covers every batch it finished.

    Raises:
        TypeError: ``projections`` holds something else than ``Projection`` objects, the
            store cannot feed projections, or a transactional projection is given a
            memory store.
        ValueError: two projections share a name.
    """
    limit = (
        call_timeout
        if call_timeout is None or isinstance(call_timeout, Timeout)
        else Timeout(call_timeout)
    )
    checked = check_projections(projections)
    if checked:
        source = check_source(eventstore, "eventstore")
        for projection in checked:
            if projection.transactional and isinstance(source, MemoryStore | SupervisedMemoryStore):
                raise TypeError(
                    f"projection {projection.name!r} is transactional, which needs a "
                    "database transaction: use SqliteStore or PostgresStore, or pass "
                    "transactional=False with the memory store"
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
    options = runtime.options
    runners = {
        projection.name: ProjectionRunner(
            projection,
            eventstore,  # type: ignore[arg-type]  # checked by check_source above
            options.projection_retries,
            options.projection_backoff,
            options.shutdown_grace,
        )
        for projection in checked
    }
    # A plain function around a private generator: mypy infers the type parameters from
    # every argument at once this way (an @asynccontextmanager function loses that).
    return _running(runtime, limit, runners)


@asynccontextmanager
async def _running(
    runtime: _Runtime[CommandT, EventT, EntityT],
    limit: Timeout | None,
    runners: dict[str, ProjectionRunner[Any]],
) -> AsyncIterator[EventSourcing[CommandT, EventT, EntityT]]:
    """Run ``runtime``'s supervision tree while the block runs; stop it afterwards."""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.spec().start)
            for runner in runners.values():
                await nursery.start(runner.run)
            try:
                yield EventSourcing(named_subject(runtime.name), limit, runtime, runners)
            finally:
                # Calls from now on fail at once; commits under way get a grace period.
                runtime.begin_stop()
                nursery.cancel_scope.cancel()
    finally:
        runtime.finish_stop()
