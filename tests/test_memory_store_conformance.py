"""The store conformance suites run against the in-memory stores, and what only they do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from trio_es import Aggregate, NonPositiveArgument
from trio_es._store import committed_envelopes
from trio_es._subject import new_name
from trio_es._supervisor import StaticSupervisor
from trio_es.memory_store import MemoryStore, SupervisedMemoryStore, supervised
from trio_es.testing import (
    Added,
    Counter,
    EventStoreConformance,
    ProjectionSourceConformance,
)


class TestMemoryStoreConformance(EventStoreConformance):
    """MemoryStore passes the shared store suite (it keeps objects, so no serialization)."""

    supports_serialization = False

    @pytest.fixture
    async def store(self) -> MemoryStore[Any, Any]:
        """A fresh, empty memory store."""
        return MemoryStore()


class TestMemoryStoreAsProjectionSource(ProjectionSourceConformance):
    """MemoryStore passes the projection-source suite, without transactional projections."""

    supports_transactional = False

    @pytest.fixture
    async def store(self) -> MemoryStore[Any, Any]:
        """A fresh, empty memory store with the suite's poll interval."""
        return MemoryStore(poll_interval=self.poll_interval)


@pytest.fixture
async def supervised_store(
    request: pytest.FixtureRequest,
) -> AsyncIterator[SupervisedMemoryStore[Any, Any]]:
    """A supervised memory store whose two actors run for the test."""
    poll_interval = getattr(request.cls, "poll_interval", 1.0)
    store, spec = supervised(new_name("events"), new_name("snapshots"), poll_interval=poll_interval)
    async with trio.open_nursery() as nursery:
        await nursery.start(StaticSupervisor().add(spec).run)
        yield store
        nursery.cancel_scope.cancel()


class TestSupervisedMemoryStoreConformance(EventStoreConformance):
    """SupervisedMemoryStore passes the shared store suite, read_all included."""

    supports_serialization = False

    @pytest.fixture
    async def store(
        self, supervised_store: SupervisedMemoryStore[Any, Any]
    ) -> SupervisedMemoryStore[Any, Any]:
        """A supervised memory store with its actors running."""
        return supervised_store


class TestSupervisedMemoryStoreAsProjectionSource(ProjectionSourceConformance):
    """SupervisedMemoryStore passes the projection-source suite, without transactional ones."""

    supports_transactional = False

    @pytest.fixture
    async def store(
        self, supervised_store: SupervisedMemoryStore[Any, Any]
    ) -> SupervisedMemoryStore[Any, Any]:
        """A supervised memory store with its actors running and the suite's poll interval."""
        return supervised_store


async def test_watch_returns_after_the_poll_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Without commits a memory store's watch returns exactly at the poll interval."""
    store: MemoryStore[Any, Any] = MemoryStore(poll_interval=2.5)
    async with store.watch() as watch:
        start = trio.current_time()
        await watch.wait(0)
        assert trio.current_time() - start == pytest.approx(2.5)


async def test_watch_wakes_on_commit_without_time_passing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A commit wakes a waiting watch at once: no clock time passes."""
    store: MemoryStore[Any, Any] = MemoryStore(poll_interval=60)
    woke_at: list[float] = []
    async with store.watch() as watch, trio.open_nursery() as nursery:

        async def subscriber() -> None:
            await watch.wait(0)
            woke_at.append(trio.current_time())

        nursery.start_soon(subscriber)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        async with store.transaction() as tx:
            await store.commit_events(tx, Aggregate("a", Counter(), 0), [Added(1)], ())
    assert woke_at == [start]


async def test_second_lease_takes_over_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """A memory store's standby lease takes over the moment the holder's block exits."""
    store: MemoryStore[Any, Any] = MemoryStore()
    taken_at: list[float] = []

    async def standby() -> None:
        async with store.projection_lease("p"):
            taken_at.append(trio.current_time())

    async with trio.open_nursery() as nursery, store.projection_lease("p"):
        nursery.start_soon(standby)
        await trio.sleep(100)
        assert taken_at == []
        released = trio.current_time()
    assert taken_at == [released]


async def test_staged_envelopes_stay_unplaced_and_stored_ones_are_placed() -> None:
    """commit_events' envelopes keep no position; loads and committed_envelopes have one."""
    store: MemoryStore[Any, Any] = MemoryStore()
    async with store.transaction() as tx:
        staged, _ = await store.commit_events(tx, Aggregate("a", Counter(), 0), [Added(1)], ())
    assert staged[0].global_position is None
    [placed] = committed_envelopes(tx, staged)
    async with store.transaction() as reader:
        [loaded] = await store.load_events(reader, "a", 0)
    assert (placed.global_position, placed.recorded_at) == (1, loaded.recorded_at)
    assert loaded.global_position == 1
    assert placed == staged[0] == loaded


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, NonPositiveArgument), (-1.0, NonPositiveArgument), ("1", TypeError), (True, TypeError)],
)
def test_poll_interval_is_checked(value: object, error: type[Exception]) -> None:
    """poll_interval must be a positive number of seconds, for both memory stores."""
    with pytest.raises(error, match="poll_interval"):
        MemoryStore(poll_interval=value)  # type: ignore[arg-type]
    with pytest.raises(error, match="poll_interval"):
        supervised(new_name("events"), new_name("snapshots"), poll_interval=value)  # type: ignore[arg-type]
