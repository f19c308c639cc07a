"""Subjects, names and receive."""

from __future__ import annotations

from typing import Any

import outcome
import pytest
import trio
import trio.testing

from trio_es import (
    DEFAULT_CAPACITY,
    ActorTimeout,
    MailboxFull,
    NonPositiveArgument,
    Subject,
    named_subject,
    new_name,
    new_subject,
    receive,
    timeout,
)
from trio_es._subject import new_reply


async def test_messages_arrive_in_the_order_sent() -> None:
    """A subject delivers messages in the order they were sent."""
    subject: Subject[int] = new_subject()
    for i in range(100):
        subject.send(i)
    assert [await receive(subject, 1000) for _ in range(100)] == list(range(100))


def test_send_never_waits_and_works_outside_trio() -> None:
    """send is synchronous; a subject can be made and filled outside trio.run."""
    subject: Subject[str] = new_subject(capacity=2)
    subject.send("a")
    assert len(subject) == 1


def test_default_capacity_holds_bursts() -> None:
    """The default mailbox holds at least 10,000 messages before refusing."""
    assert DEFAULT_CAPACITY >= 10_000
    subject: Subject[int] = new_subject()
    for i in range(DEFAULT_CAPACITY):
        subject.send(i)
    with pytest.raises(MailboxFull):
        subject.send(-1)


def test_full_mailbox_raises_mailbox_full_naming_it() -> None:
    """A full mailbox refuses with MailboxFull naming the mailbox and its capacity."""
    subject: Subject[int] = new_subject(capacity=3, label="orders")
    for i in range(3):
        subject.send(i)
    with pytest.raises(MailboxFull) as info:
        subject.send(3)
    assert info.value.capacity == 3
    assert "'orders'" in str(info.value)
    assert "capacity 3" in str(info.value)


@pytest.mark.parametrize("bad", [0, -5])
def test_capacity_must_be_positive(bad: int) -> None:
    """A mailbox of capacity 0 or less is refused."""
    with pytest.raises(NonPositiveArgument):
        new_subject(capacity=bad)


async def test_receive_timeout_raises_actor_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """receive on an empty subject raises ActorTimeout with operation and timeout_ms, on time."""
    subject: Subject[int] = new_subject()
    start = trio.current_time()
    with pytest.raises(ActorTimeout) as info:
        await receive(subject, timeout(1500))
    assert (info.value.operation, info.value.timeout_ms) == ("receive", 1500)
    assert trio.current_time() - start == pytest.approx(1.5)


async def test_receive_validates_its_timeout() -> None:
    """receive refuses a timeout that is not a positive int of milliseconds."""
    subject: Subject[int] = new_subject()
    with pytest.raises(NonPositiveArgument):
        await receive(subject, 0)
    with pytest.raises(TypeError):
        await receive(subject, 1.5)  # type: ignore[call-overload]


async def test_receive_unwraps_outcomes() -> None:
    """A reply that is an outcome gives its value, or raises its error."""
    replies: Subject[outcome.Outcome[int]] = new_subject()
    replies.send(outcome.Value(42))
    replies.send(outcome.Error(KeyError("nope")))
    assert await receive(replies, 100) == 42
    with pytest.raises(KeyError):
        await receive(replies, 100)


async def test_named_subject_is_stable_within_a_run() -> None:
    """named_subject returns the same mailbox for a name every time in one run."""
    name = new_name("inbox")
    named_subject(name).send("hello")
    assert await receive(named_subject(name), 100) == "hello"
    assert named_subject(name) is named_subject(name)


def test_distinct_names_with_the_same_label_are_distinct() -> None:
    """Two new_name('x') calls make two names with two mailboxes."""
    first, second = new_name("x"), new_name("x")
    assert first != second

    async def main() -> None:
        named_subject(first).send(1)
        assert len(named_subject(second)) == 0

    trio.run(main)


def test_names_do_not_leak_between_runs() -> None:
    """The registry is per trio.run: a message queued in one run is not seen in the next."""
    name = new_name("shared")
    seen: list[int] = []

    async def first() -> None:
        named_subject(name).send(1)

    async def second() -> None:
        seen.append(len(named_subject(name)))

    trio.run(first)
    trio.run(second)
    assert seen == [0]


async def test_a_waiting_receiver_gets_a_later_message() -> None:
    """receive waits for a message sent after it started waiting."""
    subject: Subject[Any] = new_subject()
    got: list[Any] = []

    async def reader() -> None:
        got.append(await receive(subject, 10_000))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        subject.send("late")
    assert got == ["late"]


def test_name_label_must_be_a_string() -> None:
    """new_name refuses a label that is not a str."""
    with pytest.raises(TypeError, match="label"):
        new_name(42)  # type: ignore[arg-type]


async def test_a_reply_is_handed_to_the_waiting_reader() -> None:
    """A reply subject wakes its waiting reader with the reply, then holds the next one."""
    reply = new_reply("r")
    got: list[Any] = []

    async def reader() -> None:
        got.append(await reply.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert reply.idle_reader()
        reply.send(outcome.Value(1))
    assert got == [outcome.Value(1)]
    reply.send(outcome.Value(2))
    assert len(reply) == 1
    assert not reply.idle_reader()
    assert await receive(reply, 1000) == 2
    assert len(reply) == 0


async def test_a_reply_subject_holds_one_unread_reply() -> None:
    """A second reply while the first is unread is refused with MailboxFull, as capacity 1."""
    reply = new_reply("r")
    reply.send(outcome.Value(1))
    with pytest.raises(MailboxFull):
        reply.send(outcome.Value(2))
    with pytest.raises(MailboxFull):
        await reply.send_wait(outcome.Value(2))
    assert reply.get_nowait() == outcome.Value(1)
    with pytest.raises(trio.WouldBlock):
        reply.get_nowait()


async def test_a_cancelled_reply_reader_leaves_the_reply_for_later() -> None:
    """A reader cancelled while waiting leaves no waiter behind; a later reply is kept."""
    reply = new_reply("r")
    with trio.move_on_after(1) as scope:
        await reply.get()
    assert scope.cancelled_caught
    assert not reply.idle_reader()
    reply.send(outcome.Value(3))
    assert await receive(reply, 1000) == 3


async def test_closing_a_reply_subject_ends_its_reader() -> None:
    """Closing a reply subject wakes its reader with EndOfChannel and refuses later sends."""
    reply = new_reply("r")

    async def close_soon() -> None:
        await trio.testing.wait_all_tasks_blocked()
        reply.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_soon)
        with pytest.raises(trio.EndOfChannel):
            await reply.get()
    with pytest.raises(trio.ClosedResourceError):
        reply.send(outcome.Value(1))


async def test_only_one_task_may_wait_for_a_reply() -> None:
    """Two readers of one reply subject is a bug: the second gets BusyResourceError."""
    reply = new_reply("r")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reply.get)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await reply.get()
        reply.send(outcome.Value(None))
