"""trio_es.testing's helpers for users: given/when/then scenarios and open_test_system."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, assert_type

import attrs
import pytest
import trio

import trio_es
from trio_es import Aggregate, DomainError, EventEnvelope, EventSourcing, open_eventsourcing
from trio_es._types import Snapshot, utc_now
from trio_es.memory_store import MemoryStore
from trio_es.sqlite_store import SqliteStore
from trio_es.testing import (
    Added,
    Counter,
    FaultInjectingStore,
    Scenario,
    SystemUnderTest,
    conformance_transcoder,
    open_test_system,
)

from . import _counter, _loading


@attrs.frozen
class Inc:
    """Command: add ``n`` to the counter."""

    n: int


@attrs.frozen
class Incd:
    """Event: ``n`` was added."""

    n: int


class TooBig(DomainError):
    """The counter may not go past 10."""


def handle(total: int, command: Inc) -> list[Incd]:
    if total + command.n > 10:
        raise TooBig(f"{total} + {command.n} is past 10")
    return [Incd(command.n)] if command.n else []


def apply(total: int, event: Incd) -> int:
    return total + event.n


counter = Scenario(handle=handle, apply=apply, empty_state=0)


# -- Scenario: given / when / then --


def test_then_passes_on_the_expected_events_and_returns_the_new_state() -> None:
    """then() accepts exactly the decided events and returns the state after them."""
    state = counter.given(Incd(2), Incd(3)).when(Inc(4)).then(Incd(4))
    assert state == 9


def test_then_with_no_events_expects_none() -> None:
    """then() without events passes when handle decides nothing."""
    assert counter.given().when(Inc(0)).then() == 0


def test_given_applies_the_history() -> None:
    """given() folds its events with apply over empty_state."""
    assert counter.given(Incd(2), Incd(5)).state == 7
    assert counter.given().state == 0


def test_then_shows_expected_and_actual_events_when_they_differ() -> None:
    """A mismatch fails with the history, the command, and both event lists."""
    with pytest.raises(AssertionError) as failure:
        counter.given(Incd(1)).when(Inc(2)).then(Incd(3))
    message = str(failure.value)
    assert message.startswith("handle decided other events than expected")
    assert "given:\n    1. Incd(n=1)" in message
    assert "when:\n    Inc(n=2)" in message
    assert "expected:\n    1. Incd(n=3)" in message
    assert "actual:\n    1. Incd(n=2)" in message


def test_then_fails_when_handle_refuses() -> None:
    """then() fails, chained to the refusal, when handle raises instead of deciding."""
    with pytest.raises(AssertionError, match="handle raised TooBig") as failure:
        counter.given(Incd(9)).when(Inc(2)).then(Incd(2))
    assert isinstance(failure.value.__cause__, TooBig)


def test_then_raises_returns_the_refusal() -> None:
    """then_raises() passes on the expected DomainError and hands it back."""
    error = counter.given(Incd(9)).when(Inc(2)).then_raises(TooBig, match=r"9 \+ 2")
    assert isinstance(error, TooBig)


def test_then_raises_fails_when_events_are_decided() -> None:
    """then_raises() fails, listing the events, when handle accepts the command."""
    with pytest.raises(
        AssertionError, match="handle decided events where TooBig was expected"
    ) as failure:
        counter.given().when(Inc(2)).then_raises(TooBig)
    assert "1. Incd(n=2)" in str(failure.value)


def test_then_raises_fails_on_another_exception() -> None:
    """then_raises() fails when handle raises an exception of another type."""

    def crashing(total: int, command: Inc) -> list[Incd]:
        raise KeyError(command)

    scenario = Scenario(handle=crashing, apply=apply, empty_state=0)
    with pytest.raises(AssertionError, match=r"raised KeyError.* where TooBig was expected"):
        scenario.given().when(Inc(1)).then_raises(TooBig)


def test_then_raises_fails_when_the_message_does_not_match() -> None:
    """then_raises(match=...) fails when the refusal's message does not contain the pattern."""
    with pytest.raises(AssertionError, match="does not match 'past 20'"):
        counter.given(Incd(9)).when(Inc(2)).then_raises(TooBig, match="past 20")


def test_a_generator_handle_is_read_once_and_its_events_applied() -> None:
    """A handle that yields its events is materialised once, as the runtime does."""
    calls: list[Inc] = []

    def generating(total: int, command: Inc) -> Iterator[Incd]:
        calls.append(command)
        yield Incd(command.n)
        yield Incd(1)

    # The runtime takes any iterable; handle's type says Sequence, for the common case.
    scenario: Scenario[int, Inc, Incd] = Scenario(
        handle=generating,  # type: ignore[arg-type]
        apply=apply,
        empty_state=0,
    )
    assert scenario.given(Incd(1)).when(Inc(3)).then(Incd(3), Incd(1)) == 5
    assert calls == [Inc(3)]


def test_a_handle_returning_no_events_fails_with_the_runtimes_type_error() -> None:
    """A handle that returns None fails then(), caused by the runtime's TypeError."""

    def forgetful(total: int, command: Inc) -> list[Incd]:
        return None  # type: ignore[return-value]

    scenario = Scenario(handle=forgetful, apply=apply, empty_state=0)
    with pytest.raises(AssertionError) as failure:
        scenario.given().when(Inc(1)).then()
    assert isinstance(failure.value.__cause__, TypeError)
    assert "handle must return a sequence of events" in str(failure.value.__cause__)


def test_an_async_handle_that_never_suspends_runs_without_trio() -> None:
    """An async handle that awaits only plain coroutines is run without an event loop."""

    async def decide(total: int, command: Inc) -> list[Incd]:
        return handle(total, command)

    async def async_handle(total: int, command: Inc) -> list[Incd]:
        return await decide(total, command)

    scenario = Scenario(handle=async_handle, apply=apply, empty_state=0)
    assert scenario.given().when(Inc(4)).then(Incd(4)) == 4
    scenario.given(Incd(10)).when(Inc(1)).then_raises(TooBig)


def test_an_async_handle_that_suspends_is_reported() -> None:
    """An async handle that suspends fails, naming open_test_system as the way to test it."""

    class Suspend:
        def __await__(self) -> Generator[None, None, None]:
            yield None

    async def waiting(total: int, command: Inc) -> list[Incd]:
        await Suspend()
        return [Incd(command.n)]

    scenario = Scenario(handle=waiting, apply=apply, empty_state=0)
    with pytest.raises(AssertionError) as failure:
        scenario.given().when(Inc(1)).then(Incd(1))
    assert isinstance(failure.value.__cause__, RuntimeError)
    assert "open_test_system" in str(failure.value.__cause__)


def test_a_failing_apply_fails_then() -> None:
    """then() applies the decided events, so an apply that crashes on them fails the test."""

    def fragile(total: int, event: Incd) -> int:
        if event.n == 3:
            raise ValueError("cannot apply 3")
        return total + event.n

    scenario = Scenario(handle=handle, apply=fragile, empty_state=0)
    with pytest.raises(ValueError, match="cannot apply 3"):
        scenario.given().when(Inc(3)).then(Incd(3))


# -- open_test_system --


async def test_open_test_system_runs_the_domain_on_a_memory_store() -> None:
    """Commands go through the real runtime; the store holds what was committed."""
    seen: list[tuple[str, int]] = []

    def record(aggregate_id: str, envelopes: Sequence[EventEnvelope[Any]]) -> None:
        seen.extend((aggregate_id, envelope.sequence) for envelope in envelopes)

    query = (trio_es.new_name("recorder"), record)
    async with open_test_system(
        handle=handle, apply=apply, empty_state=0, queries=[query]
    ) as system:
        await system.es.execute("c", Inc(4))
        await system.es.execute("c", Inc(5))
        with pytest.raises(TooBig):
            await system.es.execute("c", Inc(5))
        assert await system.es.load_aggregate("c") == Aggregate("c", 9, 2)
        assert await system.stored_events("c") == [Incd(4), Incd(5)]
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [("c", 1), ("c", 2)]


async def test_open_test_system_can_reuse_a_store() -> None:
    """A second system on the same store sees the first one's events."""
    store: MemoryStore[Incd, int] = MemoryStore()
    async with open_test_system(handle=handle, apply=apply, empty_state=0, store=store) as first:
        await first.es.execute("c", Inc(7))
        assert first.store is store
    async with open_test_system(handle=handle, apply=apply, empty_state=0, store=store) as second:
        assert (await second.es.load_aggregate("c")).entity == 7


async def test_open_test_system_stops_with_the_block() -> None:
    """Calls after the block exits raise SystemStopped, as with open_eventsourcing."""
    async with open_test_system(handle=handle, apply=apply, empty_state=0) as system:
        pass
    with pytest.raises(trio_es.SystemStopped):
        await system.es.execute("c", Inc(1))


# -- typing: what mypy infers for common domains (checked by mypy, run as a smoke test) --


def append(names: tuple[str, ...], command: Inc) -> list[Incd]:
    return [Incd(command.n)]


def append_applied(names: tuple[str, ...], event: Incd) -> tuple[str, ...]:
    return (*names, str(event.n))


async def test_handle_apply_and_empty_state_infer_the_system_types() -> None:
    """An int or tuple state infers the facade's types without casts or type: ignore."""
    assert_type(counter, Scenario[int, Inc, Incd])
    assert_type(counter.given().when(Inc(1)).then(Incd(1)), int)
    names = Scenario(handle=append, apply=append_applied, empty_state=())
    assert names.given(Incd(1)).when(Inc(2)).then(Incd(2)) == ("1", "2")

    async with open_test_system(handle=handle, apply=apply, empty_state=0) as system:
        assert_type(system, SystemUnderTest[Inc, Incd, int])
        await system.es.execute("x", Inc(1))
        assert_type((await system.es.load_aggregate("x")).entity, int)
        assert_type(await system.stored_events("x"), list[Incd])
    async with open_test_system(handle=append, apply=append_applied, empty_state=()) as named:
        assert_type(named, SystemUnderTest[Inc, Incd, tuple[str, ...]])
        await named.es.execute("n", Inc(3))
        aggregate = await named.es.load_aggregate("n")
        assert_type(aggregate.entity, tuple[str, ...])
        assert aggregate.entity == ("3",)

    # open_eventsourcing infers as well once the store's types are known.
    store: MemoryStore[Incd, int] = MemoryStore()
    async with open_eventsourcing(
        eventstore=store, handle=handle, apply=apply, empty_state=0
    ) as es:
        assert_type(es, EventSourcing[Inc, Incd, int])
        await es.execute("x", Inc(2))
        assert_type((await es.load_aggregate("x")).entity, int)


# -- without pytest or Hypothesis --

WITHOUT_TEST_LIBRARIES = textwrap.dedent(
    """
    import sys

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("pytest", "_pytest", "hypothesis"):
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, Blocked())

    import trio
    import trio_es.testing
    from trio_es import DomainError
    from trio_es.testing import Scenario, open_test_system

    class Big(DomainError):
        pass

    def handle(total, command):
        if command > 5:
            raise Big(command)
        return [command]

    def apply(total, event):
        return total + event

    scenario = Scenario(handle=handle, apply=apply, empty_state=0)
    assert scenario.given(1).when(2).then(2) == 3
    scenario.given().when(6).then_raises(Big)

    async def main():
        async with open_test_system(handle=handle, apply=apply, empty_state=0) as system:
            await system.es.execute("a", 4)
            assert await system.stored_events("a") == [4]

    trio.run(main)
    assert "pytest" not in sys.modules and "hypothesis" not in sys.modules
    try:
        trio_es.testing.check_runtime
    except ImportError as error:
        print(error)
    """
)


def test_testing_imports_and_scenarios_run_without_pytest_or_hypothesis() -> None:
    """trio_es.testing imports, and its helpers run, with pytest and Hypothesis unimportable."""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", WITHOUT_TEST_LIBRARIES],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("trio_es.testing.check_runtime needs Hypothesis"), result.stdout
    assert "pip install 'trio_es[testing]'" in result.stdout


def test_helpers_name_their_public_module() -> None:
    """The helpers' reprs say trio_es.testing, not the private module they live in."""
    assert repr(Scenario) == "<class 'trio_es.testing.Scenario'>"
    assert open_test_system.__module__ == "trio_es.testing"
    assert SystemUnderTest.__module__ == "trio_es.testing"


async def test_open_test_system_runs_projections() -> None:
    """open_test_system takes projections; wait_for_projection then reads your own write."""
    seen: list[int] = []

    async def record(batch: list[Any]) -> None:
        seen.extend(envelope.global_position for envelope in batch)

    async with open_test_system(
        handle=_counter.handle,
        apply=_counter.apply,
        empty_state=(),
        projections=[trio_es.Projection("seen", record)],
    ) as system:
        result = await system.es.execute("a", _counter.Append(("x", "y")))
        await system.es.wait_for_projection("seen", result.global_position)
    assert seen == [1, 2]


async def test_the_fault_store_passes_the_one_call_cold_load_through(tmp_path: Path) -> None:
    """A FaultInjectingStore over a SQL store loads snapshot and tail as the store does."""
    async with SqliteStore.open(tmp_path / "s.db", transcoder=conformance_transcoder()) as inner:
        await _loading.assert_snapshot_and_events_load_together(FaultInjectingStore(inner))


async def test_the_fault_store_loads_snapshot_and_tail_from_any_store() -> None:
    """Over a store without the one-call load, the fault store asks for snapshot then events."""
    inner: MemoryStore[Any, Any] = MemoryStore()
    store = FaultInjectingStore(inner)
    async with store.transaction() as tx:
        await store.commit_events(tx, Aggregate("acc", Counter(), 0), [Added(1), Added(2)], ())
    async with store.transaction() as tx:
        await store.save_snapshot(tx, Snapshot("acc", Counter(1), 1, utc_now()))
    async with store.transaction() as tx:
        snapshot, events = await store.load_snapshot_and_events(tx, "acc")
    assert snapshot is not None
    assert snapshot.sequence == 1
    assert [(e.sequence, e.payload) for e in events] == [(2, Added(2))]
