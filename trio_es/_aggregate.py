"""One live aggregate: the single path every command travels.

A command is taken from the aggregate's mailbox by the aggregate's task, together with
the commands queued right behind it (a *batch* of one or more), and then::

    decide (handle, apply)  ->  commit once  ->  swap state  ->  publish  ->  reply

Invariants of the bookkeeping (what the model check in ``trio_es.testing`` holds us to):

1. **One message at a time, in send order.** Only the aggregate's task takes messages
   out of its mailbox. A message taken but not finished is *in hand*; if the task stops
   (a crash, a cancellation) the messages in hand that were not answered go back to the
   *front* of :attr:`Live.backlog`, in order, so the next task (or the final sweep that
   answers ``SystemStopped``) sees them first. The backlog lives in :class:`Live`, which
   outlives the task.
2. **Every message is answered exactly once**: a value, the domain's rejection, or an
   error; never twice, and never lost across a restart.
3. **The cache is the store.** ``entity``/``sequence`` change only after the store
   committed, and only to the state decided for exactly what was committed. After any
   failure that may have touched the cache (a failed commit: ``apply`` may mutate in
   place) or left it behind the store (an unknown outcome), the cache is marked
   ``stale`` and fully reloaded (snapshot + tail) before it is used again; a reload
   checks that the stream has no gap.
4. **Committed means published.** The steps from the commit to the replies run shielded
   from cancellation (bounded by ``RuntimeOptions.shutdown_grace`` once the system
   stops), so a caller's cancellation or a shutdown cannot separate a commit from its
   publication and its replies.
5. **A batch is committed once.** It is never re-run after an error that leaves its
   outcome open. On ``CommitOutcomeUnknown`` the task reads the stream: if it holds the
   batch's own events (by event id) the batch landed and is answered and published as
   committed; otherwise its callers get ``CommitOutcomeUnknown``, never a retry. Only
   ``TransactionFailed`` (nothing written) is retried, re-deciding the whole batch on
   freshly loaded state, with jittered exponential back-off.
6. **Only bugs are crashes.** An exception from ``handle``/``apply`` crashes the task
   (its supervisor restarts it, counting restart intensity); the store's refusals
   (``EventStoreError``), a wrong return type from ``handle`` (``TypeError``) and domain
   rejections reach their caller as themselves and the task goes on.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Generic, TypeVar

import attrs
import outcome
import trio

from ._errors import (
    CommitOutcomeUnknown,
    DomainError,
    EntityNotFound,
    EventStoreError,
    MailboxFull,
    TransactionFailed,
)
from ._store import EventStore, committed_envelopes, events_iterator, load_snapshot_and_events
from ._subject import IdleTimers, Mailbox, Subject
from ._types import (
    Aggregate,
    AggregateMessage,
    AggregateStats,
    EventEnvelope,
    ExecuteCommand,
    ExecuteCommandWithResponse,
    ExecuteForResult,
    ExecuteResult,
    GetAggregateStats,
    LoadAggregate,
    LoadAllEvents,
    LoadEvents,
    LoadLatestSnapshot,
    Snapshot,
    utc_now,
)

__all__ = [
    "AggregateTask",
    "BadEvents",
    "Live",
    "Shared",
    "events_of",
    "planted_bugs",
    "refuse",
    "reply",
]

logger: Final = logging.getLogger("trio_es")

CommandT = TypeVar("CommandT")
EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")

#: Test hook: names of deliberate bugs to switch on, so that tests can show the model
#: check catches each of them ("publish_before_commit", "lost_reply_on_restart",
#: "snapshot_off_by_one", "fifo_violation_across_restart", "rerun_committed_batch").
#: Empty in every real use.
planted_bugs: set[str] = set()

Execute = ExecuteCommand | ExecuteCommandWithResponse | ExecuteForResult
_EXECUTES: Final = (ExecuteCommand, ExecuteCommandWithResponse, ExecuteForResult)
#: The most commands one batch (one commit) takes.
MAX_BATCH: Final = 64
#: Back-off before retrying a failed transaction: full jitter over an exponential window.
_BACKOFF_BASE: Final = 0.002
_BACKOFF_CAP: Final = 0.25


def reply(reply_to: Subject[outcome.Outcome[Any]] | None, result: outcome.Outcome[Any]) -> None:
    """Answer a caller; a caller that stopped listening must not crash the aggregate."""
    if reply_to is None:
        return
    try:
        reply_to.send(result)
    except MailboxFull:
        logger.warning("dropped a reply to %s: its mailbox is full", reply_to.label)


def refuse(message: object, error: BaseException) -> None:
    """Answer ``message`` with ``error`` (or log it, for a message nobody waits on)."""
    reply_to = getattr(message, "reply_to", None)
    if reply_to is None:
        logger.error("dropped %r: %s", message, error)
    else:
        reply(reply_to, outcome.Error(error))


class Live(Mailbox[AggregateMessage]):
    """A live aggregate: its mailbox and backlog, which outlive restarts of its task.

    The aggregate's mailbox itself (a :class:`Mailbox` read by the aggregate's task), so
    that a live aggregate costs one small object rather than a mailbox and its owner.
    """

    __slots__ = ("_backlog", "aggregate_id", "closed_error")

    def __init__(self, aggregate_id: str, capacity: int) -> None:
        super().__init__(capacity, f"aggregate {aggregate_id!r}")
        self.aggregate_id = aggregate_id
        #: Messages taken from the mailbox and not answered yet; they come before the
        #: mailbox's (see invariant 1). None while empty, as it almost always is: a list
        #: costs some 70 bytes per live aggregate, a deque some 780.
        self._backlog: list[AggregateMessage] | None = None
        #: Why the mailbox was closed (the aggregate was given up on, or the system
        #: stopped): what a sender that finds it closed is told.
        self.closed_error: Exception | None = None

    def take(self) -> AggregateMessage | None:
        """The next message without waiting: the backlog's first, else the mailbox's."""
        backlog = self._backlog
        if backlog:
            message = backlog.pop(0)
            if not backlog:
                self._backlog = None
            return message
        return self.take_nowait()

    def put_back(self, messages: Sequence[AggregateMessage]) -> None:
        """Put ``messages`` back at the front of the line, in their order."""
        if not messages:
            return
        backlog = self._backlog
        if backlog is None:
            self._backlog = list(messages)
        else:
            backlog[:0] = messages

    @property
    def backlog(self) -> Sequence[AggregateMessage]:
        """The messages put back, first in line first."""
        backlog = self._backlog
        return () if backlog is None else backlog

    def idle(self) -> bool:
        """Nothing queued for the aggregate (a sender waiting for room implies a full mailbox)."""
        return not self._backlog and not len(self)

    def close_for_good(self, error: Exception) -> list[AggregateMessage]:
        """Close the mailbox for good; return every message still queued, in order."""
        self.closed_error = error
        self.close()
        waiting = list(self.backlog)
        self._backlog = None
        while True:
            try:
                waiting.append(self.get_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return waiting


@attrs.define(eq=False)
class Shared(Generic[CommandT, EventT, EntityT]):
    """What every aggregate of one system shares: the domain, the store, options, counters."""

    store: EventStore[Any, EventT, EntityT]
    handle: Callable[[EntityT, CommandT], Any]
    apply: Callable[[EntityT, EventT], EntityT]
    empty_state: EntityT
    snapshot_every: int | None
    transaction_retries: int
    shutdown_grace: float
    #: Feeds one commit's events to every (still working) query.
    publish: Callable[[str, Sequence[EventEnvelope[EventT]]], Awaitable[None]]
    #: Times every waiting aggregate's ``idle_timeout`` (one task for all of them).
    idle: IdleTimers
    #: Called when an aggregate has been idle for ``idle_timeout``; True means "stop now".
    retire: Callable[[Live], bool]
    handle_is_async: bool = attrs.field(init=False)
    commands_processed: int = 0
    #: Set when the system begins to stop: no new commit starts, running ones get
    #: ``shutdown_grace`` seconds to finish.
    stopping: bool = False
    #: The scopes of the aggregate tasks with a commit under way (each task's own
    #: ``guard``, shielded meanwhile), so that stopping can bound them.
    commit_scopes: set[trio.CancelScope] = attrs.Factory(set)

    def __attrs_post_init__(self) -> None:
        self.handle_is_async = inspect.iscoroutinefunction(self.handle)

    def begin_stop(self) -> None:
        """No new commits; the ones under way must end within ``shutdown_grace``."""
        self.stopping = True
        deadline = trio.current_time() + self.shutdown_grace
        for scope in self.commit_scopes:
            scope.deadline = min(scope.deadline, deadline)


@attrs.define(eq=False)
class _Decided:
    """One command of a batch after ``handle`` and ``apply``: its events and the state after."""

    message: Execute
    events: Sequence[Any]
    entity: Any
    #: The domain's rejection or a bad return value: answered after the commit, nothing stored.
    refusal: Exception | None = None
    #: Once committed: the aggregate's sequence after this command's events.
    sequence: int = 0
    #: Once committed: the global position of its last event (None: no events, or a
    #: store that keeps none).
    global_position: int | None = None

    def result(self, aggregate_id: str) -> outcome.Outcome[Any]:
        """The caller's answer once the batch committed."""
        if self.refusal is not None:
            return outcome.Error(self.refusal)
        if isinstance(self.message, ExecuteForResult):
            return outcome.Value(ExecuteResult(aggregate_id, self.sequence, self.global_position))
        return outcome.Value(None)


@attrs.define(eq=False)
class AggregateTask(Generic[CommandT, EventT, EntityT]):
    """The task serving one aggregate: its cached state and its message loop.

    Messages for one aggregate are processed one at a time, in the order they were sent;
    different aggregates run concurrently.
    """

    shared: Shared[CommandT, EventT, EntityT]
    aggregate_id: str
    live: Live
    entity: Any = None
    sequence: int = 0
    has_snapshot: bool = False
    #: The cache must be (re)loaded before use (invariant 3).
    stale: bool = True
    #: The messages taken and not answered yet (invariant 1); an empty tuple, not a
    #: list, while the task waits.
    in_hand: list[AggregateMessage] | tuple[()] = ()
    #: The scope around the task's loop; shielded while a commit is under way (see
    #: :meth:`_commit`). Its deadline is set only when the system stops.
    guard: trio.CancelScope = attrs.Factory(trio.CancelScope)

    async def run(self) -> None:
        """Serve the aggregate until idle for ``idle_timeout`` (or cancelled, or crashed)."""
        live = self.live
        shared = self.shared
        # The task's start was a scheduling point: its first message needs no checkpoint.
        started = True
        try:
            with self.guard:
                while True:
                    message = live.take()
                    if message is None:
                        message = await live.get_or_idle(shared.idle)
                        if message is None:
                            if shared.retire(live):
                                return
                            continue
                    elif not started:
                        # A checkpoint per message, so that a busy aggregate whose store never
                        # awaits cannot starve the other tasks (waiting in get() was one).
                        await trio.lowlevel.checkpoint()
                    started = False
                    if isinstance(message, _EXECUTES):
                        batch: list[Execute] = [message]
                        while len(batch) < MAX_BATCH:
                            queued = live.take()
                            if queued is None:
                                break
                            if not isinstance(queued, _EXECUTES):
                                live.put_back((queued,))
                                break
                            batch.append(queued)
                        self.in_hand = list(batch)
                        await self._execute(batch)
                        # Not kept alive (with its reply mailboxes) while the task waits.
                        del batch
                    else:
                        self.in_hand = [message]
                        await self._read(message)
                    self.in_hand = ()
        finally:
            # Invariant 1: whatever is in hand and unanswered goes back, first in line.
            self._give_back(self.in_hand)
            self.in_hand = ()

    def _give_back(self, messages: Sequence[AggregateMessage]) -> None:
        if "fifo_violation_across_restart" in planted_bugs:
            messages = list(reversed(messages))
        self.live.put_back(messages)

    def _answer(self, message: AggregateMessage, result: outcome.Outcome[Any]) -> None:
        self._release(message)
        reply(getattr(message, "reply_to", None), result)

    def _release(self, message: AggregateMessage) -> None:
        # By identity: two equal commands are still two messages.
        in_hand = self.in_hand
        for index, held in enumerate(in_hand):
            if held is message:
                del in_hand[index]  # type: ignore[union-attr]  # non-empty: a list
                return

    # -- reads ------------------------------------------------------------------------

    async def _read(self, message: AggregateMessage) -> None:
        """Answer a read; a store error reaches the caller as itself (it is no crash)."""
        try:
            match message:
                case LoadAggregate(aggregate_id):
                    await self._catch_up()
                    if self.sequence == 0:
                        result: Any = outcome.Error(EntityNotFound(aggregate_id=aggregate_id))
                    else:
                        result = outcome.Value(Aggregate(aggregate_id, self.entity, self.sequence))
                case LoadAllEvents():
                    result = outcome.Value(await self._events(0))
                case LoadEvents(_, start_from):
                    result = outcome.Value(await self._events(start_from))
                case LoadLatestSnapshot():
                    result = outcome.Value(await self._snapshot())
                case GetAggregateStats(aggregate_id):
                    await self._catch_up()
                    result = outcome.Value(
                        AggregateStats(
                            aggregate_id, self.sequence, self.sequence, await self._has_snapshot()
                        )
                    )
                case _:  # pragma: no cover - the router only sends the messages above
                    raise TypeError(f"not a message for an aggregate: {message!r}")
        except EventStoreError as error:
            result = outcome.Error(error)
        self._answer(message, result)

    async def _events(self, start_from: int) -> list[EventEnvelope[EventT]]:
        store = self.shared.store
        async with store.transaction() as tx:
            events = list(await store.load_events(tx, self.aggregate_id, start_from))
        _check_contiguous(self.aggregate_id, start_from, events)
        return events

    async def _snapshot(self) -> Snapshot[EntityT] | None:
        store = self.shared.store
        if self.shared.snapshot_every is None:
            return None
        async with store.transaction() as tx:
            return await store.load_snapshot(tx, self.aggregate_id)

    async def _has_snapshot(self) -> bool:
        # Another process may have saved one since this task looked.
        if not self.has_snapshot and self.shared.snapshot_every is not None:
            self.has_snapshot = await self._snapshot() is not None
        return self.has_snapshot

    # -- loading ----------------------------------------------------------------------

    async def _load(self) -> None:
        """(Re)load the cache: the latest snapshot (if snapshots are on), then later events."""
        shared = self.shared
        store = shared.store
        snapshot: Snapshot[EntityT] | None = None
        async with store.transaction() as tx:
            if shared.snapshot_every is not None:
                snapshot, loaded = await load_snapshot_and_events(store, tx, self.aggregate_id)
            else:
                loaded = await store.load_events(tx, self.aggregate_id, 0)
            start = 0 if snapshot is None else snapshot.sequence
            events = list(loaded)
        _check_contiguous(self.aggregate_id, start, events)
        entity = shared.empty_state if snapshot is None else snapshot.entity
        apply = shared.apply
        for envelope in events:
            entity = apply(entity, envelope.payload)
        self.entity = entity
        self.sequence = events[-1].sequence if events else start
        self.has_snapshot = snapshot is not None
        self.stale = False

    async def _catch_up(self) -> None:
        """Bring the cache up to the store: other processes may have written since."""
        if self.stale:
            await self._load()
            return
        events = await self._events(self.sequence)
        if not events:
            return
        entity = self.entity
        try:
            for envelope in events:
                entity = self.shared.apply(entity, envelope.payload)
        except BaseException:
            self.stale = True  # apply may have mutated the cached entity
            raise
        self.entity, self.sequence = entity, events[-1].sequence

    # -- commands ---------------------------------------------------------------------

    async def _execute(self, batch: list[Execute]) -> None:
        """Decide and commit ``batch`` (one or more commands), then publish and reply."""
        shared = self.shared
        attempt = 0
        while True:
            if self.stale:
                try:
                    await self._load()
                except EventStoreError as error:
                    # The stream cannot be read (a bad row, a gap): every command of the
                    # batch fails with it; nothing was decided, so this is no crash.
                    for message in batch:
                        self._answer(message, outcome.Error(error))
                    return
            decided, crash = await self._decide(batch)
            try:
                await self._commit(batch, decided, crash)
            except TransactionFailed as failure:
                # Nothing was written, and apply may have touched the cache: the failed
                # transaction marked it stale, so the batch is decided again on reloaded state.
                attempt += 1
                if attempt > shared.transaction_retries:
                    for message in batch:
                        self._answer(message, outcome.Error(failure))
                    return
                logger.info(
                    "aggregate %r: retrying %d command(s) after %s",
                    self.aggregate_id,
                    len(batch),
                    failure,
                )
                await trio.sleep(random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt)))
                continue
            return

    async def _decide(
        self, batch: list[Execute]
    ) -> tuple[list[_Decided], tuple[int, Exception] | None]:
        """Run handle and apply over ``batch`` in order, each on its predecessors' state.

        Returns the decisions for a prefix of ``batch`` (rejections included) and, when
        it stopped at a crash (an exception from handle or apply that is no domain
        rejection), the crashed command's index and error.
        """
        entity = self.entity
        apply = self.shared.apply
        decided: list[_Decided] = []
        for index, message in enumerate(batch):
            try:
                events = await self._handle(entity, message.command)
            except DomainError as rejection:
                decided.append(_Decided(message, (), entity, rejection))
                continue
            except BadEvents as bad:
                decided.append(_Decided(message, (), entity, bad.error))
                continue
            except Exception as crash:
                return decided, (index, crash)
            try:
                after = entity
                for event in events:
                    after = apply(after, event)
            except Exception as crash:
                # apply may have mutated the cached entity in place.
                self.stale = True
                return decided, (index, crash)
            decided.append(_Decided(message, events, after))
            entity = after
        return decided, None

    async def _handle(self, entity: EntityT, command: Any) -> Sequence[EventT]:
        """``handle(entity, command)``, awaited if async, as a materialised sequence.

        A generator is consumed exactly once, here, so the events applied and the events
        stored are the same objects.
        """
        shared = self.shared
        result = shared.handle(entity, command)
        if shared.handle_is_async:
            result = await result
        return events_of(result, command)

    async def _commit(
        self, batch: list[Execute], decided: list[_Decided], crash: tuple[int, Exception] | None
    ) -> None:
        """Commit ``decided`` in one transaction, then swap, publish and reply (invariant 4).

        Raises:
            TransactionFailed: nothing was written and nothing answered; retry the batch.
        """
        shared = self.shared
        if shared.stopping:
            # No new commit once stopping: the batch stays in hand and goes back to the
            # backlog when the cancellation arrives; the final sweep answers it.
            await trio.sleep_forever()
        guard = self.guard
        # Shielded from here to the last reply (invariant 4): the task's own scope is
        # switched to shielded and back, at a fraction of the cost of entering a shielded
        # scope per commit. Registered until the last reply, so that stopping bounds the
        # publication too; if that deadline passes, its Cancelled ends the task's loop
        # (the system is stopping) after the replies went out.
        guard.shield = True
        shared.commit_scopes.add(guard)
        try:
            stored = await self._stored(batch, decided, crash)
            if stored is None:
                return
            committed, published, refused = stored
            shared.commands_processed += len(committed)
            later: list[Execute] = []
            if refused is not None:
                index, refusal = refused
                self._answer(batch[index], outcome.Error(refusal))
                # Decided on top of the refused command's events: decide them again.
                later = batch[index + 1 :]
                crash = None
            elif crash is not None:
                later = batch[crash[0] + 1 :]
            for message in later:
                self._release(message)
            self._give_back(later)
            try:
                for envelopes in published:
                    await shared.publish(self.aggregate_id, envelopes)
            finally:
                for item in committed:
                    self._answer(item.message, item.result(self.aggregate_id))
                if "rerun_committed_batch" in planted_bugs and len(committed) > 1:
                    self._give_back([committed[-1].message])
        finally:
            shared.commit_scopes.discard(guard)
            guard.shield = False
        if crash is not None:
            self._crash(batch[crash[0]], crash[1])

    async def _stored(
        self, batch: list[Execute], decided: list[_Decided], crash: tuple[int, Exception] | None
    ) -> (
        tuple[list[_Decided], list[Sequence[EventEnvelope[EventT]]], tuple[int, Exception] | None]
        | None
    ):
        """:meth:`_transaction`, its failures answered; ``None`` when nothing was committed.

        Raises:
            TransactionFailed: nothing was written and nothing answered; retry the batch.
        """
        shared = self.shared
        try:
            return await self._transaction(decided)
        except CommitOutcomeUnknown as unknown:
            # Invariant 5: maybe stored, so never retried; the next use reloads.
            self._fail(batch, decided, crash, unknown)
        except TransactionFailed:
            raise
        except EventStoreError as error:
            # The store refused the transaction: nothing of it was written.
            self._fail(batch, decided, crash, error)
        except trio.Cancelled:
            # Only the shutdown deadline cancels a shielded commit: it may have landed.
            stopped = CommitOutcomeUnknown(
                f"the system stopped while the commit was under way (it had "
                f"{shared.shutdown_grace} s of grace)",
                aggregate_id=self.aggregate_id,
            )
            self._fail(batch, decided, crash, stopped)
            raise
        except Exception as broken:
            # A store that breaks the protocol: answer every command with it, crash.
            self._fail(batch, decided, None, broken)
            raise
        return None

    async def _transaction(
        self, decided: list[_Decided]
    ) -> tuple[list[_Decided], list[Sequence[EventEnvelope[EventT]]], tuple[int, Exception] | None]:
        """Store ``decided``'s events (and a snapshot when due) in one store transaction.

        On success the cache holds the committed state. Returns the commands committed
        (rejections included: a prefix of ``decided``), each commit's envelopes, and the
        command whose events the store refused, if one was (the ones before it commit).
        """
        shared = self.shared
        store, every = shared.store, shared.snapshot_every
        committed: list[_Decided] = []
        published: list[Sequence[EventEnvelope[EventT]]] = []
        refused: tuple[int, Exception] | None = None
        sequence, entity = self.sequence, self.entity
        # A loop, not any() over a generator: closing the generator early costs an
        # exception inside it, on every command.
        for item in decided:
            if item.refusal is None and item.events:
                break
        else:
            for item in decided:
                item.sequence = sequence
            return decided, published, None  # nothing to store: no transaction at all
        snapshot_due = False
        try:
            async with store.transaction() as tx:
                for index, item in enumerate(decided):
                    if item.refusal is None and item.events:
                        try:
                            envelopes, sequence = await store.commit_events(
                                tx,
                                Aggregate(self.aggregate_id, entity, sequence),
                                item.events,
                                item.message.metadata,
                            )
                        except (TransactionFailed, CommitOutcomeUnknown):
                            raise
                        except EventStoreError as error:
                            # This command's events cannot be stored (the store leaves
                            # the transaction as it was): the ones before it commit.
                            refused = (index, error)
                            break
                        published.append(envelopes)
                        entity = item.entity
                    item.sequence = sequence
                    committed.append(item)
                if "publish_before_commit" in planted_bugs:
                    for envelopes in published:
                        await shared.publish(self.aggregate_id, envelopes)
                    published = []
                snapshot_due = every is not None and sequence // every > self.sequence // every
                if snapshot_due:
                    at = sequence - 1 if "snapshot_off_by_one" in planted_bugs else sequence
                    await store.save_snapshot(
                        tx, Snapshot(self.aggregate_id, entity, at, utc_now())
                    )
        except CommitOutcomeUnknown:
            self.stale = True
            stored = await self._landed(published)
            if stored is None:
                raise
            # The store could not tell, but the stream holds this commit's own events
            # (found by event id): it landed, so it is answered and published as such,
            # with the places the stream gives them.
            published = [[stored.get(e.event_id, e) for e in envelopes] for envelopes in published]
        except BaseException:
            self.stale = True
            raise
        else:
            published = [committed_envelopes(tx, envelopes) for envelopes in published]
        self._place(committed, published)
        self.entity, self.sequence = entity, sequence
        if snapshot_due:
            self.has_snapshot = True
        return committed, published, refused

    @staticmethod
    def _place(committed: list[_Decided], published: list[Sequence[EventEnvelope[EventT]]]) -> None:
        """Give each committed command the global position of its last event."""
        # ``published`` holds one entry per committed command with events, in order.
        commits = iter(published)
        for item in committed:
            if item.refusal is None and item.events:
                envelopes = next(commits, None)
                item.global_position = envelopes[-1].global_position if envelopes else None

    async def _landed(
        self, published: list[Sequence[EventEnvelope[EventT]]]
    ) -> dict[Any, EventEnvelope[EventT]] | None:
        """The stream's envelopes by event id, if a commit whose outcome the store could
        not learn is in the stream now; ``None`` while that stays unknown.

        Only an event id is proof (another writer may have stored equal events), so a
        store whose envelopes carry no ids, or a failed read, leaves it unknown.
        """
        event_id = next((e.event_id for envelopes in published for e in envelopes), None)
        if event_id is None:
            return None
        try:
            stored = await self._events(self.sequence)
        except Exception as error:
            logger.warning(
                "aggregate %r: could not learn whether a commit landed: %r",
                self.aggregate_id,
                error,
            )
            return None
        by_id = {envelope.event_id: envelope for envelope in stored}
        return by_id if event_id in by_id else None

    def _fail(
        self,
        batch: list[Execute],
        decided: list[_Decided],
        crash: tuple[int, Exception] | None,
        error: Exception,
    ) -> None:
        """Nothing (or, for an unknown outcome, maybe all) of ``decided`` was stored.

        Its commands get ``error``; a crashed command and the ones after it are given
        back to be decided again, since their fate was never decided by a commit. (The
        failed transaction already marked the cache stale.)
        """
        for item in decided:
            self._answer(item.message, outcome.Error(error))
        if crash is not None:
            later = batch[crash[0] :]
            for message in later:
                self._release(message)
            self._give_back(later)

    def _crash(self, message: Execute, error: Exception) -> None:
        """Answer the crashed command with its error, then crash the task (invariant 6)."""
        if "lost_reply_on_restart" in planted_bugs:
            self._release(message)
        else:
            self._answer(message, outcome.Error(error))
        raise error


class BadEvents(Exception):
    """``handle`` returned something that is not a sequence of events.

    Not a ``TypeError`` itself, so that a ``TypeError`` raised inside a generator that
    ``handle`` returned (a bug: a crash) is never taken for it; ``error`` is the
    ``TypeError`` the caller gets.
    """

    def __init__(self, error: TypeError) -> None:
        super().__init__(error)
        self.error = error


def events_of(result: object, command: object) -> Sequence[Any]:
    """What ``handle`` returned for ``command``, as a sequence read exactly once.

    The runtime, :class:`trio_es.testing.Scenario` and the reference model all use it, so
    that they agree on what ``handle`` may return.

    Raises:
        BadEvents: ``result`` is ``None``, not iterable, or a str, bytes or mapping.
    """
    if isinstance(result, list | tuple):
        return result
    iterator = events_iterator(result)
    if iterator is None:
        raise BadEvents(
            TypeError(
                f"handle must return a sequence of events (got {result!r:.80} of type "
                f"{type(result).__name__} for command {command!r:.80}); return a list of "
                "events, or [] for none"
            )
        )
    return tuple(iterator)


def _check_contiguous(aggregate_id: str, start_from: int, events: Sequence[Any]) -> None:
    """Refuse a stream with a hole: sequences must run on from ``start_from`` by one.

    Raises:
        EventStoreError: naming the aggregate and the first missing sequence.
    """
    expected = start_from + 1
    for envelope in events:
        if envelope.sequence != expected:
            raise EventStoreError(
                f"event {expected} of the stream is missing from the store (the next "
                f"stored event is {envelope.sequence}); restore it from a backup, the "
                "stream cannot be replayed with a gap",
                aggregate_id=aggregate_id,
            )
        expected += 1
