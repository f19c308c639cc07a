"""Supervision trees: restart types, strategies, intensity, ordered start and shutdown."""

from __future__ import annotations

import functools
import gc
import logging
import pickle
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_es import _supervisor
from trio_es._errors import EventSourcingError
from trio_es._subject import named_subject, new_name
from trio_es.supervision import (
    ChildSpecification,
    DynamicSupervisor,
    Restart,
    StaticSupervisor,
    Strategy,
    SupervisorGaveUp,
    worker,
)

LOGGER = "trio_es.supervision"

Event = tuple[str, str]


@attrs.define
class Recorder:
    """Children that follow a plan and record what happens to them, in order."""

    events: list[Event] = attrs.Factory(list)
    starts: Counter[str] = attrs.Factory(Counter)

    def child(
        self, name: str, plan: Sequence[str] = (), *, restart: Restart = Restart.PERMANENT
    ) -> ChildSpecification:
        """A child whose incarnation n does ``plan[n]`` and then runs until cancelled.

        Steps: ``"fail"`` raises 1 s after it is ready, ``"fail_early"`` raises 1 s into
        its start (before it is ready), ``"return"`` returns 1 s after it is ready.
        """

        async def start(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            incarnation = self.starts[name]
            self.starts[name] += 1
            self.events.append(("start", name))
            step = plan[incarnation] if incarnation < len(plan) else "run"
            try:
                if step == "fail_early":
                    await trio.sleep(1)
                    self.events.append(("fail", name))
                    raise ValueError(f"{name} failed early")
                task_status.started()
                if step == "run":
                    await trio.sleep_forever()
                await trio.sleep(1)
                if step == "return":
                    self.events.append(("return", name))
                    return
                self.events.append(("fail", name))
                raise ValueError(f"{name} failed")
            except trio.Cancelled:
                self.events.append(("stop", name))
                raise

        return worker(start, restart=restart, name=name)


def warnings_and_errors(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """How many WARNING and ERROR records the supervision logger emitted."""
    records = [r for r in caplog.records if r.name == LOGGER]
    return (
        sum(r.levelno == logging.WARNING for r in records),
        sum(r.levelno == logging.ERROR for r in records),
    )


# --- start order and shutdown order -----------------------------------------------------


async def test_children_start_in_order_each_ready_before_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """nursery.start(sup.run) returns once every child is ready, and each waits for the last."""
    events: list[Event] = []

    async def slow(name: str, task_status: trio.TaskStatus[None]) -> None:
        events.append(("begin", name))
        await trio.sleep(1)
        events.append(("ready", name))
        task_status.started()
        await trio.sleep_forever()

    sup = StaticSupervisor()
    for name in "abc":
        sup.add(worker(functools.partial(slow, name), name=name))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert events == [(step, n) for n in "abc" for step in ("begin", "ready")]
        assert trio.current_time() == 3
        nursery.cancel_scope.cancel()


async def test_cancel_stops_children_one_at_a_time_in_reverse_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelling a supervisor stops its children in reverse start order, each before the next."""
    events: list[tuple[str, str, float]] = []

    async def slow_to_stop(name: str, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            events.append(("stopping", name, trio.current_time()))
            with trio.move_on_after(5, shield=True):
                await trio.sleep(1)
            events.append(("stopped", name, trio.current_time()))

    sup = StaticSupervisor(Strategy.ONE_FOR_ALL)
    for name in "abc":
        sup.add(worker(functools.partial(slow_to_stop, name), name=name))
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            scope.cancel()
    assert scope.cancelled_caught
    assert events == [
        ("stopping", "c", 0),
        ("stopped", "c", 1),
        ("stopping", "b", 1),
        ("stopped", "b", 2),
        ("stopping", "a", 2),
        ("stopped", "a", 3),
    ]


async def test_shutdown_moves_on_from_a_child_that_ignores_cancellation(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A child still running after shutdown_grace is logged and skipped, yet still awaited."""
    stopped: dict[str, float] = {}

    def stubborn(name: str, linger: float) -> Callable[[trio.TaskStatus[None]], Awaitable[None]]:
        # Ignores its cancellation for `linger` seconds.
        return _slow_to_stop(linger, functools.partial(stopped.__setitem__, name))

    sup = StaticSupervisor(shutdown_grace=2, name="sup")
    sup.add(worker(stubborn("a", 0), name="a"))
    sup.add(worker(stubborn("b", 10), name="b"))
    sup.add(worker(stubborn("c", 0), name="c"))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        nursery.cancel_scope.cancel()
    # c at once, b given up on after its 2 s grace, a right after; b is still awaited.
    assert stopped == {"c": 0, "a": 2, "b": 10}
    assert trio.current_time() == 10
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "'b' ignored cancellation for 2 s" in record.getMessage()


def _slow_to_stop(
    seconds: float, stopped: Callable[[float], object]
) -> Callable[[trio.TaskStatus[None]], Awaitable[None]]:
    """A child that, once cancelled, ignores it for ``seconds``, then tells ``stopped`` when."""

    async def child(task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.move_on_after(2 * seconds + 1, shield=True):
                await trio.sleep(seconds)
            stopped(trio.current_time())

    return child


async def test_dynamic_stops_its_children_together_each_with_its_grace(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """1,000 children that each need 0.5 s to stop are stopped together, in 0.5 s, unlogged."""
    stopped: list[float] = []
    slow_to_stop = _slow_to_stop(0.5, stopped.append)
    sup = DynamicSupervisor(shutdown_grace=1, name="dyn")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for _ in range(1_000):
            sup.start_child(worker(slow_to_stop))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert stopped == [0.5] * 1_000
    assert trio.current_time() == 0.5
    assert warnings_and_errors(caplog) == (0, 0)


async def test_dynamic_stops_all_its_children_with_one_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1,000 children are stopped by cancelling the supervisor's nursery once, not each scope."""
    cancelled: list[trio.CancelScope] = []
    cancel = trio.CancelScope.cancel

    def counted(scope: trio.CancelScope, *args: Any, **kwargs: Any) -> None:
        cancelled.append(scope)
        cancel(scope, *args, **kwargs)

    stopped: list[float] = []
    sup = DynamicSupervisor(name="dyn")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for _ in range(1_000):
            sup.start_child(worker(_slow_to_stop(0, stopped.append)))
        await trio.testing.wait_all_tasks_blocked()
        monkeypatch.setattr(trio.CancelScope, "cancel", counted)
        nursery.cancel_scope.cancel()
    assert len(stopped) == 1_000
    # This test's own cancel, then the supervisor's of its nursery.
    assert len(cancelled) == 2, len(cancelled)


async def test_dynamic_shutdown_reports_and_leaves_behind_a_child_that_ignores_cancellation(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Among many children, the one still running after the grace is logged, yet awaited."""
    stopped: dict[str, float] = {}

    def stubborn(name: str, linger: float) -> Callable[[trio.TaskStatus[None]], Awaitable[None]]:
        # Ignores its cancellation for `linger` seconds.
        return _slow_to_stop(linger, functools.partial(stopped.__setitem__, name))

    sup = DynamicSupervisor(shutdown_grace=2, name="dyn")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for i in range(100):
            sup.start_child(worker(stubborn(f"c{i}", 0), name=f"c{i}"))
        sup.start_child(worker(stubborn("late", 10), name="late"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert stopped == {**{f"c{i}": 0 for i in range(100)}, "late": 10}
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "'late' ignored cancellation for 2 s" in record.getMessage()


async def test_a_nested_supervisor_is_not_timed_by_its_parents_grace(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A supervisor child stops its children within its own grace; its parent waits, unlogged."""
    stopped: list[float] = []
    slow_to_stop = _slow_to_stop(2, stopped.append)
    inner = DynamicSupervisor(shutdown_grace=3, name="inner")

    async def run_inner(task_status: trio.TaskStatus[None]) -> None:
        # As the runtime does: a worker that runs a dynamic supervisor in its own nursery.
        async with trio.open_nursery() as nursery:
            await nursery.start(inner.run)
            for _ in range(10):
                inner.start_child(worker(slow_to_stop))
            task_status.started()
            await trio.sleep_forever()

    static = StaticSupervisor(shutdown_grace=3, name="static-inner")
    static.add(worker(slow_to_stop, name="first"))
    outer = StaticSupervisor(shutdown_grace=1, name="outer")
    outer.add(worker(slow_to_stop, name="a")).add(static.supervised())
    outer.add(worker(run_inner, name="inner-worker"))
    async with trio.open_nursery() as nursery:
        await nursery.start(outer.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    # inner's ten at 2, then static-inner's child at 4; "a" is stopped after them,
    # the only one its 1 s grace is too short for.
    assert stopped == [2.0] * 10 + [4.0, 6.0]
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "'a' ignored cancellation for 1 s" in record.getMessage()


@pytest.mark.parametrize("straggler", [False, True])
async def test_a_nested_dynamic_supervisors_stop_ends_when_its_nursery_has_closed(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, straggler: bool
) -> None:
    """Its parent is told after the nursery took its children in, or at once for a straggler."""
    events: list[str] = []
    run_nursery = _supervisor._run_nursery

    async def recorded(body: Callable[[trio.Nursery], Awaitable[None]]) -> None:
        try:
            await run_nursery(body)
        finally:
            events.append("nursery closed")

    leave = _supervisor._StopLink.leave

    def left(link: Any) -> None:
        events.append("parent told")
        leave(link)

    monkeypatch.setattr(_supervisor, "_run_nursery", recorded)
    monkeypatch.setattr(_supervisor._StopLink, "leave", left)
    inner = DynamicSupervisor(shutdown_grace=1, name="inner")

    async def run_inner(task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(inner.run)
            for _ in range(100):
                inner.start_child(worker(_slow_to_stop(0, lambda _: None)))
            if straggler:
                inner.start_child(worker(_slow_to_stop(5, lambda _: None)))
            task_status.started()
            await trio.sleep_forever()

    outer = StaticSupervisor(shutdown_grace=10, name="outer")
    outer.add(worker(run_inner, name="inner-worker"))
    async with trio.open_nursery() as nursery:
        await nursery.start(outer.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    # The outer supervisor's own nursery closes last.
    inner_events = events[:2]
    if straggler:
        assert inner_events == ["parent told", "nursery closed"]
    else:
        assert inner_events == ["nursery closed", "parent told"]


# --- strategies and restart types --------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "after_failure"),
    [
        (Strategy.ONE_FOR_ONE, [("start", "b")]),
        (
            Strategy.ONE_FOR_ALL,
            [("stop", "c"), ("stop", "a"), ("start", "a"), ("start", "b"), ("start", "c")],
        ),
        (Strategy.REST_FOR_ONE, [("stop", "c"), ("start", "b"), ("start", "c")]),
    ],
)
async def test_strategy_decides_which_siblings_stop_and_restart_and_in_what_order(
    autojump_clock: trio.testing.MockClock, strategy: Strategy, after_failure: list[Event]
) -> None:
    """A failed middle child restarts alone, with all, or with the children after it."""
    rec = Recorder()
    sup = StaticSupervisor(strategy).add(rec.child("a"))
    sup.add(rec.child("b", ["fail"])).add(rec.child("c"))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    started = [("start", "a"), ("start", "b"), ("start", "c")]
    shutdown = [("stop", "c"), ("stop", "b"), ("stop", "a")]
    assert rec.events == [*started, ("fail", "b"), *after_failure, *shutdown]


@pytest.mark.parametrize(
    ("restart", "step", "starts"),
    [
        (Restart.PERMANENT, "return", 2),
        (Restart.PERMANENT, "fail", 2),
        (Restart.TRANSIENT, "return", 1),
        (Restart.TRANSIENT, "fail", 2),
        (Restart.TEMPORARY, "return", 1),
        (Restart.TEMPORARY, "fail", 1),
    ],
)
async def test_restart_type_decides_whether_an_ended_child_starts_again(
    autojump_clock: trio.testing.MockClock, restart: Restart, step: str, starts: int
) -> None:
    """Permanent restarts after any end, transient only after an error, temporary never."""
    rec = Recorder()
    sup = StaticSupervisor(Strategy.ONE_FOR_ALL)
    sup.add(rec.child("keep")).add(rec.child("x", [step], restart=restart))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(10)
        assert rec.starts == {"keep": 1 if starts == 1 else 2, "x": starts}
        nursery.cancel_scope.cancel()


async def test_temporary_child_stopped_because_of_a_sibling_is_not_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Under ONE_FOR_ALL a temporary sibling is stopped with the others but not started again."""
    rec = Recorder()
    sup = StaticSupervisor(Strategy.ONE_FOR_ALL)
    sup.add(rec.child("temp", restart=Restart.TEMPORARY)).add(rec.child("b", ["fail"]))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert rec.events == [
        ("start", "temp"),
        ("start", "b"),
        ("fail", "b"),
        ("stop", "temp"),
        ("start", "b"),
        ("stop", "b"),
    ]


async def test_restart_is_logged_as_a_warning_with_label_reason_and_count(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Each restart logs a WARNING on trio_es.supervision naming child, reason and count."""
    rec = Recorder()
    sup = StaticSupervisor(name="sup", intensity=3).add(rec.child("b", ["fail", "return"]))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    first, second = (r.getMessage() for r in caplog.records if r.name == LOGGER)
    assert first.startswith("supervisor 'sup': restarting child 'b' after ValueError('b failed')")
    assert "(restart 1 of 3 allowed within 5 s)" in first
    assert "permanent child 'b' returned" in second
    assert "(restart 2 of 3 allowed within 5 s)" in second
    assert warnings_and_errors(caplog) == (2, 0)


# --- intensity and escalation ------------------------------------------------------------


async def test_gives_up_after_intensity_restarts_within_period(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """One failure more than intensity within period stops all children and raises GaveUp."""
    rec = Recorder()
    sup = StaticSupervisor(intensity=2, period=10, name="sup")
    sup.add(rec.child("a")).add(rec.child("b", ["fail"] * 10)).add(rec.child("c"))
    with pytest.raises(SupervisorGaveUp) as info:
        await sup.run()
    error = info.value
    assert isinstance(error, EventSourcingError)
    assert (error.supervisor, error.child, error.restarts, error.period) == ("sup", "b", 2, 10)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.supervisor, copy.child, copy.restarts, copy.period) == ("sup", "b", 2, 10)
    assert isinstance(error.__cause__, ValueError)
    assert str(error.__cause__) == "b failed"
    assert str(error) == (
        "supervisor 'sup' gave up because child 'b' failed again after 2 restarts within "
        "10 s (see __cause__); fix that failure or raise the supervisor's intensity"
    )
    assert rec.starts == {"a": 1, "b": 3, "c": 1}
    assert rec.events[-2:] == [("stop", "c"), ("stop", "a")]
    assert warnings_and_errors(caplog) == (2, 1)


async def test_restarts_older_than_period_are_forgotten(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Failures spaced further apart than period (on Trio's clock) never exhaust intensity."""
    rec = Recorder()
    sup = StaticSupervisor(intensity=1, period=0.5).add(rec.child("b", ["fail"] * 100))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(10.5)
        assert rec.starts["b"] == 11
        nursery.cancel_scope.cancel()


async def test_give_up_escalates_through_two_levels(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A nested supervisor that gives up is restarted by its parent, which gives up in turn."""
    rec = Recorder()
    inner = StaticSupervisor(intensity=1, period=100, name="inner")
    inner.add(rec.child("flaky", ["fail"] * 100))
    outer = StaticSupervisor(intensity=2, period=100, name="outer")
    outer.add(rec.child("steady")).add(inner.supervised())
    with pytest.raises(SupervisorGaveUp) as info:
        await outer.run()
    error = info.value
    assert (error.supervisor, error.child, error.restarts) == ("outer", "inner", 2)
    cause = error.__cause__
    assert isinstance(cause, SupervisorGaveUp)
    assert (cause.supervisor, cause.child, cause.restarts) == ("inner", "flaky", 1)
    assert isinstance(cause.__cause__, ValueError)
    # Three runs of inner, each starting flaky twice; steady is never restarted.
    assert rec.starts == {"steady": 1, "flaky": 6}
    assert rec.events[-1] == ("stop", "steady")
    # inner: 3 runs x (1 restart + 1 give-up); outer: 2 restarts + 1 give-up.
    assert warnings_and_errors(caplog) == (3 + 2, 3 + 1)


async def test_failure_before_started_counts_as_a_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A child failing before task_status.started() is restarted before later children start."""
    rec = Recorder()
    sup = StaticSupervisor(intensity=2).add(rec.child("a"))
    sup.add(rec.child("b", ["fail_early", "fail_early"])).add(rec.child("c"))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert rec.events == [
            ("start", "a"),
            ("start", "b"),
            ("fail", "b"),
            ("start", "b"),
            ("fail", "b"),
            ("start", "b"),
            ("start", "c"),
        ]
        nursery.cancel_scope.cancel()


async def test_failures_during_startup_can_exhaust_intensity(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """nursery.start(sup.run) raises GaveUp when a child keeps failing before it is ready."""
    rec = Recorder()
    sup = StaticSupervisor(intensity=1).add(rec.child("a"))
    sup.add(rec.child("b", ["fail_early"] * 10)).add(rec.child("c"))
    async with trio.open_nursery() as nursery:
        with pytest.raises(SupervisorGaveUp) as info:
            await nursery.start(sup.run)
    assert isinstance(info.value.__cause__, ValueError)
    assert rec.starts == {"a": 1, "b": 2}
    assert rec.events[-1] == ("stop", "a")


# --- what is not a failure ---------------------------------------------------------------


@pytest.mark.parametrize("fatal", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("nested", [False, True])
async def test_base_exceptions_are_not_failures_and_propagate(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    fatal: type[BaseException],
    nested: bool,
) -> None:
    """KeyboardInterrupt/SystemExit stop the siblings, are never restarted, and escape bare."""
    rec = Recorder()

    async def explode(task_status: trio.TaskStatus[None]) -> None:
        rec.events.append(("start", "boom"))
        task_status.started()
        await trio.sleep(1)
        raise fatal

    sup = StaticSupervisor(Strategy.ONE_FOR_ONE).add(rec.child("a"))
    sup.add(worker(explode, name="boom")).add(rec.child("c"))
    root = StaticSupervisor().add(rec.child("root")).add(sup.supervised()) if nested else sup
    with pytest.raises(fatal):
        await root.run()
    expected = [("start", "a"), ("start", "boom"), ("start", "c"), ("stop", "c"), ("stop", "a")]
    if nested:
        expected = [("start", "root"), *expected, ("stop", "root")]
    assert rec.events == expected
    assert warnings_and_errors(caplog) == (0, 0)


async def test_dynamic_supervisor_lets_base_exceptions_propagate(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A dynamic child's KeyboardInterrupt stops the others and escapes bare."""
    rec = Recorder()
    sup = DynamicSupervisor()

    async def explode(task_status: trio.TaskStatus[None]) -> None:
        await trio.sleep(1)
        raise KeyboardInterrupt

    async def feed() -> None:
        await trio.testing.wait_all_tasks_blocked()
        sup.start_child(rec.child("a"))
        sup.start_child(worker(explode))
        sup.start_child(rec.child("c"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        with pytest.raises(KeyboardInterrupt):
            await sup.run()
    # All are cancelled at once: they end in the scheduler's order.
    assert sorted(rec.events[2:]) == [("stop", "a"), ("stop", "c")]
    assert len(sup) == 0
    assert warnings_and_errors(caplog) == (0, 0)


async def test_cancellation_is_not_a_failure_and_propagates(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelling a tree stops every child in reverse order and restarts none of them."""
    rec = Recorder()
    inner = StaticSupervisor(Strategy.ONE_FOR_ALL).add(rec.child("a")).add(rec.child("b"))
    outer = StaticSupervisor(Strategy.ONE_FOR_ALL, intensity=0)
    outer.add(inner.supervised()).add(rec.child("c"))
    with trio.move_on_after(5) as scope:
        await outer.run()
    assert scope.cancelled_caught
    assert rec.events == [
        ("start", "a"),
        ("start", "b"),
        ("start", "c"),
        ("stop", "c"),
        ("stop", "b"),
        ("stop", "a"),
    ]
    assert warnings_and_errors(caplog) == (0, 0)


# --- names -------------------------------------------------------------------------------


async def test_restarted_child_keeps_its_name_and_gets_messages_queued_meanwhile() -> None:
    """A named child reads the same mailbox after a restart, queued messages included."""
    name = new_name("echo")
    received: list[str] = []
    mailboxes: list[int] = []

    async def actor(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        mailbox = named_subject(name)
        mailboxes.append(id(mailbox))
        task_status.started()
        while True:
            message = await mailbox.get()
            if message == "crash":
                raise ValueError("asked to crash")
            received.append(message)

    spec = worker(actor, name=name)
    assert spec.name == "echo"
    sup = StaticSupervisor().add(spec)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        mailbox = named_subject(name)
        for message in ["a", "crash", "b", "c"]:
            mailbox.send(message)
        # "a" went straight to the waiting actor; the rest wait in the mailbox, so "b" and
        # "c" are queued before the crash and must reach the restarted actor.
        assert len(mailbox) == 3
        await trio.testing.wait_all_tasks_blocked()
        assert received == ["a", "b", "c"]
        assert mailboxes == [id(mailbox), id(mailbox)]
        nursery.cancel_scope.cancel()


# --- dynamic supervisor ------------------------------------------------------------------


async def test_dynamic_restarts_only_the_failed_child(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A dynamic supervisor restarts a failed child alone and stops every child at the end."""
    rec = Recorder()
    sup = DynamicSupervisor()
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for spec in [rec.child("a"), rec.child("b", ["fail"]), rec.child("c")]:
            sup.start_child(spec)
        await trio.sleep(5)
        assert len(sup) == 3
        nursery.cancel_scope.cancel()
    # Children scheduled together start, and are stopped together, in any order (Trio
    # shuffles).
    assert sorted(rec.events[:3]) == [("start", "a"), ("start", "b"), ("start", "c")]
    assert rec.events[3:5] == [("fail", "b"), ("start", "b")]
    assert sorted(rec.events[5:]) == [("stop", "a"), ("stop", "b"), ("stop", "c")]
    assert len(sup) == 0


async def test_dynamic_per_child_give_up_stops_only_that_child(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """With per_child, a child failing too often is stopped alone and on_give_up is told."""
    rec = Recorder()
    gave_up: list[SupervisorGaveUp] = []
    sup = DynamicSupervisor(intensity=2, period=100, per_child=True, name="aggs")

    def told(error: SupervisorGaveUp) -> None:
        # Told only once the child is gone, so a replacement could be started here.
        assert flaky.finished
        assert len(sup) == 1
        gave_up.append(error)

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        flaky = sup.start_child(rec.child("flaky", ["fail"] * 10), on_give_up=told)
        steady = sup.start_child(rec.child("steady", ["fail"]))
        await flaky.wait()
        assert flaky.finished
        assert not steady.finished
        assert rec.starts == {"flaky": 3, "steady": 2}
        [error] = gave_up
        assert (error.supervisor, error.child, error.restarts) == ("aggs", "flaky", 2)
        assert isinstance(error.__cause__, ValueError)
        assert len(sup) == 1
        # Still running: takes new children and counts restarts afresh for them.
        late = sup.start_child(rec.child("late", ["fail", "fail"]))
        await trio.sleep(10)
        assert rec.starts["late"] == 3
        assert not late.finished
        nursery.cancel_scope.cancel()
    assert ("stop", "flaky") not in rec.events
    assert warnings_and_errors(caplog) == (2 + 1 + 2, 1)


async def test_dynamic_on_give_up_that_raises_is_logged_and_ignored(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An on_give_up callback that raises does not take the supervisor down; it is logged."""
    rec = Recorder()

    def broken(error: SupervisorGaveUp) -> None:
        raise RuntimeError("callback bug")

    sup = DynamicSupervisor(intensity=0, per_child=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        other = sup.start_child(rec.child("other"))
        await sup.start_child(rec.child("flaky", ["fail"]), on_give_up=broken).wait()
        assert not other.finished
        sup.start_child(rec.child("after"))
        await trio.testing.wait_all_tasks_blocked()
        assert rec.starts == {"other": 1, "flaky": 1, "after": 1}
        nursery.cancel_scope.cancel()
    [logged] = [r for r in caplog.records if r.exc_info is not None]
    assert "on_give_up for child 'flaky' raised" in logged.getMessage()
    assert isinstance(logged.exc_info[1], RuntimeError)  # type: ignore[index]


async def test_dynamic_without_per_child_gives_up_as_a_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Without per_child, restarts of all children add up and too many stop every child."""
    rec = Recorder()
    sup = DynamicSupervisor(intensity=2, period=100, name="aggs")
    handles = []
    with pytest.RaisesGroup(SupervisorGaveUp) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            handles = [
                sup.start_child(rec.child(name, plan))
                for name, plan in [("a", []), ("b", ["fail"]), ("c", ["fail"] * 2), ("d", [])]
            ]
    [error] = info.value.exceptions
    assert isinstance(error, SupervisorGaveUp)
    assert (error.supervisor, error.child, error.restarts) == ("aggs", "c", 2)
    assert isinstance(error.__cause__, ValueError)
    assert all(handle.finished for handle in handles)
    assert sorted(rec.events[-3:]) == [("stop", "a"), ("stop", "b"), ("stop", "d")]
    with pytest.raises(RuntimeError, match="is not running"):
        sup.start_child(rec.child("late"))


async def test_dynamic_stop_ends_a_child_for_good() -> None:
    """ChildHandle.stop cancels the child without restart, is idempotent, and wait returns."""
    rec = Recorder()
    sup = DynamicSupervisor()
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        handle = sup.start_child(rec.child("a"))
        await trio.testing.wait_all_tasks_blocked()
        handle.stop()
        handle.stop()
        await handle.wait()
        assert handle.finished
        # Stopped before it ever ran: it never starts.
        early = sup.start_child(rec.child("early"))
        early.stop()
        await early.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert len(sup) == 0
        early.stop()
        nursery.cancel_scope.cancel()
    assert rec.events == [("start", "a"), ("stop", "a")]


async def test_a_child_that_is_not_stoppable_runs_without_a_scope_of_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Unstoppable children get no cancel scope, stop with their supervisor, restart on failure."""
    runs: list[str] = []
    scopes: list[trio.CancelScope] = []
    cancelled: list[str] = []

    async def child(name: str, task_status: trio.TaskStatus[None]) -> None:
        runs.append(name)
        scopes.append(trio.CancelScope())  # made by the child itself: the one to ignore
        if runs.count(name) == 1 and name == "fails":
            raise ValueError("once")
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(name)
            raise

    made: list[trio.CancelScope] = []
    scope_init = trio.CancelScope.__init__

    def counted(scope: trio.CancelScope, *args: Any, **kwargs: Any) -> None:
        made.append(scope)
        scope_init(scope, *args, **kwargs)

    sup = DynamicSupervisor(name="dyn")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(trio.CancelScope, "__init__", counted)
            handles = [
                sup._start_child(
                    functools.partial(child, name),
                    Restart.TRANSIENT,
                    name,
                    name,
                    None,
                    stoppable=False,
                )
                for name in ("a", "fails")
            ]
            await trio.testing.wait_all_tasks_blocked()
        # The children's own scopes only: the supervisor made none for them.
        assert [scope for scope in made if scope not in scopes] == []
        assert all(handle._scope is None for handle in handles)
        assert sorted(runs) == ["a", "fails", "fails"]
        assert len(sup) == 2
        nursery.cancel_scope.cancel()
    assert sorted(cancelled) == ["a", "fails"]
    assert all(handle.finished for handle in handles)


async def test_stop_keeps_a_child_that_is_not_stoppable_from_restarting() -> None:
    """stop() on an unstoppable child does not cancel it; once it returns it is not restarted."""
    release = trio.Event()
    runs: list[int] = []

    async def child(task_status: trio.TaskStatus[None]) -> None:
        runs.append(1)
        await release.wait()
        raise ValueError("would be restarted")

    sup = DynamicSupervisor(name="dyn")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        handle = sup._start_child(child, Restart.PERMANENT, "c", "c", None, stoppable=False)
        await trio.testing.wait_all_tasks_blocked()
        handle.stop()
        await trio.testing.wait_all_tasks_blocked()
        assert not handle.finished  # still running: nothing cancelled it
        release.set()
        await handle.wait()
        assert runs == [1]
        nursery.cancel_scope.cancel()


async def test_dynamic_releases_records_of_children_gone_for_good(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Finished, failed-then-finished and stopped children leave nothing behind."""
    sup = DynamicSupervisor(per_child=True, intensity=1, period=100)

    async def brief(fail: bool, task_status: trio.TaskStatus[None]) -> None:
        await trio.sleep(1)
        if fail:
            raise ValueError("once")

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        done = [
            sup.start_child(worker(functools.partial(brief, False), restart=Restart.TRANSIENT))
            for _ in range(500)
        ]
        first = weakref.ref(done[0])
        # Each fails on every run: restarted once, then given up on.
        for _ in range(500):
            sup.start_child(worker(functools.partial(brief, True), restart=Restart.TRANSIENT))
        assert len(sup) == 1000
        for handle in done:
            await handle.wait()
        await trio.sleep(5)
        assert len(sup) == 0
        del done, handle
        gc.collect()
        assert first() is None
        nursery.cancel_scope.cancel()


async def test_dynamic_start_child_needs_a_running_supervisor() -> None:
    """start_child raises RuntimeError before run and after it ended."""
    sup = DynamicSupervisor(name="dyn")
    spec = worker(trio.sleep_forever)
    with pytest.raises(RuntimeError, match=r"supervisor 'dyn' is not running"):
        sup.start_child(spec)
    with trio.move_on_after(0.01):
        await sup.run()
    with pytest.raises(RuntimeError, match="is not running"):
        sup.start_child(spec)


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"intensity": -1}, ValueError, r"intensity must be an int >= 0 \(got -1\)"),
        ({"intensity": True}, TypeError, r"intensity must be an int >= 0 \(got True\)"),
        ({"intensity": 1.5}, TypeError, r"intensity must be an int >= 0 \(got 1.5\)"),
        ({"period": 0}, ValueError, r"period must be a positive number of seconds \(got 0\)"),
        ({"period": "5"}, TypeError, r"period must be a positive number of seconds \(got '5'\)"),
        ({"shutdown_grace": -1.0}, ValueError, r"shutdown_grace .* >= 0 \(got -1.0\)"),
        ({"name": 3}, TypeError, r"name must be a str or None \(got 3\)"),
    ],
)
@pytest.mark.parametrize("kind", [StaticSupervisor, DynamicSupervisor])
def test_bad_settings_are_refused_with_the_value_shown(
    kind: type[Any], kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    """Out-of-range or mistyped supervisor settings raise one clear error naming the value."""
    with pytest.raises(error, match=message):
        kind(**kwargs)


def test_bad_child_specifications_are_refused() -> None:
    """A child needs a callable start and a Restart; add takes only specifications."""
    with pytest.raises(TypeError, match="start must be an async function"):
        worker(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="restart must be a Restart"):
        worker(trio.sleep_forever, restart="permanent")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="add\\(\\) takes a ChildSpecification"):
        StaticSupervisor().add(trio.sleep_forever)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Strategy"):
        StaticSupervisor("one_for_one")  # type: ignore[arg-type]


async def test_static_children_are_fixed_once_it_runs_and_it_runs_once_at_a_time() -> None:
    """add() after run() started, or a second concurrent run(), raise RuntimeError."""
    rec = Recorder()
    sup = StaticSupervisor(name="sup").add(rec.child("a"))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(RuntimeError, match="add every child before calling run"):
            sup.add(rec.child("b"))
        with pytest.raises(RuntimeError, match="'sup' is already running"):
            await sup.run()
        nursery.cancel_scope.cancel()


# --- property ----------------------------------------------------------------------------

_STEPS = st.sampled_from(["fail", "fail_early", "return"])
_DELAYS = st.integers(min_value=0, max_value=3)


@given(
    strategy=st.sampled_from(Strategy),
    intensity=st.integers(min_value=0, max_value=4),
    first=st.lists(st.tuples(_STEPS, _DELAYS), min_size=1, max_size=4),
    others=st.lists(st.lists(st.tuples(_STEPS, _DELAYS), max_size=4), max_size=3),
)
def test_after_giving_up_no_child_runs_and_exactly_intensity_restarts_happened(
    strategy: Strategy,
    intensity: int,
    first: list[tuple[str, int]],
    others: list[list[tuple[str, int]]],
) -> None:
    """For any failure schedule, giving up leaves no child running after intensity restarts."""
    alive = 0
    restarts = 0

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            nonlocal restarts
            restarts += record.levelno == logging.WARNING

    runs: Counter[int] = Counter()

    async def child(index: int, plan: list[tuple[str, int]], task_status: Any) -> None:
        # Child 0 cycles through its plan, so each of its runs ends: the supervisor must
        # give up. The others follow their plan once, then run until cancelled.
        nonlocal alive
        alive += 1
        try:
            run = runs[index]
            runs[index] += 1
            if index > 0 and run >= len(plan):
                task_status.started()
                await trio.sleep_forever()
            step, delay = plan[run % len(plan)]
            if step == "fail_early":
                await trio.sleep(delay)
                raise ValueError("early")
            task_status.started()
            await trio.sleep(delay)
            if step == "fail":
                raise ValueError("late")
        finally:
            alive -= 1

    sup = StaticSupervisor(strategy, intensity=intensity, period=1000)
    for index, plan in enumerate([first, *others]):
        sup.add(worker(functools.partial(child, index, plan)))

    async def main() -> None:
        with pytest.raises(SupervisorGaveUp) as info:
            await sup.run()
        assert info.value.restarts == intensity

    handler = Count()
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logger.removeHandler(handler)
    assert alive == 0
    assert restarts == intensity
