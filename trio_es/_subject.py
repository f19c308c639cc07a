"""Subjects: mailboxes backed by Trio memory channels, standing in for Erlang subjects.

A :class:`Subject` is a bounded mailbox. Anyone holding it may :meth:`Subject.send` to it
without waiting (like Erlang's ``!``); one actor reads it. A :class:`Name` gives a mailbox a
stable identity: the subject registered under a name belongs to the ``trio.run`` that made
it and outlives the tasks that read it, so an actor that is restarted under the same name
finds the messages that were queued while it was down.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar, final, overload

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
@attrs.define(eq=False, init=False)
class Subject(Generic[T]):
    """A bounded mailbox: many senders, one reader.

    Messages are delivered in the order they were sent. :meth:`send` never waits: when the
    mailbox holds ``capacity`` messages it raises :class:`MailboxFull` instead of growing
    without bound. Code that prefers to wait for room uses :meth:`send_wait`.
    """

    label: str
    capacity: int
    _send: trio.MemorySendChannel[T] = attrs.field(repr=False)
    _receive: trio.MemoryReceiveChannel[T] = attrs.field(repr=False)
    _forward: Callable[[T], None] | None = attrs.field(repr=False)

    def __init__(self, *, capacity: int = DEFAULT_CAPACITY, label: str | None = None) -> None:
        self.capacity = positive_int("capacity", capacity)
        self.label = label if label is not None else f"subject-{next(_subject_ids)}"
        self._send, self._receive = trio.open_memory_channel[T](capacity)
        self._forward = None

    def forward_to(self, forward: Callable[[T], None] | None) -> None:
        """Hand every message sent from now on to ``forward`` during the send (or stop).

        For an owner that only forwards what it reads, synchronously (the runtime's
        router): a message handed over in the send can never be overtaken, which a reader
        waking up later could not promise. Messages queued earlier stay queued for the
        owner to take first.
        """
        self._forward = forward

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
            self._send.send_nowait(message)
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
        await self._send.send(message)

    def close(self) -> None:
        """Refuse further messages: senders waiting for room wake with ``ClosedResourceError``.

        Messages already queued stay readable with :meth:`get_nowait`, so the owner can
        answer each of them.
        """
        self._send.close()

    async def get(self) -> T:
        """Wait for the next message; used by the actor that owns the mailbox."""
        return await self._receive.receive()

    def get_nowait(self) -> T:
        """Take the next message if there is one.

        Raises:
            trio.WouldBlock: the mailbox is empty.
        """
        return self._receive.receive_nowait()

    def __len__(self) -> int:
        """The number of messages waiting in the mailbox."""
        return self._receive.statistics().current_buffer_used

    def idle_reader(self) -> bool:
        """True when the mailbox is empty and its reader is waiting on it.

        Then no message is on its way to the reader: one a sender hands over directly
        would be the next it sees anyway.
        """
        stats = self._receive.statistics()
        return stats.current_buffer_used == 0 and stats.tasks_waiting_receive == 1


def new_reply(label: str) -> Subject[outcome.Outcome[Any]]:
    """A mailbox for exactly one reply (an ``outcome.Outcome``)."""
    return Subject(capacity=1, label=label)


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
