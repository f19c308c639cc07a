"""The eventsourcing runtime: a router, one supervised task per live aggregate, query tasks.

Shape of the supervision tree that :func:`supervised` describes::

    eventsourcing (static, one-for-one)
    ├── queries (static, one-for-one): one task per query, each reading its named mailbox
    ├── aggregates (dynamic, intensity counted per aggregate): one task per live aggregate
    └── router: reads the public subject, forwards each message to its aggregate's mailbox

Everything that must survive a restart (the mailboxes, the map of live aggregates, the
counters) lives in :class:`_Runtime`, outside the tasks, so a restarted task loses nothing.
"""

from __future__ import annotations

import collections
import functools
import inspect
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Generic, TypeVar, final

import attrs
import outcome
import trio

from ._errors import (
    AggregateCrashed,
    DomainError,
    EntityNotFound,
    MailboxFull,
    TransactionFailed,
)
from ._store import EventStore
from ._subject import DEFAULT_CAPACITY, Name, Subject, named_subject
from ._supervisor import (
    ChildHandle,
    ChildSpecification,
    DynamicSupervisor,
    Restart,
    StaticSupervisor,
    Strategy,
    SupervisorGaveUp,
    worker,
)
from ._types import (
    Aggregate,
    AggregateMessage,
    AggregateStats,
    EventEnvelope,
    ExecuteCommand,
    ExecuteCommandWithResponse,
    GetAggregateStats,
    GetSystemStats,
    LoadAggregate,
    LoadAllEvents,
    LoadEvents,
    LoadLatestSnapshot,
    Message,
    Metadata,
    ProcessEvents,
    Snapshot,
    SnapshotConfig,
    SystemStats,
    utc_now,
)
from ._validated import positive_int

__all__ = ["Query", "RuntimeOptions", "supervised"]

logger: Final = logging.getLogger("trio_es")

CommandT = TypeVar("CommandT")
EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")

#: ``handle(entity, command) -> events``; plain or async. Raise ``DomainError`` to reject.
HandleFn = Callable[[EntityT, CommandT], Sequence[EventT] | Awaitable[Sequence[EventT]]]
#: ``apply(entity, event) -> entity``; pure.
ApplyFn = Callable[[EntityT, EventT], EntityT]
#: ``fn(aggregate_id, envelopes)``; plain or async.
QueryFn = Callable[[str, Sequence[EventEnvelope[Any]]], object]
#: A read model: the name of its mailbox and the function fed with each commit's events.
Query = tuple[Name[Any], QueryFn]

_EXECUTES: Final = (ExecuteCommand, ExecuteCommandWithResponse)
#: The most commands of one aggregate that one commit takes.
_MAX_PIPELINE: Final = 64
_AGGREGATE_MESSAGES: Final = (
    ExecuteCommand,
    ExecuteCommandWithResponse,
    LoadAggregate,
    LoadAllEvents,
    LoadEvents,
    LoadLatestSnapshot,
    GetAggregateStats,
)


def _non_negative(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be an int >= 0 (got {value!r})")


def _positive_seconds(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{attribute.name} must be a positive number of seconds (got {value!r})")


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
        query_intensity: restarts the query tasks may take within ``query_period``
            seconds before their supervisor gives up (and escalates).
        query_period: the window, in seconds, for ``query_intensity``.
        transaction_retries: how often a command whose commit failed with
            ``TransactionFailed`` (including ``ConcurrencyConflict``) is retried on
            reloaded state before the caller gets the error.
        mailbox_capacity: messages one aggregate's mailbox holds before sends to it
            are refused with ``MailboxFull``.
    """

    idle_timeout: float = attrs.field(default=60.0, validator=_positive_seconds)
    aggregate_intensity: int = attrs.field(default=3, validator=_non_negative)
    aggregate_period: float = attrs.field(default=5.0, validator=_positive_seconds)
    query_intensity: int = attrs.field(default=10, validator=_non_negative)
    query_period: float = attrs.field(default=5.0, validator=_positive_seconds)
    transaction_retries: int = attrs.field(default=3, validator=_non_negative)
    mailbox_capacity: int = attrs.field(default=DEFAULT_CAPACITY, validator=_positive)


def _reply(reply_to: Subject[outcome.Outcome[Any]] | None, result: outcome.Outcome[Any]) -> None:
    """Answer a caller; a caller that stopped listening must not crash the aggregate."""
    if reply_to is None:
        return
    try:
        reply_to.send(result)
    except MailboxFull:
        logger.warning("dropped a reply to %s: its mailbox is full", reply_to.label)


@attrs.frozen
class _Crashed:
    """Sent to an aggregate's own task when a message processed for it elsewhere crashed."""

    error: Exception


@attrs.define(eq=False)
class _Live:
    """A live aggregate: its mailbox (which outlives restarts) and its task's handle.

    ``lock`` is held while a message is processed, by the aggregate's task or by a caller
    processing its own message in place (see :meth:`_Runtime.send`): one message at a time.
    """

    mailbox: Subject[AggregateMessage | _Crashed]
    handle: ChildHandle | None = None
    lock: trio.Lock = attrs.Factory(trio.Lock)
    #: The task's state once loaded; None while it (re)loads or after it ended.
    task: _AggregateTask[Any, Any, Any] | None = None
    last_active: float = 0.0
    #: Messages taken from the mailbox but not processed yet (they come before the
    #: mailbox's); kept here, not in the task, so that a restart keeps them too.
    backlog: collections.deque[AggregateMessage | _Crashed] = attrs.Factory(collections.deque)
    #: How many backlog messages must be processed one by one (a batch fell apart).
    one_by_one: int = 0


@attrs.define(eq=False)
class _Runtime(Generic[CommandT, EventT, EntityT]):
    """State shared by the router, the aggregate tasks and the queries."""

    name: Name[Message]
    store: EventStore[Any, EventT, EntityT]
    handle: HandleFn[EntityT, CommandT, EventT]
    apply: ApplyFn[EntityT, EventT]
    empty_state: EntityT
    queries: tuple[Query, ...]
    snapshot_every: int | None
    options: RuntimeOptions
    handle_is_async: bool = attrs.field(init=False)
    live: dict[str, _Live] = attrs.Factory(dict)
    aggregates: DynamicSupervisor | None = None
    commands_processed: int = 0
    _subject: Subject[Message] | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.handle_is_async = inspect.iscoroutinefunction(self.handle)

    # -- router side: synchronous, so no message can overtake another --

    def dispatch(self, message: Message) -> None:
        if isinstance(message, GetSystemStats):
            stats = SystemStats(len(self.queries), self.commands_processed, len(self.live))
            _reply(message.reply_to, outcome.Value(stats))
        elif isinstance(message, _AGGREGATE_MESSAGES):
            live = self.live.get(message.aggregate_id) or self._spawn(message.aggregate_id)
            try:
                live.mailbox.send(message)
            except MailboxFull as error:
                _refuse(message, error)
        else:
            logger.error("eventsourcing %s ignored an unknown message %r", self.name.label, message)

    def _spawn(self, aggregate_id: str) -> _Live:
        live = _Live(
            Subject(capacity=self.options.mailbox_capacity, label=f"aggregate {aggregate_id!r}")
        )
        self.live[aggregate_id] = live
        self._start(aggregate_id, live)
        return live

    def _start(self, aggregate_id: str, live: _Live) -> None:
        if self.aggregates is None:
            # The aggregate supervisor is restarting; it starts every queued mailbox when up.
            return

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            await _AggregateTask(self, aggregate_id, live).run()

        live.handle = self.aggregates.start_child(
            worker(run, restart=Restart.TRANSIENT, name=f"aggregate {aggregate_id!r}"),
            on_give_up=functools.partial(self._gave_up, aggregate_id, live),
        )

    def _gave_up(self, aggregate_id: str, live: _Live, error: SupervisorGaveUp) -> None:
        if self.live.get(aggregate_id) is live:
            del self.live[aggregate_id]
        crashed = AggregateCrashed(aggregate_id=aggregate_id, restarts=error.restarts)
        crashed.__cause__ = error.__cause__
        waiting = [*live.backlog]
        live.backlog.clear()
        while True:
            try:
                waiting.append(live.mailbox.get_nowait())
            except trio.WouldBlock:
                break
        for message in waiting:
            if not isinstance(message, _Crashed):
                _refuse(message, crashed)

    def retire(self, aggregate_id: str, live: _Live) -> bool:
        """Forget an idle aggregate, unless a message arrived for it meanwhile."""
        idle_for = trio.current_time() - live.last_active
        busy = len(live.mailbox) or live.backlog or live.lock.locked()
        if busy or idle_for < self.options.idle_timeout:
            return False
        if self.live.get(aggregate_id) is live:
            del self.live[aggregate_id]
        return True

    # -- the supervision tree --

    def spec(self) -> ChildSpecification:
        queries = StaticSupervisor(
            Strategy.ONE_FOR_ONE,
            intensity=self.options.query_intensity,
            period=self.options.query_period,
            name=f"{self.name.label} queries",
        )
        for query_name, fn in self.queries:
            queries.add(worker(functools.partial(_run_query, query_name, fn), name=query_name))
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
                for aggregate_id, live in list(self.live.items()):
                    self._start(aggregate_id, live)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self.aggregates = None

    async def _run_router(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        mailbox = named_subject(self.name)
        task_status.started()
        while True:
            self.dispatch(await mailbox.get())

    async def send(self, message: Message) -> None:
        """Deliver ``message`` as the public subject would, skipping hops when that is safe.

        The router only forwards; while it is idle (waiting on an empty mailbox, holding
        no message) forwarding here instead cannot reorder anything. Likewise, while the
        aggregate's task is idle (state loaded, mailbox empty, nothing in hand) the
        caller processes its own message in place, holding the aggregate's lock, exactly
        as the task would: no task switch at all. Otherwise the message queues behind the
        others, waiting for room.
        """
        mailbox = self._subject
        if mailbox is None:
            # Once per system: a RunVar lookup is not free on the per-command path.
            mailbox = self._subject = named_subject(self.name)
        if not mailbox.idle_reader():
            await mailbox.send_wait(message)
            return
        if isinstance(message, _AGGREGATE_MESSAGES):
            live = self.live.get(message.aggregate_id)
            if (
                live is not None
                and live.task is not None
                and not live.task.stale
                and not live.lock.locked()
                and not live.backlog
                and live.mailbox.idle_reader()
            ):
                live.lock.acquire_nowait()
                try:
                    await live.task.process_in_place(message)
                finally:
                    live.lock.release()
                return
        self.dispatch(message)
        await trio.lowlevel.checkpoint()


def _refuse(message: Message, error: BaseException) -> None:
    reply_to = getattr(message, "reply_to", None)
    if reply_to is None:
        logger.error("dropped %r: %s", message, error)
    else:
        _reply(reply_to, outcome.Error(error))


async def _run_query(
    name: Name[Any], fn: QueryFn, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Feed a query the events of each commit, in commit order for each aggregate."""
    mailbox: Subject[ProcessEvents[Any]] = named_subject(name)
    is_async = inspect.iscoroutinefunction(fn)
    task_status.started()
    while True:
        message = await mailbox.get()
        result = fn(message.aggregate_id, message.events)
        if is_async:
            await result  # type: ignore[misc]


@attrs.define(eq=False)
class _AggregateTask(Generic[CommandT, EventT, EntityT]):
    """One live aggregate: its cached state and the loop that serves its mailbox.

    Messages for one aggregate are processed one at a time, in the order they were sent.
    """

    rt: _Runtime[CommandT, EventT, EntityT]
    aggregate_id: str
    live: _Live
    entity: Any = None
    sequence: int = 0
    has_snapshot: bool = False
    #: The cached state may be wrong (a message processed in place failed): reload it.
    stale: bool = False

    async def run(self) -> None:
        live = self.live
        mailbox = live.mailbox
        idle_timeout = self.rt.options.idle_timeout
        try:
            await self._load()
            live.task = self
            while True:
                message: AggregateMessage | _Crashed | None
                if live.backlog:
                    message = live.backlog.popleft()
                else:
                    try:
                        message = mailbox.get_nowait()
                    except trio.WouldBlock:
                        message = None
                        with trio.move_on_after(idle_timeout):
                            message = await mailbox.get()
                        if message is None:
                            if self.rt.retire(self.aggregate_id, live):
                                return
                            continue
                # Acquiring also yields, so a busy aggregate whose store never awaits
                # cannot starve the other tasks.
                async with live.lock:
                    if isinstance(message, _Crashed):
                        raise message.error
                    if self.stale:
                        await self._load()
                    if live.one_by_one:
                        live.one_by_one -= 1
                        await self._process(message)
                    elif isinstance(message, _EXECUTES):
                        await self._execute_queued(message)
                    else:
                        await self._process(message)
                    live.last_active = trio.current_time()
        finally:
            if live.task is self:
                live.task = None

    async def process_in_place(self, message: AggregateMessage) -> None:
        """Process ``message`` in the caller's task; the caller holds the aggregate's lock.

        A crash here must still restart the aggregate's task (and count towards its
        restart intensity): the state is marked stale, so nothing uses it, and the task
        is told to crash.
        """
        try:
            await self._process(message)
        except Exception as error:
            self.stale = True
            try:
                self.live.mailbox.send(_Crashed(error))
            except MailboxFull:
                logger.warning("aggregate %r: could not report a crash", self.aggregate_id)
        except BaseException:
            self.stale = True
            raise
        finally:
            self.live.last_active = trio.current_time()

    async def _load(self) -> None:
        """(Re)load state: the latest snapshot (if snapshots are on), then the later events."""
        rt = self.rt
        snapshot: Snapshot[EntityT] | None = None
        async with rt.store.transaction() as tx:
            if rt.snapshot_every is not None:
                snapshot = await rt.store.load_snapshot(tx, self.aggregate_id)
            start = 0 if snapshot is None else snapshot.sequence
            events = await rt.store.load_events(tx, self.aggregate_id, start)
        entity = rt.empty_state if snapshot is None else snapshot.entity
        apply = rt.apply
        for envelope in events:
            entity = apply(entity, envelope.payload)
        self.entity = entity
        self.sequence = events[-1].sequence if events else start
        self.has_snapshot = snapshot is not None
        self.stale = False

    async def _process(self, message: AggregateMessage) -> None:
        try:
            match message:
                case ExecuteCommand(_, command, metadata):
                    await self._execute(command, metadata, None)
                case ExecuteCommandWithResponse(_, command, metadata, reply_to):
                    await self._execute(command, metadata, reply_to)
                case LoadAggregate(aggregate_id, reply_to):
                    if self.sequence == 0:
                        _reply(reply_to, outcome.Error(EntityNotFound(aggregate_id=aggregate_id)))
                    else:
                        aggregate = Aggregate(aggregate_id, self.entity, self.sequence)
                        _reply(reply_to, outcome.Value(aggregate))
                case LoadAllEvents(_, reply_to):
                    _reply(reply_to, outcome.Value(await self._events(0)))
                case LoadEvents(_, start_from, reply_to):
                    _reply(reply_to, outcome.Value(await self._events(start_from)))
                case LoadLatestSnapshot(_, reply_to):
                    _reply(reply_to, outcome.Value(await self._snapshot()))
                case GetAggregateStats(aggregate_id, reply_to):
                    stats = AggregateStats(
                        aggregate_id, self.sequence, self.sequence, self.has_snapshot
                    )
                    _reply(reply_to, outcome.Value(stats))
        except Exception as error:
            # Let it crash: the caller learns why, then the supervisor restarts this task
            # with state reloaded from the store.
            _refuse(message, error)
            raise

    async def _events(self, start_from: int) -> list[EventEnvelope[EventT]]:
        store = self.rt.store
        async with store.transaction() as tx:
            return list(await store.load_events(tx, self.aggregate_id, start_from))

    async def _snapshot(self) -> Snapshot[EntityT] | None:
        store = self.rt.store
        if self.rt.snapshot_every is None:
            return None
        async with store.transaction() as tx:
            return await store.load_snapshot(tx, self.aggregate_id)

    async def _execute(
        self,
        command: Any,
        metadata: Metadata,
        reply_to: Subject[outcome.Outcome[None]] | None,
    ) -> None:
        rt = self.rt
        for attempt in itertools.count(1):
            try:
                events = await self._decide(self.entity, command)
            except DomainError as rejection:
                rt.commands_processed += 1
                _reply(reply_to, outcome.Error(rejection))
                return
            if not events:
                rt.commands_processed += 1
                _reply(reply_to, outcome.Value(None))
                return
            # Apply before committing: if apply raises, nothing has been written.
            entity = self.entity
            for event in events:
                entity = rt.apply(entity, event)
            try:
                envelopes, sequence = await self._commit(events, metadata, entity)
            except TransactionFailed as failure:
                await self._load()
                if attempt > rt.options.transaction_retries:
                    _reply(reply_to, outcome.Error(failure))
                    return
                logger.info("retrying a command on %r after %s", self.aggregate_id, failure)
                continue
            self.entity, self.sequence = entity, sequence
            rt.commands_processed += 1
            await self._publish(envelopes)
            _reply(reply_to, outcome.Value(None))
            return

    async def _decide(self, entity: EntityT, command: Any) -> Sequence[EventT]:
        """``handle(entity, command)``, awaited when it is async."""
        rt = self.rt
        if rt.handle_is_async:
            events: Sequence[EventT] = await rt.handle(entity, command)  # type: ignore[misc]
            return events
        return rt.handle(entity, command)  # type: ignore[return-value]

    async def _publish(self, envelopes: Sequence[EventEnvelope[EventT]]) -> None:
        """Feed one commit's events to every query."""
        for query_name, _ in self.rt.queries:
            # Waiting for room (rather than dropping) keeps every query complete.
            await named_subject(query_name).send_wait(ProcessEvents(self.aggregate_id, envelopes))

    async def _execute_queued(self, first: ExecuteCommand | ExecuteCommandWithResponse) -> None:
        """Run ``first`` and the commands queued right behind it as one commit (pipelining).

        While a commit is in flight, commands for the aggregate pile up in its mailbox.
        They are decided one after another against the state their predecessors leave
        (exactly as if run one by one), committed in one store transaction (so a store
        that batches commits gets them all in one batch), and answered after it. If
        anything but a domain rejection goes wrong, the batch falls apart: nothing of it
        was committed, and its commands are run again one by one, with the usual retries
        and crash handling.
        """
        live = self.live
        batch: list[ExecuteCommand | ExecuteCommandWithResponse] = [first]
        while len(batch) < _MAX_PIPELINE:
            try:
                queued = live.mailbox.get_nowait()
            except trio.WouldBlock:
                break
            if not isinstance(queued, _EXECUTES):
                live.backlog.append(queued)
                break
            batch.append(queued)
        if len(batch) == 1:
            await self._process(first)
            return
        try:
            published, rejected = await self._commit_batch(batch)
        except Exception as failure:
            logger.debug("running %d commands one by one after %r", len(batch), failure)
            live.backlog.extendleft(reversed(batch))
            live.one_by_one += len(batch)
            if isinstance(failure, TransactionFailed):
                await self._load()
            return
        # Committed: from here on nothing may send the batch round again.
        self.rt.commands_processed += len(batch)
        for envelopes in published:
            await self._publish(envelopes)
        for index, message in enumerate(batch):
            reply_to = getattr(message, "reply_to", None)
            error = rejected.get(index)
            _reply(reply_to, outcome.Value(None) if error is None else outcome.Error(error))

    async def _commit_batch(
        self, batch: list[ExecuteCommand | ExecuteCommandWithResponse]
    ) -> tuple[list[Sequence[EventEnvelope[EventT]]], dict[int, DomainError]]:
        """Decide and commit ``batch``; return each commit's envelopes and the rejections.

        The cached state changes only once the store transaction has committed.
        """
        rt = self.rt
        entity, sequence = self.entity, self.sequence
        decided: list[tuple[Any, Sequence[EventT], Any]] = []  # (message, events, entity)
        rejected: dict[int, DomainError] = {}
        for index, message in enumerate(batch):
            try:
                events = await self._decide(entity, message.command)
            except DomainError as rejection:
                rejected[index] = rejection
                continue
            for event in events:
                entity = rt.apply(entity, event)
            decided.append((message, events, entity))
        store, every = rt.store, rt.snapshot_every
        published: list[Sequence[EventEnvelope[EventT]]] = []
        snapshot_due = False
        async with store.transaction() as tx:
            previous = self.entity
            for message, events, after in decided:
                if not events:
                    continue
                envelopes, sequence = await store.commit_events(
                    tx, Aggregate(self.aggregate_id, previous, sequence), events, message.metadata
                )
                published.append(envelopes)
                previous = after
            snapshot_due = every is not None and sequence // every > self.sequence // every
            if snapshot_due:
                await store.save_snapshot(
                    tx, Snapshot(self.aggregate_id, entity, sequence, utc_now())
                )
        self.entity, self.sequence = entity, sequence
        if snapshot_due:
            self.has_snapshot = True
        return published, rejected

    async def _commit(
        self, events: Sequence[EventT], metadata: Metadata, entity: EntityT
    ) -> tuple[Sequence[EventEnvelope[EventT]], int]:
        """Commit the events, and a snapshot when the commit reaches a multiple of n."""
        store = self.rt.store
        every = self.rt.snapshot_every
        async with store.transaction() as tx:
            envelopes, sequence = await store.commit_events(
                tx, Aggregate(self.aggregate_id, self.entity, self.sequence), events, metadata
            )
            snapshot_due = every is not None and sequence // every > self.sequence // every
            if snapshot_due:
                await store.save_snapshot(
                    tx, Snapshot(self.aggregate_id, entity, sequence, utc_now())
                )
        if snapshot_due:
            self.has_snapshot = True
        return envelopes, sequence


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
    return _Runtime(
        name=name,
        store=eventstore,
        handle=handle,
        apply=apply,
        empty_state=empty_state,
        queries=tuple(queries),
        snapshot_every=every,
        options=RuntimeOptions() if options is None else options,
    )
