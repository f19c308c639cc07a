"""The eventsourcing runtime: routing, the supervision tree, queries and options.

Shape of the supervision tree that :func:`supervised` describes::

    eventsourcing (static, one-for-one)
    ├── queries (static, one-for-one): one task per query, each reading its named mailbox
    ├── aggregates (dynamic, intensity counted per aggregate): one task per live aggregate
    └── router: reads the public subject, forwards each message to its aggregate's mailbox

What one aggregate does with its messages lives in :mod:`trio_es._aggregate`. Everything
that must survive a restart (the mailboxes and backlogs, the map of live aggregates, the
counters) lives in :class:`_Runtime`, outside the tasks, so a restarted task loses nothing.

A message reaches its aggregate's mailbox one of two ways, and both wait for nothing but
room: the Gleam-style message API sends to the public subject and the router forwards it
(``MailboxFull`` when the aggregate's mailbox is full, as the Gleam package does); the awaiting
facade puts it straight into the aggregate's mailbox, waiting for room (backpressure).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Generic, Protocol, TypeVar, final

import attrs
import outcome
import trio

from ._aggregate import AggregateTask, Live, Shared, refuse, reply
from ._errors import AggregateCrashed, MailboxFull, SystemStopped
from ._store import EventStore
from ._subject import DEFAULT_CAPACITY, CallTimers, IdleTimers, Name, Subject, named_subject
from ._supervisor import (
    ChildSpecification,
    DynamicSupervisor,
    Restart,
    StaticSupervisor,
    Strategy,
    SupervisorGaveUp,
    worker,
)
from ._types import (
    AggregateMessage,
    EventEnvelope,
    ExecuteCommand,
    ExecuteCommandWithResponse,
    ExecuteForResult,
    GetAggregateStats,
    GetSystemStats,
    LoadAggregate,
    LoadAllEvents,
    LoadEvents,
    LoadLatestSnapshot,
    Message,
    ProcessEvents,
    SnapshotConfig,
    SystemStats,
)
from ._validated import check_int, check_seconds, positive_int

__all__ = ["Query", "RuntimeOptions", "supervised"]

logger: Final = logging.getLogger("trio_es")

CommandT = TypeVar("CommandT")
EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")

_EntityT_contra = TypeVar("_EntityT_contra", contravariant=True)
_CommandT_contra = TypeVar("_CommandT_contra", contravariant=True)
_EventT_co = TypeVar("_EventT_co", covariant=True)
_EventT_contra = TypeVar("_EventT_contra", contravariant=True)


# Protocols rather than Callable aliases, for inference: mypy fixes a type variable from
# plain arguments before it looks at Callable-typed ones, so with Callable aliases
# ``empty_state=()`` would pin the state to ``tuple[()]`` and then refuse an
# ``apply(state: tuple[str, ...], ...)``; with protocols every argument counts at once.
class HandleFn(Protocol[_EntityT_contra, _CommandT_contra, _EventT_co]):
    """``handle(entity, command) -> events``; plain or async. Raise ``DomainError`` to reject.

    Any iterable of events is accepted at run time (a generator is read once); the type
    says ``Sequence`` because that is what a handle usually returns.
    """

    def __call__(
        self, entity: _EntityT_contra, command: _CommandT_contra, /
    ) -> Sequence[_EventT_co] | Awaitable[Sequence[_EventT_co]]: ...


class ApplyFn(Protocol[EntityT, _EventT_contra]):
    """``apply(entity, event) -> entity``; pure: return a new entity, change nothing."""

    def __call__(self, entity: EntityT, event: _EventT_contra, /) -> EntityT: ...


#: ``fn(aggregate_id, envelopes)``; plain or async.
QueryFn = Callable[[str, Sequence[EventEnvelope[Any]]], object]
#: A read model: the name of its mailbox and the function fed with each commit's events.
Query = tuple[Name[Any], QueryFn]

_AGGREGATE_MESSAGES: Final = (
    ExecuteCommand,
    ExecuteCommandWithResponse,
    ExecuteForResult,
    LoadAggregate,
    LoadAllEvents,
    LoadEvents,
    LoadLatestSnapshot,
    GetAggregateStats,
)
#: The first back-off before a failing query's batch is retried; it doubles each time.
_QUERY_BACKOFF: Final = 0.05


def _non_negative(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    check_int(attribute.name, value, minimum=0)


def _positive_seconds(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    check_seconds(attribute.name, value)


def _positive(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    positive_int(attribute.name, value)


@final
@attrs.frozen(kw_only=True)
class RuntimeOptions:
    """How the runtime treats aggregate tasks; the defaults suit most applications.

    Attributes:
        idle_timeout: seconds an aggregate task waits for a message before it stops and
            drops its cached state; the next message reloads it from the store.
        aggregate_intensity: restarts one aggregate may take within ``aggregate_period``
            seconds; past that it is stopped and the messages waiting for it get
            ``AggregateCrashed``. Counted per aggregate, so bugs spread over many
            aggregates never take the system down.
        aggregate_period: the window, in seconds, for ``aggregate_intensity``.
        query_intensity: how often a query whose function raises is retried on the
            same batch (the batch is redelivered, never dropped) before the query is
            stopped: logged, listed in ``SystemStats.failed_queries``, and fed nothing
            more. Commands keep flowing either way.
        query_period: the longest back-off, in seconds, between two retries of a
            failing query (it starts at 0.05 s and doubles).
        transaction_retries: how often a command whose commit failed with
            ``TransactionFailed`` (including ``ConcurrencyConflict``: another writer,
            maybe another process, got there first) is decided again on reloaded state,
            after a jittered exponential back-off, before the caller gets the error.
        mailbox_capacity: messages one aggregate's mailbox holds. The facade waits for
            room; the message API's sends are refused with ``MailboxFull``.
        shutdown_grace: seconds a commit under way when the system stops may take to
            finish (its callers then get their real reply); past that its callers get
            ``CommitOutcomeUnknown``.
        projection_retries: how often a projection whose handler raises is restarted
            from its checkpoint on the same batch before it is stopped (a poison batch):
            logged, reported ``"failed"`` in ``projection_stats``, never skipped. Store
            failures are retried for as long as they last.
        projection_backoff: the longest pause, in seconds, between two attempts of a
            failing projection (it starts at 0.05 s and doubles).
    """

    idle_timeout: float = attrs.field(default=60.0, validator=_positive_seconds)
    aggregate_intensity: int = attrs.field(default=3, validator=_non_negative)
    aggregate_period: float = attrs.field(default=5.0, validator=_positive_seconds)
    query_intensity: int = attrs.field(default=10, validator=_non_negative)
    query_period: float = attrs.field(default=5.0, validator=_positive_seconds)
    transaction_retries: int = attrs.field(default=20, validator=_non_negative)
    mailbox_capacity: int = attrs.field(default=DEFAULT_CAPACITY, validator=_positive)
    shutdown_grace: float = attrs.field(default=5.0, validator=_positive_seconds)
    projection_retries: int = attrs.field(default=5, validator=_non_negative)
    projection_backoff: float = attrs.field(default=5.0, validator=_positive_seconds)


@attrs.define(eq=False)
class _Runtime(Generic[CommandT, EventT, EntityT]):
    """State shared by the router, the aggregate tasks and the queries."""

    name: Name[Message]
    shared: Shared[CommandT, EventT, EntityT]
    queries: tuple[Query, ...]
    options: RuntimeOptions
    live: dict[str, Live] = attrs.Factory(dict)
    aggregates: DynamicSupervisor | None = None
    #: The labels of the queries that kept failing and were stopped.
    failed_queries: dict[Name[Any], str] = attrs.Factory(dict)
    #: True once the facade's block began to exit: calls are refused with SystemStopped.
    stopped: bool = False
    #: The deadlines of the facade's calls, timed by the router's task.
    call_timers: CallTimers = attrs.Factory(CallTimers)
    _public: Subject[Message] | None = attrs.field(default=None, init=False)
    _query_mailboxes: list[tuple[Name[Any], Subject[ProcessEvents[Any]]]] | None = attrs.field(
        default=None, init=False
    )

    # -- routing: synchronous, so no message can overtake another --

    def stats(self) -> SystemStats:
        return SystemStats(
            len(self.queries),
            self.shared.commands_processed,
            len(self.live),
            failed_queries=tuple(self.failed_queries.values()),
        )

    def dispatch(self, message: Message) -> None:
        """Forward a message-API message; ``MailboxFull`` goes back to its sender."""
        if isinstance(message, GetSystemStats):
            reply(message.reply_to, outcome.Value(self.stats()))
        elif isinstance(message, _AGGREGATE_MESSAGES):
            # Not `get(...) or _spawn(...)`: an empty mailbox is falsy (it has a length).
            live = self.live.get(message.aggregate_id)
            if live is None:
                live = self._spawn(message.aggregate_id)
            try:
                live.send(message)
            except MailboxFull as error:
                refuse(message, error)
        else:
            logger.error("eventsourcing %s ignored an unknown message %r", self.name.label, message)

    async def deliver(
        self, message: AggregateMessage, operation: str, deadline: float = math.inf
    ) -> bool:
        """Queue a facade call's message in its aggregate's mailbox, waiting for room.

        Returns False if ``deadline`` (Trio's clock) passed while it waited for room: the
        message was not queued. Only that wait is timed here (a full mailbox is rare):
        the caller's call timers time the rest of the call. A schedule point only when
        it waits for room (see :meth:`Mailbox.hand_over`): the caller's wait for the
        reply, which follows at once, is the call's.

        Raises:
            SystemStopped: the system stopped before the message could be queued.
            AggregateCrashed: the aggregate was given up on while the call waited.
        """
        while True:
            if self.stopped:
                raise SystemStopped(operation)
            # Messages the router has not forwarded yet were sent before this one: forward
            # them first (the router forwards synchronously, so doing it here is the same).
            # The router takes the queued ones before it forwards (in one step), so while
            # it forwards, none is queued.
            public = self._public
            if public is None:
                public = self._public = named_subject(self.name)
            if not public.forwarding:
                while len(public):
                    self.dispatch(public.get_nowait())
            live = self.live.get(message.aggregate_id)
            if live is None:
                live = self._spawn(message.aggregate_id)
            try:
                return await live.hand_over(message, deadline)
            except trio.ClosedResourceError:
                if live.closed_error is not None and not self.stopped:
                    raise live.closed_error from None
                # (else the loop raises SystemStopped)

    def _spawn(self, aggregate_id: str) -> Live:
        live = Live(aggregate_id, self.options.mailbox_capacity)
        self.live[aggregate_id] = live
        self._start(live)
        return live

    def _start(self, live: Live) -> None:
        if self.aggregates is None or self.stopped:
            # The aggregate supervisor is restarting; it starts every queued mailbox when up.
            return
        child = _AggregateChild(self, live)
        try:
            # Without a ChildSpecification (one per first visit); named by the mailbox's
            # label, so one string serves both. Not stoppable alone: an aggregate ends by
            # retiring (returning) or with the whole system, so it needs no scope for that.
            self.aggregates._start_child(
                child, Restart.TRANSIENT, live.label, live.label, child.gave_up, stoppable=False
            )
        except RuntimeError:
            # The supervisor is stopping: the final sweep answers what is queued.
            return

    def _gave_up(self, live: Live, error: SupervisorGaveUp) -> None:
        aggregate_id = live.aggregate_id
        if self.live.get(aggregate_id) is live:
            del self.live[aggregate_id]
        cause = error.__cause__
        crashed = AggregateCrashed(aggregate_id=aggregate_id, restarts=error.restarts)
        crashed.__cause__ = cause
        for message in live.close_for_good(crashed):
            refuse(message, crashed)

    def _retire(self, live: Live) -> bool:
        """Forget an aggregate idle for ``idle_timeout``, unless a message arrived meanwhile."""
        if not live.idle():
            return False
        if self.live.get(live.aggregate_id) is live:
            del self.live[live.aggregate_id]
        return True

    # -- stopping (the facade's block exits) --

    def begin_stop(self) -> None:
        """Refuse new calls; commits under way get ``shutdown_grace`` to finish."""
        self.stopped = True
        self.shared.begin_stop()

    def finish_stop(self) -> None:
        """Answer every message still queued anywhere with ``SystemStopped``.

        Runs once every task has ended: nothing of these messages was committed. Senders
        still waiting for room in a mailbox wake with ``SystemStopped`` too.
        """
        stopped = SystemStopped("the call")
        for live in list(self.live.values()):
            for message in live.close_for_good(stopped):
                refuse(message, SystemStopped(_operation(message)))
        self.live.clear()
        public = named_subject(self.name)
        while True:
            try:
                queued = public.get_nowait()
            except trio.WouldBlock:
                break
            refuse(queued, SystemStopped(_operation(queued)))

    # -- queries --

    async def publish(self, aggregate_id: str, envelopes: Sequence[EventEnvelope[EventT]]) -> None:
        """Feed one commit's events to every query that has not been stopped."""
        mailboxes = self._query_mailboxes
        if mailboxes is None:
            # Once per system: a RunVar lookup per query per commit is not free.
            mailboxes = self._query_mailboxes = [
                (query_name, named_subject(query_name)) for query_name, _ in self.queries
            ]
        for query_name, mailbox in mailboxes:
            if query_name in self.failed_queries:
                continue
            # Waiting for room (rather than dropping) keeps every query complete.
            await mailbox.send_wait(ProcessEvents(aggregate_id, envelopes))

    async def _run_query(
        self,
        name: Name[Any],
        fn: QueryFn,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Feed a query each commit's events, in commit order for each aggregate.

        A batch that makes ``fn`` raise is delivered again after a back-off; after
        ``query_intensity`` retries the query is stopped and reported, and the batches
        still queued for it are dropped so that commands never wait on it.
        """
        mailbox: Subject[ProcessEvents[Any]] = named_subject(name)
        is_async = inspect.iscoroutinefunction(fn)
        task_status.started()
        if name in self.failed_queries:
            await _discard_forever(mailbox)
        while True:
            message = await mailbox.get()
            failures = 0
            while True:
                try:
                    result = fn(message.aggregate_id, message.events)
                    if is_async:
                        await result  # type: ignore[misc]
                    break
                except Exception as error:
                    failures += 1
                    if failures > self.options.query_intensity:
                        logger.error(
                            "query %s failed %d times on the events of aggregate %r "
                            "(last: %r); it is stopped and gets no more events",
                            name.label,
                            failures,
                            message.aggregate_id,
                            error,
                        )
                        self.failed_queries[name] = name.label
                        await _discard_forever(mailbox)
                    delay = min(self.options.query_period, _QUERY_BACKOFF * 2 ** (failures - 1))
                    logger.warning(
                        "query %s raised %r on the events of aggregate %r; retrying in %g s "
                        "(retry %d of %d)",
                        name.label,
                        error,
                        message.aggregate_id,
                        delay,
                        failures,
                        self.options.query_intensity,
                    )
                    del error
                    await trio.sleep(delay)

    # -- the supervision tree --

    def spec(self) -> ChildSpecification:
        queries = StaticSupervisor(
            Strategy.ONE_FOR_ONE,
            intensity=self.options.query_intensity,
            period=self.options.query_period,
            name=f"{self.name.label} queries",
        )
        for query_name, fn in self.queries:
            queries.add(worker(functools.partial(self._run_query, query_name, fn), name=query_name))
        return (
            StaticSupervisor(Strategy.ONE_FOR_ONE, name=self.name.label)
            .add(queries.supervised())
            .add(worker(self._run_aggregates, name=f"{self.name.label} aggregates"))
            .add(worker(self._run_router, name=self.name))
            .supervised()
        )

    async def _run_aggregates(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        supervisor = DynamicSupervisor(
            intensity=self.options.aggregate_intensity,
            period=self.options.aggregate_period,
            per_child=True,
            name=f"{self.name.label} aggregates",
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            self.aggregates = supervisor
            try:
                # After a restart of this supervisor, serve the mailboxes that survived it.
                for live in list(self.live.values()):
                    self._start(live)
                task_status.started()
                # This task times every waiting aggregate's idle deadline.
                await self.shared.idle.run()
            finally:
                self.aggregates = None

    async def _run_router(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        mailbox = named_subject(self.name)
        # Messages sent while the router was down come first; from then on each message
        # is forwarded during its send, so none can overtake another.
        while len(mailbox):
            self.dispatch(mailbox.get_nowait())
        mailbox.forward_to(self.dispatch)
        try:
            task_status.started()
            # This task also times the facade's calls (see CallTimers).
            await self.call_timers.run()
        finally:
            mailbox.forward_to(None)


@final
@attrs.define(eq=False, slots=True)
class _AggregateChild:
    """One aggregate as a supervisor's child: its start function and its callbacks.

    One small object instead of a closure or a ``functools.partial`` for each of them:
    it lives as long as the aggregate, and there may be 100,000 live aggregates.
    """

    runtime: _Runtime[Any, Any, Any]
    live: Live

    def __call__(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> Awaitable[None]:
        """A fresh :class:`AggregateTask`'s loop, for each (re)start of the aggregate.

        A plain function returning the coroutine, so that the supervisor awaits the loop
        itself: a wrapping ``async def`` would keep one more frame alive per live
        aggregate. The dynamic supervisor does not wait for ``task_status``.
        """
        live = self.live
        task: AggregateTask[Any, Any, Any] = AggregateTask(
            self.runtime.shared, live.aggregate_id, live
        )
        return task.run()

    def gave_up(self, error: SupervisorGaveUp) -> None:
        """The aggregate kept crashing and was stopped: answer what waits for it."""
        self.runtime._gave_up(self.live, error)


async def _discard_forever(mailbox: Subject[Any]) -> None:
    """Drain a stopped query's mailbox for good, so that no publisher waits on it."""
    while True:
        await mailbox.get()


def _operation(message: object) -> str:
    return {
        ExecuteCommand: "execute",
        ExecuteCommandWithResponse: "execute",
        ExecuteForResult: "execute",
        LoadAggregate: "load_aggregate",
        LoadAllEvents: "load_events",
        LoadEvents: "load_events",
        LoadLatestSnapshot: "latest_snapshot",
        GetAggregateStats: "aggregate_stats",
        GetSystemStats: "system_stats",
    }.get(type(message), "the call")


def supervised(
    *,
    name: Name[Message],
    eventstore: EventStore[Any, EventT, EntityT],
    handle: HandleFn[EntityT, CommandT, EventT],
    apply: ApplyFn[EntityT, EventT],
    empty_state: EntityT,
    queries: Sequence[Query] = (),
    snapshot_config: SnapshotConfig | None = None,
    options: RuntimeOptions | None = None,
) -> ChildSpecification:
    """Describe an eventsourcing system as a child to start under a supervisor.

    Once started, ``named_subject(name)`` is its subject: send it messages with
    :func:`execute`, :func:`load_aggregate` and the other public functions. Commands for
    one aggregate run one at a time in the order they were sent; different aggregates
    run concurrently. Each commit runs handle -> apply -> commit -> snapshot if due ->
    publish to queries -> reply, so queries only ever see committed events.

    Args:
        name: the name the public subject is registered under.
        eventstore: where events and snapshots are kept.
        handle: ``handle(entity, command) -> list[event]``, plain or async; raises
            ``DomainError`` to reject a command. Any other exception is a bug: the
            caller gets it and the aggregate's task restarts from the store.
        apply: ``apply(entity, event) -> entity``, pure.
        empty_state: the entity before its first event.
        queries: ``(name, fn)`` pairs; ``fn(aggregate_id, envelopes)`` (plain or async)
            receives each commit's events, per aggregate in commit order.
        snapshot_config: save snapshots every ``frequency`` events, or ``None`` for none.
        options: idle timeout, restart intensities, retries, mailbox capacity.
    """
    return build_runtime(
        name=name,
        eventstore=eventstore,
        handle=handle,
        apply=apply,
        empty_state=empty_state,
        queries=queries,
        snapshot_config=snapshot_config,
        options=options,
    ).spec()


def build_runtime(
    *,
    name: Name[Message],
    eventstore: EventStore[Any, EventT, EntityT],
    handle: HandleFn[EntityT, CommandT, EventT],
    apply: ApplyFn[EntityT, EventT],
    empty_state: EntityT,
    queries: Sequence[Query],
    snapshot_config: SnapshotConfig | None,
    options: RuntimeOptions | None,
) -> _Runtime[CommandT, EventT, EntityT]:
    """The runtime behind :func:`supervised`; the facade keeps it for :meth:`_Runtime.send`."""
    every = None if snapshot_config is None else snapshot_config.frequency.n
    options = RuntimeOptions() if options is None else options
    queries = tuple(queries)
    runtime: _Runtime[CommandT, EventT, EntityT]

    async def publish(aggregate_id: str, envelopes: Sequence[EventEnvelope[EventT]]) -> None:
        await runtime.publish(aggregate_id, envelopes)

    def retire(live: Live) -> bool:
        return runtime._retire(live)

    shared: Shared[CommandT, EventT, EntityT] = Shared(
        store=eventstore,
        handle=handle,
        apply=apply,
        empty_state=empty_state,
        snapshot_every=every,
        transaction_retries=options.transaction_retries,
        shutdown_grace=options.shutdown_grace,
        publish=publish,
        idle=IdleTimers(options.idle_timeout),
        retire=retire,
    )
    runtime = _Runtime(name=name, shared=shared, queries=queries, options=options)
    return runtime
