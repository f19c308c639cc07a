"""Given/when/then tests for a domain's ``handle`` and ``apply``: plain, synchronous, no Trio.

``Scenario(handle=..., apply=..., empty_state=...)`` holds the domain;
``scenario.given(*events).when(command).then(*events)`` checks the events one command
decides on the state the given events build, and ``.then_raises(SomeDomainError)`` checks
that it is refused. Each step runs what the runtime runs, in the same way: ``apply`` folds
the given events, ``handle`` decides, a generator or other iterable it returns is read
once, and the decided events are applied (so a crashing ``apply`` fails the test too).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any, Generic, TypeVar, final

import attrs

from .._aggregate import BadEvents, events_of
from .._runtime import ApplyFn as ApplyFn
from .._runtime import HandleFn as HandleFn

__all__ = ["ApplyFn", "Given", "HandleFn", "Scenario", "When"]

CommandT = TypeVar("CommandT")
EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")
ErrorT = TypeVar("ErrorT", bound=Exception)


def _run_without_trio(awaitable: Any, command: object) -> Any:
    """The result of an async ``handle`` that never suspends, run without an event loop.

    An ``async def handle`` that awaits nothing real (no sleep, no I/O) finishes on its
    first step, so it needs no Trio; one that does suspend is closed and reported.
    """
    try:
        awaitable.send(None)
    except StopIteration as done:
        return done.value
    awaitable.close()
    raise RuntimeError(
        f"handle suspended on command {command!r:.80}, which needs a running Trio loop; "
        "test it with trio_es.testing.open_test_system inside trio.run (or a trio test)"
    )


def _decide(
    handle: HandleFn[EntityT, CommandT, EventT], state: EntityT, command: CommandT
) -> list[EventT]:
    """``handle(state, command)`` as the runtime runs it: awaited if async, read once."""
    result: Any = handle(state, command)
    if inspect.iscoroutinefunction(handle):
        result = _run_without_trio(result, command)
    try:
        return list(events_of(result, command))
    except BadEvents as bad:
        raise bad.error from None


def _listing(events: Sequence[object]) -> str:
    if not events:
        return "no events"
    return "\n".join(f"    {n}. {event!r}" for n, event in enumerate(events, start=1))


@final
@attrs.frozen
class Scenario(Generic[EntityT, CommandT, EventT]):
    """A domain under test: its ``handle``, ``apply`` and empty state.

    Build it once per test module and start each test with :meth:`given`.

    Attributes:
        handle: ``handle(state, command) -> events``, plain or async; raise a
            :class:`~trio_es.DomainError` to refuse. An async one may await other
            coroutines but nothing that suspends (Trio's sleeps or I/O): the scenario
            runs it without an event loop.
        apply: ``apply(state, event) -> state``.
        empty_state: the state of an aggregate without events.
    """

    handle: HandleFn[EntityT, CommandT, EventT]
    apply: ApplyFn[EntityT, EventT]
    empty_state: EntityT

    def given(self, *events: EventT) -> Given[EntityT, CommandT, EventT]:
        """An aggregate whose history is ``events`` (none: a new aggregate).

        The events are applied to ``empty_state`` at once, so an ``apply`` that fails
        on them raises here, with its own exception.
        """
        state = self.empty_state
        for event in events:
            state = self.apply(state, event)
        return Given(self, events, state)


@final
@attrs.frozen
class Given(Generic[EntityT, CommandT, EventT]):
    """An aggregate with a history, as :meth:`Scenario.given` builds it.

    Attributes:
        scenario: the domain.
        events: the history.
        state: ``empty_state`` with the history applied.
    """

    scenario: Scenario[EntityT, CommandT, EventT]
    events: tuple[EventT, ...]
    state: EntityT

    def when(self, command: CommandT) -> When[EntityT, CommandT, EventT]:
        """The command to decide; nothing runs until ``then`` or ``then_raises``."""
        return When(self, command)


@final
@attrs.frozen
class When(Generic[EntityT, CommandT, EventT]):
    """A command on an aggregate with a history; finish with ``then`` or ``then_raises``."""

    given: Given[EntityT, CommandT, EventT]
    command: CommandT

    def _describe(self) -> str:
        return f"  given:\n{_listing(self.given.events)}\n  when:\n    {self.command!r}"

    def then(self, *expected: EventT) -> EntityT:
        """Assert that ``handle`` decides exactly ``expected`` (none: it stores nothing).

        Events compare with ``==``, in order. The decided events are then applied.

        Returns:
            The state after the decided events, for further assertions.

        Raises:
            AssertionError: ``handle`` raised, or decided other events; the message
                shows the history, the command, and the expected and actual events.
        """
        scenario = self.given.scenario
        try:
            actual = _decide(scenario.handle, self.given.state, self.command)
        except Exception as error:
            raise AssertionError(
                f"handle raised {error!r} instead of deciding events\n"
                f"{self._describe()}\n  expected:\n{_listing(expected)}"
            ) from error
        if actual != list(expected):
            raise AssertionError(
                "handle decided other events than expected\n"
                f"{self._describe()}\n  expected:\n{_listing(expected)}\n"
                f"  actual:\n{_listing(actual)}"
            )
        state = self.given.state
        for event in actual:
            state = scenario.apply(state, event)
        return state

    def then_raises(self, error_type: type[ErrorT], *, match: str | None = None) -> ErrorT:
        """Assert that ``handle`` refuses the command with an ``error_type`` (or subclass).

        Args:
            error_type: the exception expected, usually a :class:`~trio_es.DomainError`
                subclass.
            match: a regular expression that ``str(error)`` must contain
                (``re.search``), as ``pytest.raises`` has it.

        Returns:
            The exception raised, for further assertions.

        Raises:
            AssertionError: ``handle`` decided events, raised another exception, or
                raised one whose message does not match.
        """
        scenario = self.given.scenario
        expectation = error_type.__name__ + ("" if match is None else f" matching {match!r}")
        try:
            actual = _decide(scenario.handle, self.given.state, self.command)
        except error_type as error:
            if match is not None and re.search(match, str(error)) is None:
                raise AssertionError(
                    f"handle raised {error!r}, whose message does not match {match!r}\n"
                    f"{self._describe()}"
                ) from error
            return error
        except Exception as error:
            raise AssertionError(
                f"handle raised {error!r} where {expectation} was expected\n{self._describe()}"
            ) from error
        raise AssertionError(
            f"handle decided events where {expectation} was expected\n"
            f"{self._describe()}\n  actual:\n{_listing(actual)}"
        )
