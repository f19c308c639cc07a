"""Projections and subscriptions: durable read models fed from the store, in order, once.

The runner is driven through ``open_eventsourcing`` on the memory store (checkpoints kept
in the store object) and on real SQLite files; the PostgreSQL and multi-process cases are
in ``test_projection_processes.py``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import trio_es
from trio_es import (
    ExecuteResult,
    Projection,
    ProjectionFailed,
    ProjectionStats,
    RuntimeOptions,
    open_eventsourcing,
    subscribe,
)
from trio_es.memory_store import MemoryStore
from trio_es.serialization import Transcoder
from trio_es.sqlite_store import SqliteStore

from . import _counter
from ._counter import Append, Appended


@asynccontextmanager
async def system(
    store: Any, *projections: Projection[Any], **kwargs: Any
) -> AsyncIterator[trio_es.EventSourcing[Any, Any, Any]]:
    """The counter domain on ``store`` with ``projections``."""
    async with open_eventsourcing(
        eventstore=store,
        handle=_counter.handle,
        apply=_counter.apply,
        empty_state=(),
        projections=list(projections),
        **kwargs,
    ) as es:
        yield es


class Recorder:
    """A non-transactional read model: every envelope it was handed, in order."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.batches = 0

    async def __call__(self, batch: list[Any]) -> None:
        self.batches += 1
        self.seen.extend(batch)

    def items(self) -> list[tuple[str, str]]:
        return [(e.aggregate_id, e.payload.item) for e in self.seen]

    def positions(self) -> list[int]:
        return [e.global_position for e in self.seen]


async def everything(store: Any) -> list[Any]:
    """Every stored event of ``store``, paging read_all."""
    stored: list[Any] = []
    while page := await store.read_all(stored[-1].global_position if stored else 0, 100):
        stored.extend(page)
    return stored


# -- execute's result and positioned envelopes -----------------------------------------


async def test_execute_returns_the_sequence_and_the_last_global_position() -> None:
    """execute returns ExecuteResult(aggregate_id, sequence after, last event's position)."""
    async with system(MemoryStore()) as es:
        first = await es.execute("a", Append(("x", "y")))
        second = await es.execute("b", Append(("z",)))
        nothing = await es.execute("a", Append(()))
    assert first == ExecuteResult("a", 2, 2)
    assert second == ExecuteResult("b", 1, 3)
    assert nothing == ExecuteResult("a", 2, None)


async def test_queries_and_loads_get_envelopes_with_positions() -> None:
    """Queries, load_events and read_all hand out envelopes with position, id and time."""
    fed: list[Any] = []
    store: MemoryStore[Any, Any] = MemoryStore()
    query_name = trio_es.new_name("q")
    async with system(store, queries=[(query_name, lambda _, events: fed.extend(events))]) as es:
        await es.execute("a", Append(("x", "y")))
        await es.execute("b", Append(("z",)))
        loaded = await es.load_events("a")
        await trio.testing.wait_all_tasks_blocked()
    stored = await everything(store)
    assert [e.global_position for e in fed] == [1, 2, 3]
    assert [e.global_position for e in loaded] == [1, 2]
    assert [s.envelope.global_position for s in stored] == [1, 2, 3]
    for envelope, row in zip(fed, stored, strict=True):
        assert envelope.event_id == row.envelope.event_id
        assert envelope.recorded_at == row.recorded_at
        assert envelope.recorded_at is not None
        assert envelope.recorded_at.utcoffset() is not None


# -- subscriptions ---------------------------------------------------------------------


async def test_subscribe_gives_backlog_then_live_without_gap_or_duplicate(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A subscriber gets the backlog in pages, then live commits, each event once, in order."""
    store: MemoryStore[Any, Any] = MemoryStore()
    async with system(store) as es:
        for i in range(7):
            await es.execute(f"agg-{i % 3}", Append((f"e{i}",)))
        batches: list[list[Any]] = []
        async with (
            subscribe(store, after=2, batch_size=3) as subscription,
            trio.open_nursery() as nursery,
        ):

            async def write_more() -> None:
                for i in range(7, 12):
                    await es.execute(f"agg-{i % 3}", Append((f"e{i}",)))
                    await trio.sleep(0.1)

            nursery.start_soon(write_more)
            async for batch in subscription:
                batches.append(batch)
                if batch[-1].global_position == 12:
                    break
    positions = [e.global_position for batch in batches for e in batch]
    assert positions == list(range(3, 13))
    assert all(0 < len(batch) <= 3 for batch in batches)
    assert len(batches[0]) == 3  # the backlog comes in full pages


async def test_subscribe_checks_its_arguments() -> None:
    """Bad arguments to subscribe are refused before anything is read."""
    with pytest.raises(TypeError, match="store that feeds subscriptions"):
        async with subscribe(object()):  # type: ignore[arg-type]
            pass
    with pytest.raises(trio_es.NonPositiveArgument, match="after must be"):
        async with subscribe(MemoryStore(), after=-1):
            pass
    with pytest.raises(trio_es.NonPositiveArgument, match="batch_size must be"):
        async with subscribe(MemoryStore(), batch_size=0):
            pass


class FaultyReads:
    """A memory store whose read_all fails while ``failing`` is set, counting reads."""

    def __init__(self, inner: MemoryStore[Any, Any]) -> None:
        self.inner = inner
        self.failing = False
        self.reads = 0

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> Any:
        self.reads += 1
        if self.failing:
            raise trio_es.EventStoreError("injected read failure")
        return await self.inner.read_all(after_position, limit)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_failed_read_reaches_the_subscriber_who_may_go_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A store error comes out of the iteration; iterating again goes on, missing nothing."""
    inner: MemoryStore[Any, Any] = MemoryStore()
    store = FaultyReads(inner)
    async with system(inner) as es:
        for i in range(4):
            await es.execute("a", Append((str(i),)))
        async with subscribe(store, batch_size=2) as subscription:
            batches = [await subscription.__anext__()]
            await trio.testing.wait_all_tasks_blocked()  # the next page is read ahead
            store.failing = True
            batches.append(await subscription.__anext__())  # read ahead before the failure
            with pytest.raises(trio_es.EventStoreError, match="injected read failure"):
                await subscription.__anext__()
            store.failing = False
            await es.execute("a", Append(("4",)))
            batches.append(await subscription.__anext__())
    positions = [e.global_position for batch in batches for e in batch]
    assert positions == [1, 2, 3, 4, 5]


async def test_the_subscription_reads_at_most_one_page_ahead(
    autojump_clock: trio.abc.Clock,
) -> None:
    """While the subscriber holds a batch, at most one more page is read."""
    inner: MemoryStore[Any, Any] = MemoryStore()
    store = FaultyReads(inner)
    async with system(inner) as es:
        for i in range(20):
            await es.execute("a", Append((str(i),)))
        async with subscribe(store, batch_size=2) as subscription:
            await subscription.__anext__()
            await trio.sleep(10)  # a subscriber busy with its batch
            assert store.reads == 2


async def test_an_error_in_the_subscribers_block_comes_out_as_itself() -> None:
    """The subscription's reader task never turns the block's error into a group."""
    with pytest.raises(KeyError, match="mine"):
        async with subscribe(MemoryStore()):
            raise KeyError("mine")


async def test_a_slow_subscriber_does_not_slow_commands(autojump_clock: trio.abc.Clock) -> None:
    """Commands complete while a subscriber is stuck in its loop body."""
    store: MemoryStore[Any, Any] = MemoryStore()
    async with system(store) as es, subscribe(store) as subscription:
        await es.execute("a", Append(("x",)))
        async for _ in subscription:
            with trio.fail_after(1):
                for i in range(50):
                    await es.execute("a", Append((str(i),)))
            break


# -- projections -----------------------------------------------------------------------


async def test_projection_sees_every_event_once_in_order_and_checkpoints_the_head() -> None:
    """Every committed event reaches the projection once, in position order."""
    store: MemoryStore[Any, Any] = MemoryStore()
    recorder = Recorder()
    async with system(store, Projection("log", recorder)) as es:
        last = None
        for i in range(20):
            last = await es.execute(f"a{i % 4}", Append((f"x{i}", f"y{i}")))
        assert last is not None
        await es.wait_for_projection("log", last.global_position)
        stats = (await es.projection_stats())["log"]
    assert recorder.positions() == list(range(1, 41))
    assert stats.position == stats.head == 40
    assert stats.lag == 0
    assert stats.status == "running"
    assert stats.active is True
    assert await store.checkpoint_position("log") == 40


async def test_projection_resumes_after_its_checkpoint_on_restart() -> None:
    """A restarted system feeds a projection only the events after its checkpoint."""
    store: MemoryStore[Any, Any] = MemoryStore()
    first = Recorder()
    async with system(store, Projection("log", first)) as es:
        result = await es.execute("a", Append(("1", "2")))
        await es.wait_for_projection("log", result.global_position)
    second = Recorder()
    async with system(store, Projection("log", second)) as es:
        result = await es.execute("a", Append(("3",)))
        await es.wait_for_projection("log", result.global_position)
    assert first.items() == [("a", "1"), ("a", "2")]
    assert second.items() == [("a", "3")]


async def test_wait_for_projection_is_read_your_writes() -> None:
    """After wait_for_projection, the read model holds the command's events."""
    store: MemoryStore[Any, Any] = MemoryStore()
    model: dict[str, int] = {}

    async def count(batch: list[Any]) -> None:
        await trio.sleep(0.01)  # a slow read model: waiting is what makes the test mean it
        for envelope in batch:
            model[envelope.aggregate_id] = model.get(envelope.aggregate_id, 0) + 1

    async with system(store, Projection("count", count)) as es:
        for i in range(10):
            result = await es.execute("acc", Append((str(i),)))
            await es.wait_for_projection("count", result.global_position)
            assert model["acc"] == i + 1
        await es.wait_for_projection("count", None)  # a command without events


async def test_a_failing_handler_is_retried_from_its_checkpoint_and_skips_nothing(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that fails twice gets the same batch again; no event is skipped."""
    store: MemoryStore[Any, Any] = MemoryStore()
    failures = 2
    recorder = Recorder()

    async def flaky(batch: list[Any]) -> None:
        nonlocal failures
        if failures and any(e.payload.item == "bad" for e in batch):
            failures -= 1
            raise RuntimeError("read model down")
        await recorder(batch)

    async with system(store, Projection("log", flaky)) as es:
        await es.execute("a", Append(("ok",)))
        result = await es.execute("a", Append(("bad", "after")))
        await es.wait_for_projection("log", result.global_position)
    assert recorder.items() == [("a", "ok"), ("a", "bad"), ("a", "after")]
    assert sum("read model down" in r.getMessage() for r in caplog.records) == 2


async def test_a_poison_batch_stops_only_that_projection(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch that keeps failing stops its projection (failed, logged); the rest goes on."""
    store: MemoryStore[Any, Any] = MemoryStore()
    healthy = Recorder()

    async def poisoned(batch: list[Any]) -> None:
        if any(e.payload.item == "poison-pill" for e in batch):
            raise ValueError("cannot handle poison-pill")

    options = RuntimeOptions(projection_retries=3, projection_backoff=0.5)
    async with system(
        store, Projection("bad", poisoned), Projection("good", healthy), options=options
    ) as es:
        fine = await es.execute("a", Append(("fine",)))
        # The pill must come in a later batch than the event before it.
        await es.wait_for_projection("bad", fine.global_position)
        result = await es.execute("a", Append(("poison-pill",)))
        with pytest.raises(ProjectionFailed, match="failed 4 times") as info:
            await es.wait_for_projection("bad", result.global_position)
        assert info.value.position == 1
        await es.wait_for_projection("good", result.global_position)
        after = await es.execute("a", Append(("more",)))
        assert after.sequence == 3
        stats = await es.projection_stats()
    assert stats["bad"].status == "failed"
    assert stats["bad"].position == 1
    assert stats["good"].status == "running"
    assert await store.checkpoint_position("bad") == 1
    assert any(
        r.levelno == logging.ERROR and "cannot handle poison-pill" in r.getMessage()
        for r in caplog.records
    )


async def test_store_failures_never_stop_a_projection(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Reads that fail more often than projection_retries are retried until they work."""
    inner: MemoryStore[Any, Any] = MemoryStore()
    store = FaultyReads(inner)
    store.failing = True
    recorder = Recorder()
    options = RuntimeOptions(projection_retries=1, projection_backoff=0.2)
    async with system(store, Projection("log", recorder), options=options) as es:
        result = await es.execute("a", Append(("x", "y")))
        await trio.sleep(5)  # many failed reads, far more than projection_retries
        assert (await es.projection_stats())["log"].status == "running"
        store.failing = False
        await es.wait_for_projection("log", result.global_position)
    assert recorder.items() == [("a", "x"), ("a", "y")]
    assert sum("the store failed" in r.getMessage() for r in caplog.records) > 2


async def test_rebuild_resets_and_replays_with_progress(autojump_clock: trio.abc.Clock) -> None:
    """rebuild_projection runs reset, replays every event and reports progress to the head."""
    store: MemoryStore[Any, Any] = MemoryStore()
    recorder = Recorder()
    resets = 0

    async def reset() -> None:
        nonlocal resets
        resets += 1
        recorder.seen.clear()

    progress: list[tuple[int, int]] = []
    async with system(store, Projection("log", recorder, reset=reset, batch_size=4)) as es:
        for i in range(10):
            result = await es.execute(f"a{i % 2}", Append((str(i),)))
        await es.wait_for_projection("log", result.global_position)
        head = await es.rebuild_projection("log", on_progress=lambda p, h: progress.append((p, h)))
        assert head == 10
        assert resets == 1
        assert recorder.positions() == list(range(1, 11))
        assert progress[-1] == (10, 10)
        assert [p for p, _ in progress] == sorted(p for p, _ in progress)
        later = await es.execute("a0", Append(("late",)))
        await es.wait_for_projection("log", later.global_position)
    assert recorder.positions() == list(range(1, 12))


async def test_rebuild_of_a_failed_projection_raises_projection_failed(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A projection stopped by a poison batch is not rebuilt in place: ProjectionFailed."""

    async def poisoned(batch: list[Any]) -> None:
        raise ValueError("always")

    options = RuntimeOptions(projection_retries=1, projection_backoff=0.1)
    async with system(MemoryStore(), Projection("bad", poisoned), options=options) as es:
        result = await es.execute("a", Append(("x",)))
        with pytest.raises(ProjectionFailed):
            await es.wait_for_projection("bad", result.global_position)
        with pytest.raises(ProjectionFailed, match="failed 2 times"):
            await es.rebuild_projection("bad")


async def test_one_batch_already_gives_a_rate(autojump_clock: trio.abc.Clock) -> None:
    """events_per_second counts from when the projection became active."""

    async def slow(batch: list[Any]) -> None:
        await trio.sleep(1)

    async with system(MemoryStore(), Projection("p", slow, batch_size=10)) as es:
        for i in range(4):
            await es.execute("a", Append((str(i),)))
        await es.wait_for_projection("p", 1)
        stats = (await es.projection_stats())["p"]
    assert stats.events_per_second > 0


async def test_projection_stats_report_lag_and_rate(autojump_clock: trio.abc.Clock) -> None:
    """projection_stats has one frozen ProjectionStats per projection, with head and lag."""
    store: MemoryStore[Any, Any] = MemoryStore()
    gate = trio.Event()

    async def blocked(batch: list[Any]) -> None:
        await gate.wait()

    async with system(store, Projection("slow", blocked)) as es:
        for i in range(5):
            await es.execute("a", Append((str(i),)))
        await trio.testing.wait_all_tasks_blocked()
        stats = await es.projection_stats()
        assert stats == {"slow": ProjectionStats("slow", 0, 5, 5, "running", 0.0, active=True)}
        gate.set()
        await es.wait_for_projection("slow", 5)
        stats = await es.projection_stats()
    assert stats["slow"].lag == 0
    assert stats["slow"].events_per_second > 0


async def test_projection_arguments_are_checked() -> None:
    """Bad projections are refused with the value and the fix, before anything starts."""

    async def handle(batch: list[Any]) -> None:
        pass

    with pytest.raises(TypeError, match="non-empty str"):
        Projection("", handle)
    with pytest.raises(TypeError, match="must be a function"):
        Projection("p", 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a plain function"):
        Projection("p", handle, transactional=True)
    with pytest.raises(trio_es.NonPositiveArgument, match="batch_size"):
        Projection("p", handle, batch_size=0)
    with pytest.raises(ValueError, match="two projections are named 'p'"):
        async with system(MemoryStore(), Projection("p", handle), Projection("p", handle)):
            pass
    with pytest.raises(TypeError, match="transactional, which needs a database"):
        async with system(
            MemoryStore(), Projection("p", lambda conn, batch: None, transactional=True)
        ):
            pass
    with pytest.raises(TypeError, match="list of Projection"):
        async with open_eventsourcing(
            eventstore=MemoryStore(),
            handle=_counter.handle,
            apply=_counter.apply,
            empty_state=(),
            projections=Projection("p", handle),  # type: ignore[arg-type]
        ):
            pass
    async with system(MemoryStore(), Projection("p", handle)) as es:
        with pytest.raises(ValueError, match=r"no projection named 'q'.*'p'"):
            await es.wait_for_projection("q", 1)
        with pytest.raises(trio_es.NonPositiveArgument, match="position"):
            await es.wait_for_projection("p", -1)


async def test_wait_for_projection_times_out_with_actor_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """wait_for_projection ends within call_timeout with ActorTimeout."""

    async def stuck(batch: list[Any]) -> None:
        await trio.sleep_forever()

    async with system(MemoryStore(), Projection("p", stuck), call_timeout=500) as es:
        result = await es.execute("a", Append(("x",)))
        with pytest.raises(trio_es.ActorTimeout, match="wait_for_projection"):
            await es.wait_for_projection("p", result.global_position)


async def test_calls_after_the_block_raise_system_stopped() -> None:
    """Projection calls after the system stopped raise SystemStopped at once."""

    async def handle(batch: list[Any]) -> None:
        pass

    async with system(MemoryStore(), Projection("p", handle)) as es:
        pass
    with pytest.raises(trio_es.SystemStopped):
        await es.wait_for_projection("p", 1)
    with pytest.raises(trio_es.SystemStopped):
        await es.projection_stats()


# -- transactional projections on SQLite -----------------------------------------------


def _balances_schema(connection: sqlite3.Connection) -> None:
    connection.execute(
        "CREATE TABLE IF NOT EXISTS items (aggregate_id TEXT, item TEXT, position INTEGER UNIQUE)"
    )


def _store_items(connection: sqlite3.Connection, batch: list[Any]) -> None:
    _balances_schema(connection)
    connection.executemany(
        "INSERT INTO items VALUES (?, ?, ?)",
        [(e.aggregate_id, e.payload.item, e.global_position) for e in batch],
    )


async def _read_items(path: Path) -> list[tuple[str, str, int]]:
    def read() -> list[tuple[str, str, int]]:
        with sqlite3.connect(path) as connection:
            return list(connection.execute("SELECT * FROM items ORDER BY position"))

    return await trio.to_thread.run_sync(read)


@asynccontextmanager
async def sqlite_store(path: Path) -> AsyncIterator[SqliteStore[Any, Any]]:
    async with SqliteStore.open(path, transcoder=_counter_transcoder()) as store:
        yield store


def _counter_transcoder() -> Transcoder:
    transcoder = Transcoder()
    transcoder.register_event(Appended)
    return transcoder


async def test_transactional_projection_commits_its_writes_with_the_checkpoint(
    tmp_path: Path,
) -> None:
    """A transactional handler's rows and the checkpoint commit together, and survive a restart."""
    path = tmp_path / "app.db"
    projection: Projection[Any] = Projection("items", _store_items, transactional=True)
    async with sqlite_store(path) as store, system(store, projection) as es:
        result = await es.execute("a", Append(("1", "2")))
        await es.wait_for_projection("items", result.global_position)
    async with sqlite_store(path) as store, system(store, projection) as es:
        result = await es.execute("b", Append(("3",)))
        await es.wait_for_projection("items", result.global_position)
        assert await store.checkpoint_position("items") == 3
    assert await _read_items(path) == [("a", "1", 1), ("a", "2", 2), ("b", "3", 3)]


async def test_a_failing_transactional_handler_keeps_nothing_of_the_batch(
    tmp_path: Path,
) -> None:
    """A transactional handler that raises after writing leaves neither rows nor checkpoint."""
    path = tmp_path / "app.db"
    failures = 1

    def handle(connection: sqlite3.Connection, batch: list[Any]) -> None:
        nonlocal failures
        _store_items(connection, batch)
        if failures:
            failures -= 1
            raise RuntimeError("after writing")

    options = RuntimeOptions(projection_backoff=0.1)
    projection: Projection[Any] = Projection("items", handle, transactional=True)
    async with sqlite_store(path) as store, system(store, projection, options=options) as es:
        result = await es.execute("a", Append(("1", "2")))
        await es.wait_for_projection("items", result.global_position)
    # Applied once although the first attempt wrote its rows before failing.
    assert await _read_items(path) == [("a", "1", 1), ("a", "2", 2)]


async def test_transactional_rebuild_resets_the_read_model_in_the_same_transaction(
    tmp_path: Path,
) -> None:
    """rebuild_projection runs reset(connection) with the checkpoint reset, then replays."""
    path = tmp_path / "app.db"

    def reset(connection: sqlite3.Connection) -> None:
        _balances_schema(connection)
        connection.execute("DELETE FROM items")

    projection: Projection[Any] = Projection("items", _store_items, transactional=True, reset=reset)
    async with sqlite_store(path) as store, system(store, projection) as es:
        for i in range(5):
            result = await es.execute("a", Append((str(i),)))
        await es.wait_for_projection("items", result.global_position)
        assert await es.rebuild_projection("items") == 5
    assert [row[2] for row in await _read_items(path)] == [1, 2, 3, 4, 5]


# -- the property ----------------------------------------------------------------------


@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=12),
        min_size=1,
        max_size=4,
    ),
    st.integers(1, 7),
)
def test_projection_equals_a_sequential_fold_of_read_all(
    callers: list[list[tuple[int, int]]], batch_size: int
) -> None:
    """Random commands from several tasks: the projection ends equal to a fold of read_all."""

    async def main() -> None:
        store: MemoryStore[Any, Any] = MemoryStore()
        model: dict[str, list[str]] = {}

        async def project(batch: list[Any]) -> None:
            await trio.lowlevel.checkpoint()
            for envelope in batch:
                model.setdefault(envelope.aggregate_id, []).append(envelope.payload.item)

        projection: Projection[Any] = Projection("fold", project, batch_size=batch_size)
        async with system(store, projection) as es:

            async def caller(number: int, commands: list[tuple[int, int]]) -> None:
                for aggregate, count in commands:
                    items = tuple(f"{number}.{aggregate}.{i}" for i in range(count))
                    await es.execute(f"agg-{aggregate}", Append(items))

            async with trio.open_nursery() as nursery:
                for number, commands in enumerate(callers):
                    nursery.start_soon(caller, number, commands)
            head = await store.head_position()
            await es.wait_for_projection("fold", head)
            checkpoint = await store.checkpoint_position("fold")
        folded: dict[str, list[str]] = {}
        for stored in await everything(store):
            folded.setdefault(stored.envelope.aggregate_id, []).append(stored.envelope.payload.item)
        assert model == folded
        assert checkpoint == head

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
