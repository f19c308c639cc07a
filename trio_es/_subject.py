"""Subjects: mailboxes backed by Trio memory channels, standing in for Erlang subjects.

A :class:`Subject` is a bounded mailbox. Anyone holding it may :meth:`Subject.send` to it
without waiting (like Erlang's ``!``); one actor reads it. A :class:`Name` gives a mailbox a
stable identity: the subject registered under a name belongs to the ``trio.run`` that made
it and outlives the tasks that read it, so an actor that is restarted under the same name
finds the messages that were queued while it was down.

An aggregate's mailbox is a lighter :class:`Mailbox` (one reader, no memory channel), and
the aggregates' idle deadlines are kept by one :class:`IdleTimers` task rather than a
cancel scope per waiting aggregate: there may be 100,000 live aggregates. The facade's
calls are timed the same way, by one :class:`CallTimers` task: entering and leaving a cancel
scope cost more than the rest of a call's hand-off.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Generic, NoReturn, TypeVar, final, overload

import attrs
import outcome
import trio

from ._errors import ActorTimeout, MailboxFull
from ._validated import Timeout, positive_int

__all__ = [
    "DEFAULT_CAPACITY",
    "Name",
    "Subject",
    "named_subject",
    "new_name",
    "new_subject",
    "receive",
    "wait_for",
]

T = TypeVar("T")

#: Messages a mailbox holds before ``send`` raises :class:`MailboxFull`.
DEFAULT_CAPACITY: Final = 10_000

_subject_ids = itertools.count(1)


@final
@attrs.define(eq=False)
class _Channel(Generic[T]):
    """A mailbox's storage: a Trio memory channel pair."""

    _send: trio.MemorySendChannel[T]
    _receive: trio.MemoryReceiveChannel[T]

    def send_nowait(self, message: T) -> None:
        self._send.send_nowait(message)

    async def send(self, message: T) -> None:
        await self._send.send(message)

    def close(self) -> None:
        self._send.close()

    async def receive(self) -> T:
        return await self._receive.receive()

    def receive_nowait(self) -> T:
        return self._receive.receive_nowait()

    def queued(self) -> int:
        return self._receive.statistics().current_buffer_used

    def idle_reader(self) -> bool:
        stats = self._receive.statistics()
        return stats.current_buffer_used == 0 and stats.tasks_waiting_receive == 1


@final
class _OneShot(Generic[T]):
    """A mailbox's storage for one message at a time, and the one task that waits for it.

    What a call's reply needs, at a fraction of a memory channel's cost: a message sent
    while the reader waits is handed to it at once; otherwise it is kept until read.
    """

    __slots__ = ("_closed", "_full", "_interruption", "_message", "_waiter")

    def __init__(self) -> None:
        self._full = False
        self._closed = False
        self._message: T | None = None
        self._waiter: trio.lowlevel.Task | None = None
        #: What the next receive returns when no message is there (see :meth:`interrupt`).
        self._interruption: T | None = None

    def interrupt(self, value: T) -> None:
        """End the reader's wait with ``value``, now or at its next receive without a message.

        For :class:`CallTimers`: a call's deadline passed. A message that arrived first is
        still received first.
        """
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter, outcome.Value(value))
        else:
            self._interruption = value

    def send_nowait(self, message: T) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter, outcome.Value(message))
        elif self._full:
            raise trio.WouldBlock
        else:
            self._message, self._full = message, True

    async def send(self, message: T) -> None:
        await trio.lowlevel.checkpoint()
        self.send_nowait(message)

    def close(self) -> None:
        self._closed = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter, outcome.Error(trio.EndOfChannel()))

    async def receive(self) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._full or self._closed:
            # Not receive_nowait's WouldBlock: a caller almost always waits for its reply.
            message = self.receive_nowait()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return message
        interruption = self._interruption
        if interruption is not None:
            self._interruption = None
            await trio.lowlevel.cancel_shielded_checkpoint()
            return interruption
        if self._waiter is not None:
            raise trio.BusyResourceError("another task is already waiting for this reply")
        self._waiter = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def receive_nowait(self) -> T:
        if self._full:
            message = self._message
            self._message, self._full = None, False
            return message  # type: ignore[return-value]
        if self._closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    def queued(self) -> int:
        return 1 if self._full else 0

    def idle_reader(self) -> bool:
        return not self._full and self._waiter is not None


class Mailbox(Generic[T]):
    """A bounded mailbox read by one task, at a fraction of a memory channel's cost.

    What an aggregate's mailbox needs and no more: messages in send order; ``send`` refuses
    with :class:`MailboxFull` once ``capacity`` messages wait; ``hand_over`` parks its task
    until there is room, and parked senders get their turn in the order they parked, so
    every sender's messages keep their order. The one reader waits in :meth:`get`, or in
    :meth:`get_or_idle`, which also ends once :class:`IdleTimers` finds it idle.

    Slotted and without a memory channel pair, its deque, its two ordered dicts and its two
    sets: one is kept per live aggregate, and there may be 100,000. The queue exists only
    while messages wait. The mailbox itself is the abort function of its waiting reader
    (``__call__``), so that waiting allocates nothing.
    """

    __slots__ = ("_capacity", "_closed", "_messages", "_reader", "_senders", "label")

    def __init__(self, capacity: int, label: str) -> None:
        #: What :class:`MailboxFull` calls the mailbox.
        self.label = label
        self._capacity = capacity
        self._closed = False
        #: The messages waiting, oldest first; None while there are none.
        self._messages: deque[T] | None = None
        #: The task waiting in get(), if any.
        self._reader: trio.lowlevel.Task | None = None
        #: Senders parked on a full mailbox, in the order they parked, with their message.
        self._senders: dict[trio.lowlevel.Task, T] | None = None

    @property
    def capacity(self) -> int:
        """Messages the mailbox holds before ``send`` raises :class:`MailboxFull`."""
        return self._capacity

    def send(self, message: T) -> None:
        """Queue ``message`` without waiting (handed straight to a waiting reader).

        Raises:
            MailboxFull: the mailbox already holds ``capacity`` messages.
            trio.ClosedResourceError: the mailbox was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError
        reader = self._reader
        if reader is not None:
            # The reader only waits on an empty mailbox: this is the next message it sees.
            self._reader = None
            trio.lowlevel.reschedule(reader, outcome.Value(message))
            return
        messages = self._messages
        if messages is None:
            self._messages = deque((message,))
        elif len(messages) < self._capacity:
            messages.append(message)
        else:
            raise MailboxFull(mailbox=repr(self.label), capacity=self._capacity)

    async def hand_over(self, message: T, deadline: float = math.inf) -> bool:
        """Queue ``message`` for a caller that waits for the reader's answer right after.

        Waits for room if the mailbox is full (backpressure). Returns False if
        ``deadline`` (Trio's clock) passed while it waited for room: the message was not
        queued. The wait for room alone is timed (by a cancel scope, made only then): a
        caller whose deadline is kept elsewhere times the rest.

        A cancellation point, but a schedule point only when it waits for room: the
        caller's wait for the answer is the call's schedule point, and it always parks
        (the reader runs only once the caller waits), so the reader runs right away
        instead of after the caller was resumed once more for nothing.

        Raises:
            trio.ClosedResourceError: the mailbox was closed (before or while waiting):
                its reader is gone for good, so the message was not delivered.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.send(message)
        except MailboxFull:
            pass
        else:
            return True
        if deadline == math.inf:
            await self._park(message)
            return True
        with trio.CancelScope(deadline=deadline) as scope:
            await self._park(message)
        return not scope.cancelled_caught

    async def _park(self, message: T) -> None:
        """Wait, in line with the other parked senders, until ``message`` is queued."""
        task = trio.lowlevel.current_task()
        senders = self._senders
        if senders is None:
            senders = self._senders = {}
        senders[task] = message

        def abort(_: Any) -> trio.lowlevel.Abort:
            # Cancelled while parked: the message was never queued.
            del senders[task]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def get_nowait(self) -> T:
        """Take the next message if there is one.

        Raises:
            trio.WouldBlock: the mailbox is empty.
            trio.EndOfChannel: the mailbox is empty and closed.
        """
        messages = self._messages
        if not messages:
            if self._closed:
                raise trio.EndOfChannel
            raise trio.WouldBlock
        message = messages.popleft()
        senders = self._senders
        if senders:
            # Room for the sender parked first; its message goes behind the ones queued.
            task = next(iter(senders))
            messages.append(senders.pop(task))
            trio.lowlevel.reschedule(task)
        elif not messages:
            self._messages = None
        return message

    def take_nowait(self) -> T | None:
        """:meth:`get_nowait`, but ``None`` when the mailbox is empty, for messages never ``None``.

        A reader that looks before it waits finds the mailbox empty once per message it
        waits for: raising and catching ``WouldBlock`` each time cost more than the look.

        Raises:
            trio.EndOfChannel: the mailbox is empty and closed.
        """
        if not self._messages and not self._closed:
            return None
        return self.get_nowait()

    async def get(self) -> T:
        """Wait for the next message (the one reader only).

        Raises:
            trio.EndOfChannel: the mailbox is empty and closed.
            trio.BusyResourceError: another task is already waiting in ``get``.
        """
        # Untimed, only a message (which may itself be None) ends the wait.
        return await self.get_or_idle(None)  # type: ignore[return-value]

    async def get_or_idle(self, timers: IdleTimers | None) -> T | None:
        """Like :meth:`get`, but ``None`` once the mailbox stayed empty for ``timers.timeout``.

        The wait is timed by ``timers``' one task instead of a cancel scope of its own
        (with ``timers=None`` it is not timed).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._messages or self._closed:
            # Not get_nowait's WouldBlock on an empty mailbox: the reader would raise and
            # catch it on almost every wait.
            message = self.get_nowait()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return message
        self._wait_as_reader()
        if timers is None:
            return await trio.lowlevel.wait_task_rescheduled(self)  # type: ignore[no-any-return]
        timers.watch(self)
        try:
            return await trio.lowlevel.wait_task_rescheduled(self)  # type: ignore[no-any-return]
        finally:
            timers.forget(self)

    def _wait_as_reader(self) -> None:
        if self._reader is not None:
            raise trio.BusyResourceError("another task is already reading this mailbox")
        self._reader = trio.lowlevel.current_task()

    def __call__(self, _: Any) -> trio.lowlevel.Abort:
        """Abort the reader's wait (it was cancelled): it takes nothing."""
        self._reader = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _idle(self) -> None:
        """End the reader's wait with ``None``: :class:`IdleTimers` found it idle."""
        reader = self._reader
        if reader is not None:
            self._reader = None
            trio.lowlevel.reschedule(reader, outcome.Value(None))

    def close(self) -> None:
        """Refuse further messages: senders waiting for room wake with ``ClosedResourceError``.

        Messages already queued stay readable with :meth:`get_nowait`; a reader waiting on
        the empty mailbox wakes with ``trio.EndOfChannel``.
        """
        if self._closed:
            return
        self._closed = True
        senders, self._senders = self._senders, None
        if senders:
            for task in senders:
                trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError()))
        reader = self._reader
        if reader is not None:
            self._reader = None
            trio.lowlevel.reschedule(reader, outcome.Error(trio.EndOfChannel()))

    def __len__(self) -> int:
        """The number of messages queued (not counting those of parked senders)."""
        messages = self._messages
        return 0 if messages is None else len(messages)


K = TypeVar("K")


class _Deadlines(Generic[K]):
    """Deadlines of many waiting tasks, kept by one task instead of a cancel scope each.

    Each waiter is registered under a key with its deadline (Trio's clock) and is woken
    by :meth:`_expire` once the deadline passed, exactly when a cancel scope with that
    deadline would have fired, but without one: a scope and its cancel status cost some
    650 bytes per waiting task, and entering and leaving one costs time on every wait.

    Deadlines are registered in increasing order, so that a dict (insertion-ordered) is
    the queue and its first entry the next to fire. The timer task (:meth:`run`) then
    never needs waking for a new waiter, since it cannot fire before the deadlines
    already registered. When nobody waits it parks in a cancel scope with no deadline,
    and the next waiter gives that scope its own deadline rather than waking the task:
    the task first runs when that deadline passes (a system's first call, a cold load,
    then pays for no task switch and no scope of the timer's).
    """

    __slots__ = ("_parked", "_waiting")

    def __init__(self) -> None:
        self._waiting: dict[K, float] = {}
        #: The scope the timer task is parked in while nobody waits (no deadline yet).
        self._parked: trio.CancelScope | None = None

    def _add(self, key: K, deadline: float) -> None:
        self._waiting[key] = deadline
        parked = self._parked
        if parked is not None:
            # The first waiter: its deadline is the parked task's. Later waiters' come
            # later, and the task, once woken, sleeps until the next one itself.
            self._parked = None
            parked.deadline = deadline

    def _expire(self, key: K) -> None:
        raise NotImplementedError  # pragma: no cover - every subclass wakes its waiters

    def __len__(self) -> int:
        """The waiters being timed."""
        return len(self._waiting)

    async def run(self) -> NoReturn:
        """Wake each waiter whose deadline passed, for as long as the calling task runs."""
        waiting = self._waiting
        while True:
            now = trio.current_time()
            expired: list[K] = []
            next_deadline = math.inf
            for key, deadline in waiting.items():
                if deadline > now:
                    next_deadline = deadline
                    break
                expired.append(key)
            for key in expired:
                del waiting[key]
                self._expire(key)
            del expired
            # Until the next deadline: waiters registered meanwhile have later ones, so
            # nothing needs to wake the task early. With nobody waiting it parks, and the
            # next waiter gives this scope its deadline.
            with trio.CancelScope(deadline=next_deadline) as sleep:
                if next_deadline == math.inf:
                    self._parked = sleep
                try:
                    await trio.sleep_forever()
                finally:
                    self._parked = None


@final
class IdleTimers(_Deadlines["Mailbox[Any]"]):
    """The idle deadlines of many mailbox readers, kept by one task instead of a scope each.

    A reader waiting in :meth:`Mailbox.get_or_idle` is given ``None`` once it waited
    ``timeout`` seconds without a message. All readers share one timeout, so their
    deadlines are registered in increasing order (see :class:`_Deadlines`).
    """

    __slots__ = ("timeout",)

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def watch(self, mailbox: Mailbox[Any]) -> None:
        """Start timing ``mailbox``'s reader, which just began to wait."""
        self._add(mailbox, trio.current_time() + self.timeout)

    def forget(self, mailbox: Mailbox[Any]) -> None:
        """Stop timing ``mailbox``'s reader (its wait ended, however)."""
        self._waiting.pop(mailbox, None)

    def _expire(self, key: Mailbox[Any]) -> None:
        key._idle()


#: What a call's reply subject yields once :class:`CallTimers` found its deadline passed.
#: Compared by identity, never unwrapped.
CALL_EXPIRED: Final[outcome.Outcome[Any]] = outcome.Value("call expired")
#: What it yields when the timers stopped first: the caller times the rest of the wait itself.
CALL_UNTIMED: Final[outcome.Outcome[Any]] = outcome.Value("call no longer timed")


@final
class CallTimers(_Deadlines["_OneShot[outcome.Outcome[Any]]"]):
    """The deadlines of calls waiting for their reply, kept by one task (the system's router).

    A call registers its reply subject with its deadline (:meth:`watch`) and forgets it
    when it ends. Once the deadline passed, its reply subject yields :data:`CALL_EXPIRED`
    (unless the reply came first), at once if the caller waits, else at its next
    ``get``. So a call costs a dict entry instead of a cancel scope.

    A call is timed here only while the timer task runs and only if its deadline is not
    earlier than the last one registered (the queue's order, see :class:`_Deadlines`);
    otherwise :meth:`watch` returns False and the caller uses a cancel scope of its own.
    When the timer task stops (the system stops, or its supervisor restarts it), every
    call still registered yields :data:`CALL_UNTIMED`, and its caller times the rest of its
    wait with a cancel scope: no call is ever left untimed.
    """

    __slots__ = ("_last", "running")

    def __init__(self) -> None:
        super().__init__()
        #: Whether :meth:`run` is timing calls.
        self.running = False
        self._last = -math.inf

    def watch(self, reply: Subject[outcome.Outcome[Any]], deadline: float) -> bool:
        """Time the call that waits on ``reply`` until ``deadline``; False if it cannot."""
        box = reply._box
        if not self.running or deadline < self._last or not isinstance(box, _OneShot):
            return False
        self._last = deadline
        self._add(box, deadline)
        return True

    def forget(self, reply: Subject[outcome.Outcome[Any]]) -> None:
        """Stop timing the call waiting on ``reply`` (it ended, however)."""
        box = reply._box
        if isinstance(box, _OneShot):
            self._waiting.pop(box, None)

    def _expire(self, key: _OneShot[outcome.Outcome[Any]]) -> None:
        key.interrupt(CALL_EXPIRED)

    async def run(self) -> NoReturn:
        """Time the registered calls for as long as the calling task runs."""
        self.running = True
        try:
            await super().run()
        finally:
            self.running = False
            untimed, self._waiting = self._waiting, {}
            for box in untimed:
                box.interrupt(CALL_UNTIMED)


@final
@attrs.define(eq=False, init=False)
class Subject(Generic[T]):
    """A bounded mailbox: many senders, one reader.

    Messages are delivered in the order they were sent. :meth:`send` never waits: when the
    mailbox holds ``capacity`` messages it raises :class:`MailboxFull` instead of growing
    without bound. Code that prefers to wait for room uses :meth:`send_wait`.
    """

    label: str
    capacity: int
    _box: _Channel[T] | _OneShot[T] = attrs.field(repr=False)
    _forward: Callable[[T], None] | None = attrs.field(repr=False)

    def __init__(self, *, capacity: int = DEFAULT_CAPACITY, label: str | None = None) -> None:
        self.capacity = positive_int("capacity", capacity)
        self.label = label if label is not None else f"subject-{next(_subject_ids)}"
        self._box = _Channel(*trio.open_memory_channel[T](capacity))
        self._forward = None

    @classmethod
    def _for_one_reply(cls, label: str) -> Subject[T]:
        self = cls.__new__(cls)
        self.capacity = 1
        self.label = label
        self._box = _OneShot()
        self._forward = None
        return self

    def forward_to(self, forward: Callable[[T], None] | None) -> None:
        """Hand every message sent from now on to ``forward`` during the send (or stop).

        For an owner that only forwards what it reads, synchronously (the runtime's
        router): a message handed over in the send can never be overtaken, which a reader
        waking up later could not promise. Messages queued earlier stay queued for the
        owner to take first.
        """
        self._forward = forward

    @property
    def forwarding(self) -> bool:
        """True while sends are handed to a ``forward_to`` function instead of queued."""
        return self._forward is not None

    def send(self, message: T) -> None:
        """Queue ``message`` without waiting.

        Raises:
            MailboxFull: the mailbox already holds ``capacity`` messages.
        """
        forward = self._forward
        if forward is not None:
            forward(message)
            return
        try:
            self._box.send_nowait(message)
        except trio.WouldBlock:
            raise MailboxFull(mailbox=repr(self.label), capacity=self.capacity) from None

    async def send_wait(self, message: T) -> None:
        """Queue ``message``, waiting for room if the mailbox is full (backpressure).

        Raises:
            trio.ClosedResourceError: the mailbox was closed (before or while waiting):
                its reader is gone for good, so the message was not delivered.
        """
        forward = self._forward
        if forward is not None:
            await trio.lowlevel.checkpoint()
            forward(message)
            return
        try:
            await self._box.send(message)
        except trio.WouldBlock:  # a reply subject, already holding its reply
            raise MailboxFull(mailbox=repr(self.label), capacity=self.capacity) from None

    def close(self) -> None:
        """Refuse further messages: senders waiting for room wake with ``ClosedResourceError``.

        Messages already queued stay readable with :meth:`get_nowait`, so the owner can
        answer each of them.
        """
        self._box.close()

    async def get(self) -> T:
        """Wait for the next message; used by the actor that owns the mailbox."""
        return await self._box.receive()

    def get_nowait(self) -> T:
        """Take the next message if there is one.

        Raises:
            trio.WouldBlock: the mailbox is empty.
        """
        return self._box.receive_nowait()

    def __len__(self) -> int:
        """The number of messages waiting in the mailbox."""
        return self._box.queued()

    def idle_reader(self) -> bool:
        """True when the mailbox is empty and its reader is waiting on it.

        Then no message is on its way to the reader: one a sender hands over directly
        would be the next it sees anyway.
        """
        return self._box.idle_reader()


def new_reply(label: str) -> Subject[outcome.Outcome[Any]]:
    """A mailbox for one reply (an ``outcome.Outcome``) at a time.

    It holds one message, like ``Subject(capacity=1)``, but is built without a memory
    channel: a reply is handed straight to the task waiting for it. ``send_wait`` does not
    wait for room: a second reply while the first is unread raises ``MailboxFull``.
    """
    return Subject._for_one_reply(label)


def new_subject(*, capacity: int = DEFAULT_CAPACITY, label: str | None = None) -> Subject[Any]:
    """Make a new mailbox holding at most ``capacity`` messages.

    Annotate the variable to type it: ``replies: Subject[int] = new_subject()``.
    """
    return Subject(capacity=capacity, label=label)


@final
@attrs.frozen(eq=False)
class Name(Generic[T]):
    """A name under which one actor's mailbox is registered.

    Names compare by identity: two calls to ``new_name("x")`` make two distinct names.
    """

    label: str
    capacity: int = DEFAULT_CAPACITY

    def __repr__(self) -> str:
        return f"Name({self.label!r}, id={id(self):#x})"


def new_name(label: str, *, capacity: int = DEFAULT_CAPACITY) -> Name[Any]:
    """Make a new, unique name; ``label`` is only for humans (logs, errors)."""
    if not isinstance(label, str):
        raise TypeError(f"name label must be a str (got {label!r})")
    return Name(label, positive_int("capacity", capacity))


_registry: trio.lowlevel.RunVar[dict[Name[Any], Subject[Any]]] = trio.lowlevel.RunVar(
    "trio_es.names"
)


def named_subject(name: Name[T]) -> Subject[T]:
    """Return the mailbox registered under ``name`` in the current ``trio.run``.

    The mailbox is made on first use and lives as long as the run, not as long as the
    actor that reads it: messages sent while the actor restarts wait for it. Names are
    per run, so two runs (two tests) never see each other's mailboxes.
    """
    try:
        registry = _registry.get()
    except LookupError:
        registry = {}
        _registry.set(registry)
    subject = registry.get(name)
    if subject is None:
        subject = registry[name] = Subject(capacity=name.capacity, label=name.label)
    return subject


# The Gleam package's signature takes a timeout argument; it is applied with trio.fail_after.
@overload
async def receive(subject: Subject[outcome.Outcome[T]], timeout: Timeout | int) -> T: ...  # noqa: ASYNC109
@overload
async def receive(subject: Subject[T], timeout: Timeout | int) -> T: ...  # noqa: ASYNC109
async def receive(subject: Subject[Any], timeout: Timeout | int) -> Any:  # noqa: ASYNC109
    """Wait for one message on ``subject``, at most ``timeout`` (a Timeout or milliseconds).

    Replies that carry a result are ``outcome.Outcome`` values: ``receive`` returns the
    value, or raises the error the actor replied with.

    Raises:
        ActorTimeout: no message arrived in time (``operation="receive"``).
        TypeError, NonPositiveArgument: ``timeout`` is not a positive int of milliseconds.
    """
    return await wait_for(subject, timeout if isinstance(timeout, Timeout) else Timeout(timeout))


async def wait_for(subject: Subject[Any], limit: Timeout | None, operation: str = "receive") -> Any:
    """Wait for one message as :func:`receive` does; ``limit=None`` waits without a limit."""
    try:
        # A reply that is already there needs no timer, only the checkpoint every Trio
        # call owes its caller.
        message = subject.get_nowait()
    except trio.WouldBlock:
        message = await _wait(subject, limit, operation)
    else:
        await trio.lowlevel.checkpoint()
    if isinstance(message, outcome.Value | outcome.Error):
        return message.unwrap()
    return message


async def _wait(subject: Subject[Any], limit: Timeout | None, operation: str) -> Any:
    if limit is None:
        return await subject.get()
    try:
        with trio.fail_after(limit.seconds):
            return await subject.get()
    except trio.TooSlowError:
        raise ActorTimeout(operation, limit.milliseconds) from None
