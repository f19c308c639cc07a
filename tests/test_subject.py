"""Subjects, names and receive."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
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
from trio_es._subject import (
    CALL_EXPIRED,
    CALL_UNTIMED,
    CallTimers,
    IdleTimers,
    Mailbox,
    new_reply,
)


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


async def _read_while_waiting(
    box: Any, message: Any, waiting: Callable[[], bool], sent: Callable[[], bool] = lambda: True
) -> list[Any]:
    """What a reader waiting in ``box.get()`` got when ``message`` was sent to ``box``.

    ``waiting()`` is asserted once the reader waits, before the send; ``sent()`` right
    after the send, before the reader runs again.
    """
    got: list[Any] = []

    async def reader() -> None:
        got.append(await box.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert waiting()
        box.send(message)
        assert sent()
    return got


async def test_a_reply_is_handed_to_the_waiting_reader() -> None:
    """A reply subject wakes its waiting reader with the reply, then holds the next one."""
    reply = new_reply("r")
    got = await _read_while_waiting(reply, outcome.Value(1), lambda: reply.idle_reader())
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


async def _assert_closing_ends_the_waiting_reader(box: Any) -> None:
    """``box.get()`` waiting on an empty ``box`` wakes with EndOfChannel when it is closed."""

    async def close_soon() -> None:
        await trio.testing.wait_all_tasks_blocked()
        box.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_soon)
        with pytest.raises(trio.EndOfChannel):
            await box.get()


async def test_closing_a_reply_subject_ends_its_reader() -> None:
    """Closing a reply subject wakes its reader with EndOfChannel and refuses later sends."""
    reply = new_reply("r")
    await _assert_closing_ends_the_waiting_reader(reply)
    with pytest.raises(trio.ClosedResourceError):
        reply.send(outcome.Value(1))


async def test_a_reply_sent_before_its_subject_closed_is_still_received() -> None:
    """Closing a reply subject keeps its unread reply for the reader; after it, EndOfChannel."""
    reply = new_reply("r")
    reply.send(outcome.Value(1))
    reply.close()
    assert await reply.get() == outcome.Value(1)
    with pytest.raises(trio.EndOfChannel):
        await reply.get()


async def test_only_one_task_may_wait_for_a_reply() -> None:
    """Two readers of one reply subject is a bug: the second gets BusyResourceError."""
    reply = new_reply("r")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reply.get)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await reply.get()
        reply.send(outcome.Value(None))


# -- the one-reader mailbox of an aggregate, and its idle timers --


def _mailbox(capacity: int = 2) -> Mailbox[Any]:
    return Mailbox(capacity, "box")


def test_a_mailbox_takes_sends_outside_trio() -> None:
    """A mailbox nobody waits on takes and gives messages without trio.run, in order."""
    box = _mailbox(3)
    for i in range(3):
        box.send(i)
    assert len(box) == 3
    assert [box.get_nowait() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(trio.WouldBlock):
        box.get_nowait()
    assert len(box) == 0


def test_a_full_mailbox_refuses_with_mailbox_full_naming_it() -> None:
    """send to a mailbox holding capacity messages raises MailboxFull naming it."""
    box = _mailbox(2)
    box.send(1)
    box.send(2)
    with pytest.raises(MailboxFull) as info:
        box.send(3)
    assert info.value.capacity == 2
    assert "'box'" in str(info.value)


async def test_parked_senders_keep_fifo_order_behind_the_queue() -> None:
    """Senders parked on a full mailbox get their turn in the order they parked."""
    box = _mailbox(2)
    box.send("a")
    box.send("b")
    async with trio.open_nursery() as nursery:
        for message in ("c", "d", "e"):
            nursery.start_soon(box.hand_over, message)
            await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(MailboxFull):
            box.send("refused while senders are parked")
        got = []
        for _ in range(5):
            got.append(await box.get())
            await trio.testing.wait_all_tasks_blocked()
    assert got == ["a", "b", "c", "d", "e"]
    assert len(box) == 0


async def test_a_cancelled_parked_sender_queues_nothing() -> None:
    """A sender cancelled while parked on a full mailbox leaves no message behind."""
    box = _mailbox(1)
    box.send("a")
    with trio.move_on_after(1) as scope:
        await box.hand_over("never")
    assert scope.cancelled_caught
    assert box.get_nowait() == "a"
    with pytest.raises(trio.WouldBlock):
        box.get_nowait()
    box.send("b")
    assert await box.get() == "b"


async def test_a_forwarding_subject_hands_sends_over_and_queues_none() -> None:
    """While forward_to is set, forwarding is True and sends go to it, never to the queue."""
    subject: Subject[int] = new_subject(capacity=1)
    assert not subject.forwarding
    subject.send(1)
    forwarded: list[int] = []
    subject.forward_to(forwarded.append)
    assert subject.forwarding
    subject.send(2)
    await subject.send_wait(3)
    assert forwarded == [2, 3]
    assert len(subject) == 1  # only the message sent before forwarding began
    subject.forward_to(None)
    assert not subject.forwarding
    assert subject.get_nowait() == 1


async def test_hand_over_with_room_queues_without_letting_another_task_run() -> None:
    """hand_over with room queues the message and is no schedule point: no other task runs."""
    box = _mailbox(2)
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        assert await box.hand_over("a") is True
        assert ran == []
        assert box.get_nowait() == "a"
    assert ran == ["other"]


async def test_hand_over_is_a_cancel_point_that_queues_nothing_when_cancelled() -> None:
    """A caller already cancelled gets Cancelled from hand_over and queues nothing."""
    box = _mailbox(2)
    with trio.CancelScope() as scope:
        scope.cancel()
        await box.hand_over("never")
    assert scope.cancelled_caught
    assert len(box) == 0


async def test_hand_over_on_a_full_mailbox_parks_until_room_or_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """hand_over waits for room in a full mailbox; past its deadline it returns False, unsent."""
    box = _mailbox(1)
    box.send("a")
    started = trio.current_time()
    assert await box.hand_over("late", deadline=started + 1) is False
    assert trio.current_time() == pytest.approx(started + 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.hand_over, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert box.get_nowait() == "a"
    assert box.get_nowait() == "b"
    with pytest.raises(trio.WouldBlock):
        box.get_nowait()


async def test_closing_a_mailbox_wakes_parked_senders_and_keeps_the_queue() -> None:
    """close wakes parked senders with ClosedResourceError; queued messages stay readable."""
    box = _mailbox(1)
    box.send("a")
    refused: list[BaseException] = []

    async def sender() -> None:
        try:
            await box.hand_over("b")
        except trio.ClosedResourceError as error:
            refused.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    assert len(refused) == 1
    with pytest.raises(trio.ClosedResourceError):
        box.send("c")
    with pytest.raises(trio.ClosedResourceError):
        await box.hand_over("c")
    assert box.get_nowait() == "a"
    with pytest.raises(trio.EndOfChannel):
        box.get_nowait()
    with pytest.raises(trio.EndOfChannel):
        await box.get()


async def test_take_nowait_is_none_on_an_empty_mailbox_and_ends_once_it_is_closed() -> None:
    """take_nowait: None while empty, messages in order, EndOfChannel once closed and empty."""
    box = _mailbox()
    assert box.take_nowait() is None
    box.send("a")
    box.send("b")
    assert box.take_nowait() == "a"
    box.close()
    assert box.take_nowait() == "b"
    with pytest.raises(trio.EndOfChannel):
        box.take_nowait()


async def test_closing_a_mailbox_ends_its_waiting_reader() -> None:
    """A reader waiting on an empty mailbox wakes with EndOfChannel when it is closed."""
    await _assert_closing_ends_the_waiting_reader(_mailbox())


async def test_a_cancelled_mailbox_reader_leaves_the_next_message_for_later() -> None:
    """A reader cancelled while waiting takes nothing; the next message waits in the queue."""
    box = _mailbox()
    with trio.move_on_after(1) as scope:
        await box.get()
    assert scope.cancelled_caught
    box.send("kept")
    assert len(box) == 1
    assert await box.get() == "kept"


async def test_a_waiting_mailbox_reader_is_handed_the_message() -> None:
    """A message sent while the reader waits goes straight to it, and the queue stays empty."""
    box = _mailbox()
    got = await _read_while_waiting(box, "direct", lambda: True, lambda: len(box) == 0)
    assert got == ["direct"]


async def test_only_one_task_may_read_a_mailbox() -> None:
    """A second task waiting on a mailbox is a bug: it gets BusyResourceError."""
    box = _mailbox()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.get)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await box.get()
        box.send(None)


@asynccontextmanager
async def _timed_mailbox(idle_after: float) -> AsyncIterator[tuple[IdleTimers, Mailbox[Any]]]:
    """A mailbox and idle timers (``idle_after`` seconds) whose task runs for the block."""
    timers = IdleTimers(idle_after)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        yield timers, _mailbox()
        nursery.cancel_scope.cancel()


async def test_an_idle_reader_gets_none_exactly_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """get_or_idle returns None exactly timeout seconds after the wait began, not before."""
    async with _timed_mailbox(10.0) as (timers, box):
        await trio.sleep(3)
        start = trio.current_time()
        assert await box.get_or_idle(timers) is None
        assert trio.current_time() - start == 10.0
        assert len(timers) == 0


async def test_a_message_ends_an_idle_wait_and_the_next_wait_has_a_fresh_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A message before the deadline is returned; the next wait is timed from its own start."""
    timers = IdleTimers(10.0)
    box = _mailbox()
    ended: list[tuple[float, Any]] = []

    async def reader() -> None:
        for _ in range(2):
            message = await box.get_or_idle(timers)
            ended.append((trio.current_time(), message))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        start = trio.current_time()
        nursery.start_soon(reader)
        await trio.sleep(7)
        box.send("m")
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert ended == [(start + 7, "m"), (start + 17, None)]


async def test_idle_timers_time_each_reader_from_its_own_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Readers that began waiting at different times each end at their own deadline,
    also those that began before the timers' task ran."""
    timers = IdleTimers(5.0)
    boxes = [_mailbox() for _ in range(4)]
    ended: dict[int, float] = {}
    start = trio.current_time()

    async def reader(index: int) -> None:
        await trio.sleep(index)
        assert await boxes[index].get_or_idle(timers) is None
        ended[index] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        for index in range(4):
            nursery.start_soon(reader, index)
        await trio.sleep(0.5)
        nursery.start_soon(timers.run)
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    assert ended == {0: 5.0, 1: 6.0, 2: 7.0, 3: 8.0}


async def test_a_cancelled_idle_reader_is_no_longer_timed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A reader cancelled while idle is forgotten by the timers and takes nothing."""
    async with _timed_mailbox(10.0) as (timers, box):
        with trio.move_on_after(4):
            await box.get_or_idle(timers)
        assert len(timers) == 0
        box.send("kept")
        assert await box.get_or_idle(timers) == "kept"


@asynccontextmanager
async def _call_timers() -> AsyncIterator[CallTimers]:
    """Call timers whose task runs for the block."""
    timers = CallTimers()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        await trio.testing.wait_all_tasks_blocked()
        yield timers
        nursery.cancel_scope.cancel()


async def test_a_timed_call_gets_call_expired_exactly_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A reply waited for past its deadline yields CALL_EXPIRED at the deadline, not before."""
    async with _call_timers() as timers:
        reply = new_reply("r")
        start = trio.current_time()
        assert timers.watch(reply, start + 4.0)
        assert await reply.get() is CALL_EXPIRED
        assert trio.current_time() - start == 4.0
        timers.forget(reply)
        assert len(timers) == 0


async def test_a_reply_that_came_before_the_callers_get_wins_over_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A reply sent before the deadline is received even if the caller gets it after."""
    async with _call_timers() as timers:
        reply = new_reply("r")
        assert timers.watch(reply, trio.current_time() + 1.0)
        answer = outcome.Value(7)
        reply.send(answer)
        await trio.sleep(5)
        assert await reply.get() is answer


async def test_a_call_whose_deadline_passed_before_it_waited_expires_at_its_get(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A deadline that passes while the caller is not yet waiting ends its next get at once."""
    async with _call_timers() as timers:
        reply = new_reply("r")
        assert timers.watch(reply, trio.current_time() + 1.0)
        await trio.sleep(5)
        start = trio.current_time()
        assert await reply.get() is CALL_EXPIRED
        assert trio.current_time() == start


async def test_call_timers_hand_waiting_calls_back_untimed_when_they_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Stopping the timers ends every registered wait with CALL_UNTIMED, and refuses new ones."""
    timers = CallTimers()
    got: list[object] = []

    async def wait(reply: Any) -> None:
        got.append(await reply.get())

    async with trio.open_nursery() as callers, trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        await trio.testing.wait_all_tasks_blocked()
        replies = [new_reply(f"r{i}") for i in range(3)]
        for reply in replies:
            assert timers.watch(reply, trio.current_time() + 60)
        for reply in replies[:2]:
            callers.start_soon(wait, reply)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert got == [CALL_UNTIMED, CALL_UNTIMED]
    assert trio.current_time() < 60
    # The third never waited: its get yields CALL_UNTIMED too, so its caller times itself.
    assert await replies[2].get() is CALL_UNTIMED
    assert not timers.watch(new_reply("late"), trio.current_time() + 60)


class _StepsOf(trio.abc.Instrument):
    """Counts the scheduling steps of the tasks whose name ends with ``suffix``."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.suffix):
            self.steps += 1


async def test_a_first_waiter_leaves_the_parked_timer_task_asleep_until_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Registering with a parked timer task runs that task only at the deadline, once."""
    timers = CallTimers()
    steps = _StepsOf(".run")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(steps)
        try:
            reply = new_reply("r")
            start = trio.current_time()
            assert timers.watch(reply, start + 4.0)
            await trio.sleep(3.9)
            assert steps.steps == 0
            assert await reply.get() is CALL_EXPIRED
            assert trio.current_time() - start == 4.0
            assert steps.steps == 1
        finally:
            trio.lowlevel.remove_instrument(steps)
        timers.forget(reply)
        nursery.cancel_scope.cancel()


async def test_a_parked_timer_task_still_stops_when_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelling the timer task while it is parked ends it at once, waiting calls untimed."""
    timers = CallTimers()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        await trio.testing.wait_all_tasks_blocked()
        reply = new_reply("r")
        assert timers.watch(reply, trio.current_time() + 60)
        nursery.cancel_scope.cancel()
    assert trio.current_time() < 60
    assert await reply.get() is CALL_UNTIMED
    assert not timers.running


async def test_call_timers_refuse_a_deadline_earlier_than_the_last_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Deadlines are queued in increasing order: an earlier one is left to its caller's scope."""
    async with _call_timers() as timers:
        now = trio.current_time()
        assert timers.watch(new_reply("a"), now + 10)
        assert not timers.watch(new_reply("b"), now + 5)
        assert timers.watch(new_reply("c"), now + 10)
        assert not timers.watch(new_subject(capacity=1), now + 20)
