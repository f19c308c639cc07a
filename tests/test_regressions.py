"""Regression tests for the runtime defects of issue 8, through the public API only.

Each test pins a promise the runtime broke: lost events (D2), read models that miss
events (D3, D9), calls that outlive their timeout or their system (D4, D5), ``MailboxFull``
under load (D7), permanent errors treated as crashes (D8), stale caches across processes
(D10), undetected gaps (D11) and a cache corrupted by a mutating ``apply`` (D13). The
numbers are the issue's. Every test runs under :func:`fail_after`, so a hang (or, under the
autojump clock, a livelock) fails fast.
"""

from __future__ import annotations

import math
import random
import re
import sqlite3
import threading
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any, Final

import attrs
import outcome
import pytest
import trio
import trio.testing

import trio_es
from trio_es import (
    ActorTimeout,
    AggregateCrashed,
    EventStoreError,
    ExecuteResult,
    RuntimeOptions,
    SystemStopped,
    TransactionFailed,
    new_name,
)
from trio_es.memory_store import MemoryStore
from trio_es.postgres_store import PostgresStore
from trio_es.serialization import Transcoder
from trio_es.sqlite_store import SqliteStore
from trio_es.testing import Fault, FaultInjectingStore

from . import _bank, _counter, _ledger
from ._counter import Append, Appended, SlowAppend

# -- a few commands beyond the counter domain's, and a handle/apply that know them --


@attrs.frozen
class Generate:
    """``handle`` answers with a generator of one ``Appended`` per item."""

    items: tuple[str, ...]


@attrs.frozen
class GenerateBadly:
    """``handle`` answers with a generator whose body raises ``TypeError``: a bug."""


@attrs.frozen
class ReturnNone:
    """``handle`` forgets its return statement and answers ``None``."""


@attrs.frozen
class EmitUnregistered:
    """``handle`` answers with an event whose class no transcoder knows."""


@attrs.frozen
class Boom:
    """``handle`` raises ``RuntimeError("boom")``: a real bug."""


@attrs.frozen
class Unregistered:
    """An event class deliberately left out of every transcoder."""

    note: str = "nobody registered me"


async def handle(entity: tuple[str, ...], command: Any) -> Any:
    """The counter domain's handle (async, so SlowAppend sleeps) plus the commands above."""
    match command:
        case Generate(items):
            return (Appended(item) for item in items)
        case GenerateBadly():
            return (Appended(item + 1) for item in ("a",))  # type: ignore[operator]  # the planted bug
        case ReturnNone():
            return None
        case EmitUnregistered():
            return [Unregistered()]
        case Boom():
            raise RuntimeError("boom")
    return await _counter.async_handle(entity, command)


def apply(entity: tuple[str, ...], event: Any) -> tuple[str, ...]:
    """The counter domain's apply, also accepting ``Unregistered``."""
    if isinstance(event, Unregistered):
        return (*entity, "?")
    return _counter.apply(entity, event)


def transcoder() -> Transcoder:
    """A transcoder knowing ``Appended`` only (never ``Unregistered``)."""
    result = Transcoder()
    result.register_event(Appended)
    return result


@asynccontextmanager
async def open_system(
    store: trio_es.EventStore[Any, Any, Any], **kwargs: Any
) -> AsyncIterator[trio_es.EventSourcing[Any, Any, tuple[str, ...]]]:
    """A counter system over ``store`` with this module's handle and apply."""
    kwargs.setdefault("handle", handle)
    async with trio_es.open_eventsourcing(
        eventstore=store, apply=apply, empty_state=(), **kwargs
    ) as es:
        yield es


async def capture(fn: Callable[[], Awaitable[Any]]) -> outcome.Outcome[Any]:
    """Run ``fn`` and keep its result or its ``Exception`` (Cancelled still propagates)."""
    try:
        return outcome.Value(await fn())
    except Exception as error:
        return outcome.Error(error)


@contextmanager
def fail_after(seconds: float, *, real: float = 20.0) -> Iterator[None]:
    """``trio.fail_after(seconds)``, plus a wall-clock limit of ``real`` seconds.

    Under the autojump clock, tasks that keep rescheduling each other without ever
    blocking (a livelock) stop the mock clock, so ``trio.fail_after`` alone would never
    fire; a thread cancels the block after ``real`` seconds of wall-clock time instead.
    """
    token = trio.lowlevel.current_trio_token()
    with trio.CancelScope() as watchdog:

        def fire() -> None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(watchdog.cancel)

        timer = threading.Timer(real, fire)
        timer.daemon = True
        timer.start()
        try:
            with trio.fail_after(seconds):
                yield
        finally:
            timer.cancel()
    if watchdog.cancelled_caught:
        raise trio.TooSlowError(f"still running after {real} s of wall-clock time (livelock?)")


def errors_of(results: list[outcome.Outcome[Any]]) -> list[BaseException]:
    return [result.error for result in results if isinstance(result, outcome.Error)]


def sequences(events: list[trio_es.EventEnvelope[Any]]) -> list[int]:
    return [envelope.sequence for envelope in events]


def row_sql(path: Path, statement: str, *parameters: object) -> int:
    """Run one statement on the SQLite file directly (fault injection); return rowcount."""
    with sqlite3.connect(path) as connection:
        count = connection.execute(statement, parameters).rowcount
    connection.close()
    return count


# -- PostgreSQL fixtures (as in test_postgres_store.py) --


StoreOpener = Callable[[], AbstractAsyncContextManager[trio_es.EventStore[Any, Any, Any]]]


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreOpener:
    """Opens the parametrized store; every opening sees the same data."""
    kind: str = request.param
    memory: MemoryStore[Any, Any] = MemoryStore()
    dsn = request.getfixturevalue("postgres_dsn") if kind == "postgres" else ""

    @asynccontextmanager
    async def opener() -> AsyncIterator[trio_es.EventStore[Any, Any, Any]]:
        if kind == "memory":
            yield memory
        elif kind == "sqlite":
            async with SqliteStore.open(tmp_path / "events.db", transcoder=transcoder()) as store:
                yield store
        else:
            async with PostgresStore.open(dsn, transcoder=transcoder()) as store:
                yield store

    return opener


# -- D2: what handle returns --


async def test_d2_handle_returning_a_generator_stores_every_event(open_store: StoreOpener) -> None:
    """A generator from handle: every event is stored and the cache equals a replay of the store."""
    with fail_after(20):
        async with open_store() as store, open_system(store) as es:
            await es.execute("x", Generate(("a", "b", "c")))
            await es.execute("x", Generate(("d",)))
            events = await es.load_events("x")
            assert [e.payload for e in events] == [Appended(i) for i in "abcd"]
            assert sequences(events) == [1, 2, 3, 4]
            aggregate = await es.load_aggregate("x")
            assert aggregate.entity == _counter.replay(events)
            assert aggregate.sequence == 4
        async with open_store() as store, open_system(store) as fresh:
            assert (await fresh.load_aggregate("x")).entity == ("a", "b", "c", "d")


#: What the good commands of :func:`_bad_command_among_queued_ones` return: "a" is event 1.
EXPECTED_RESULTS: Final = {
    "slow": ExecuteResult("x", 2, 2),
    "c": ExecuteResult("x", 3, 3),
    "d": ExecuteResult("x", 4, 4),
}


async def _bad_command_among_queued_ones(
    es: Any, bad: Any, slow_seconds: float
) -> tuple[outcome.Outcome[Any], dict[str, outcome.Outcome[Any]]]:
    """Queue ``bad`` between good commands behind a slow one on aggregate "x" (holding "a").

    Returns the bad command's outcome and the others' ("slow", "c", "d").
    """
    await es.execute("x", Append(("a",)))
    results: dict[str, outcome.Outcome[Any]] = {}

    async def call(key: str, command: Any) -> None:
        results[key] = await capture(lambda: es.execute("x", command))

    async with trio.open_nursery() as nursery:
        # A slow command holds the aggregate so that the others queue behind it.
        nursery.start_soon(call, "slow", SlowAppend("b", slow_seconds))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, "bad", bad)
        await trio.testing.wait_all_tasks_blocked()
        for item in "cd":
            nursery.start_soon(call, item, Append((item,)))
            await trio.testing.wait_all_tasks_blocked()
    return results.pop("bad"), results


async def test_d2_a_type_error_inside_a_returned_generator_is_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in a generator handle returned is its own TypeError and a crash, not a bad return."""
    with fail_after(10):
        async with open_system(MemoryStore()) as es:
            await es.execute("x", Append(("a",)))
            with pytest.raises(TypeError, match="can only concatenate str") as info:
                await es.execute("x", GenerateBadly())
            assert "handle must return" not in str(info.value)
            await es.execute("x", Append(("b",)))
            assert (await es.load_aggregate("x")).entity == ("a", "b")
    # A crash: the aggregate's task was restarted (a bad return value would not be).
    assert any("restarting child" in record.getMessage() for record in caplog.records)


async def test_d2_handle_returning_none_is_a_type_error_not_a_crash() -> None:
    """handle returning None: TypeError naming the value, nothing stored, no crash counted."""
    options = RuntimeOptions(aggregate_intensity=0)
    with fail_after(10):
        async with open_system(MemoryStore(), options=options) as es:
            none, results = await _bad_command_among_queued_ones(es, ReturnNone(), 0.2)
            with pytest.raises(TypeError, match=r"handle must return a sequence of events") as info:
                none.unwrap()
            assert "None" in str(info.value)
            assert {key: result.unwrap() for key, result in results.items()} == EXPECTED_RESULTS
            await es.execute("x", Append(("e",)))
            events = await es.load_events("x")
            assert [e.payload.item for e in events] == ["a", "b", "c", "d", "e"]
            assert (await es.load_aggregate("x")).entity == ("a", "b", "c", "d", "e")


# -- D3: a cancelled caller must not make a query miss an event --


async def test_d3_cancelled_callers_never_make_a_query_miss_an_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Callers cancelled anywhere: the query still gets every committed event once, in order."""
    rng = random.Random(8_003)
    for _ in range(12):
        seen: defaultdict[str, list[int]] = defaultdict(list)

        async def query(aggregate_id: str, envelopes: Any, seen: Any = seen) -> None:
            await trio.sleep(0.01)
            seen[aggregate_id].extend(envelope.sequence for envelope in envelopes)

        query_name = new_name("q", capacity=1)
        with fail_after(600):
            async with open_system(MemoryStore(), queries=[(query_name, query)]) as es:

                async def caller(aggregate_id: str, item: str, deadline: float) -> None:
                    with trio.move_on_after(deadline):
                        await es.execute(aggregate_id, Append((item,)))

                async with trio.open_nursery() as nursery:
                    for number in range(40):
                        aggregate_id = rng.choice("ab")
                        deadline = rng.choice([0.0, rng.uniform(0, 0.002), rng.uniform(0, 0.05)])
                        nursery.start_soon(caller, aggregate_id, str(number), deadline)
                        if rng.random() < 0.5:
                            await trio.sleep(rng.uniform(0, 0.02))
                # Let every commit reach the query.
                await trio.sleep(30)
                await trio.testing.wait_all_tasks_blocked()
                for aggregate_id in "ab":
                    stored = sequences(await es.load_events(aggregate_id))
                    assert seen[aggregate_id] == stored


# -- D4: call_timeout holds on every path --


async def test_d4_slow_handle_times_out_on_the_first_and_later_calls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """call_timeout=1000 with a 10 s handle: ActorTimeout within 1 s, first call and later ones."""
    with fail_after(300):
        async with open_system(MemoryStore(), call_timeout=1000) as es:
            start = trio.current_time()
            with pytest.raises(ActorTimeout):
                await es.execute("first", SlowAppend("a", 10))
            assert trio.current_time() - start <= 1.0 + 1e-6
            await trio.sleep(20)  # the slow command finishes; the aggregate is loaded and idle
            await es.execute("later", Append(("a",)))
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(2):
                start = trio.current_time()
                with pytest.raises(ActorTimeout):
                    await es.execute("later", SlowAppend("b", 10))
                assert trio.current_time() - start <= 1.0 + 1e-6
                await trio.sleep(20)
                await trio.testing.wait_all_tasks_blocked()


async def test_d4_stuck_query_never_makes_execute_outlive_call_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A query stuck forever: execute (first and later calls) ends within call_timeout."""
    release = trio.Event()

    async def stuck(aggregate_id: str, envelopes: Any) -> None:
        # Stuck for as long as the calls run. Released at the end only so that the
        # block's exit (which this test does not pin) cannot hang the test uninterruptibly.
        await release.wait()

    query_name = new_name("stuck", capacity=1)
    with fail_after(120):
        async with open_system(
            MemoryStore(), call_timeout=1000, queries=[(query_name, stuck)]
        ) as es:
            try:
                for aggregate_id in ["a", "a", "a", "a", "b", "c", "b", "b"]:
                    start = trio.current_time()
                    with suppress(ActorTimeout):
                        await es.execute(aggregate_id, Append(("x",)))
                    assert trio.current_time() - start <= 1.0 + 1e-6, aggregate_id
                    await trio.testing.wait_all_tasks_blocked()
            finally:
                release.set()


async def test_d4_a_call_waiting_for_room_in_a_full_mailbox_times_out_unsent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A call parked on a full mailbox past call_timeout: ActorTimeout, and it never runs."""
    options = RuntimeOptions(mailbox_capacity=1)
    with fail_after(300):
        async with open_system(MemoryStore(), call_timeout=1000, options=options) as es:
            await es.execute("a", Append(("loaded",)))

            async def call(command: Any) -> None:
                with suppress(ActorTimeout):  # both time out too, and commit later
                    await es.execute("a", command)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, SlowAppend("slow", 5))
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(call, Append(("queued",)))  # fills the mailbox
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
                with pytest.raises(ActorTimeout):
                    await es.execute("a", Append(("parked",)))
                assert trio.current_time() - start == pytest.approx(1.0)
            await trio.sleep(10)
            stored = [event.payload.item for event in await es.load_events("a")]
    assert stored == ["loaded", "slow", "queued"]


async def test_d4_a_call_ends_within_call_timeout_when_the_system_stops_while_it_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A commit outlasting call_timeout while the system stops: the call ends at call_timeout."""
    store: FaultInjectingStore[Any, Any, Any] = FaultInjectingStore(
        MemoryStore(), [Fault.slow_commit(10)]
    )
    options = RuntimeOptions(shutdown_grace=30)
    ended: dict[str, Any] = {}
    with fail_after(300):
        async with trio.open_nursery() as outer:
            async with open_system(store, call_timeout=1000, options=options) as es:

                async def call() -> None:
                    start = trio.current_time()
                    ended["outcome"] = await capture(lambda: es.execute("a", Append(("x",))))
                    ended["after"] = trio.current_time() - start

                outer.start_soon(call)
                await trio.sleep(0.5)
                # The block exits now, with the commit under way: the system's call
                # timers stop with it, and the call must still end on time.
            assert trio.current_time() == pytest.approx(10.0)
    assert isinstance(ended["outcome"], outcome.Error)
    assert isinstance(ended["outcome"].error, ActorTimeout)
    assert ended["after"] == pytest.approx(1.0)


async def test_a_call_under_call_timeout_makes_no_cancel_scope(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """Calls under call_timeout are timed by the system's call timers, not a scope each."""
    made: list[float] = []
    real = trio.CancelScope
    caller = trio.lowlevel.current_task()

    def counting(**kwargs: Any) -> trio.CancelScope:
        # Only the calling task's scopes: the timers' own task sleeps in a scope of its
        # own whenever a deadline comes (here, if the calls outlast the first one).
        if trio.lowlevel.current_task() is caller:
            made.append(kwargs.get("deadline", math.inf))
        return real(**kwargs)

    async with open_system(MemoryStore(), call_timeout=1000) as es:
        await es.execute("a", Append(("x",)))
        monkeypatch.setattr(trio, "CancelScope", counting)
        for item in range(50):
            await es.execute("a", Append((str(item),)))
            await es.load_aggregate("a")
            if item == 25:
                # As on a slow machine: the calls outlast the first call's deadline, so the
                # timers' task wakes, and sleeps again in a scope of its own at the next
                # call (CI once saw exactly that).
                monkeypatch.undo()
                await trio.sleep(1.1)
                monkeypatch.setattr(trio, "CancelScope", counting)
        monkeypatch.undo()
    assert [deadline for deadline in made if deadline != math.inf] == []


# -- D5: calls after (and during) the end of the open_eventsourcing block --

_CALLS: dict[str, Callable[[trio_es.EventSourcing[Any, Any, Any]], Awaitable[Any]]] = {
    "execute": lambda es: es.execute("a", Append(("x",))),
    "load_aggregate": lambda es: es.load_aggregate("a"),
    "load_events": lambda es: es.load_events("a"),
    "latest_snapshot": lambda es: es.latest_snapshot("a"),
    "system_stats": lambda es: es.system_stats(),
    "aggregate_stats": lambda es: es.aggregate_stats("a"),
}


@pytest.mark.parametrize("method", list(_CALLS))
async def test_d5_every_method_raises_system_stopped_after_the_block(
    method: str, autojump_clock: trio.testing.MockClock
) -> None:
    """After open_eventsourcing exits, each method raises SystemStopped at once."""
    async with open_system(MemoryStore()) as es:
        await es.execute("a", Append(("x",)))
    for _ in range(2):  # and again: it stays stopped
        start = trio.current_time()
        with fail_after(1), pytest.raises(SystemStopped):
            await _CALLS[method](es)
        # At once: a reply that only comes after some timeout would move the mock clock.
        assert trio.current_time() - start < 0.01


async def test_d5_calls_in_flight_when_the_block_exits_end_promptly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """In-flight and queued calls end promptly, with their reply or SystemStopped, at block exit."""
    results: dict[str, outcome.Outcome[Any]] = {}
    with fail_after(1):
        # The callers run in a nursery outside the block, as a server's request handlers do.
        async with trio.open_nursery() as outer, open_system(MemoryStore()) as es:
            await es.execute("a", Append(("loaded",)))

            async def call(key: str, fn: Callable[[], Awaitable[Any]]) -> None:
                results[key] = await capture(fn)

            outer.start_soon(call, "slow", lambda: es.execute("a", SlowAppend("s", 100)))
            await trio.testing.wait_all_tasks_blocked()
            for key, make in _CALLS.items():
                outer.start_soon(call, key, lambda make=make: make(es))
                await trio.testing.wait_all_tasks_blocked()
            outer.start_soon(call, "other", lambda: es.execute("b", SlowAppend("t", 100)))
            await trio.testing.wait_all_tasks_blocked()
    assert set(results) == {"slow", "other", *_CALLS}
    for key, result in results.items():
        if isinstance(result, outcome.Error):
            assert isinstance(result.error, SystemStopped), (key, result.error)


# -- D7: backpressure all the way --


@pytest.mark.parametrize("aggregates", [1, 50])
async def test_d7_300_callers_never_see_mailbox_full(aggregates: int) -> None:
    """300 concurrent callers on 1 or 50 aggregates with mailbox_capacity=2: all succeed."""
    options = RuntimeOptions(mailbox_capacity=2)
    with fail_after(20):
        async with open_system(MemoryStore(), options=options) as es:
            results: list[outcome.Outcome[Any]] = []

            async def call(number: int) -> None:
                aggregate_id = f"x{number % aggregates}"
                results.append(
                    await capture(lambda: es.execute(aggregate_id, Append((str(number),))))
                )

            async with trio.open_nursery() as nursery:
                for number in range(300):
                    nursery.start_soon(call, number)
            assert errors_of(results) == []
            items: list[str] = []
            for index in range(aggregates):
                assert len(await es.load_events(f"x{index}")) == 300 // aggregates
                items.extend((await es.load_aggregate(f"x{index}")).entity)
            assert sorted(items) == sorted(map(str, range(300)))


# -- D8: permanent errors reach their caller as themselves and are not crashes --


async def test_d8_unregistered_event_class_is_an_event_store_error_not_a_crash(
    tmp_path: Path,
) -> None:
    """SQLite, unregistered event class: EventStoreError to its caller only; others unaffected."""
    options = RuntimeOptions(aggregate_intensity=0)
    with fail_after(20):
        async with (
            SqliteStore.open(tmp_path / "events.db", transcoder=transcoder()) as store,
            open_system(store, options=options) as es,
        ):
            bad, results = await _bad_command_among_queued_ones(es, EmitUnregistered(), 0.3)
            assert isinstance(bad, outcome.Error)
            assert isinstance(bad.error, EventStoreError), repr(bad.error)
            assert {key: result.unwrap() for key, result in results.items()} == EXPECTED_RESULTS
            with pytest.raises(EventStoreError):
                await es.execute("x", EmitUnregistered())
            await es.execute("x", Append(("e",)))
            events = await es.load_events("x")
            assert [e.payload.item for e in events] == ["a", "b", "c", "d", "e"]
            assert (await es.load_aggregate("x")).entity == ("a", "b", "c", "d", "e")


async def _check_unstorable_id(store: trio_es.EventStore[Any, Any, Any], bad_id: str) -> None:
    options = RuntimeOptions(aggregate_intensity=0)
    async with open_system(store, options=options) as es:
        await es.execute("good", Append(("a",)))
        for _ in range(2):
            with pytest.raises(EventStoreError):
                await es.execute(bad_id, Append(("x",)))
        with pytest.raises(EventStoreError):
            await es.load_aggregate(bad_id)
        await es.execute("good", Append(("b",)))
        assert (await es.load_aggregate("good")).entity == ("a", "b")


async def test_d8_lone_surrogate_id_on_sqlite_is_an_event_store_error(tmp_path: Path) -> None:
    """SQLite cannot hold the id "\\ud800": EventStoreError to the caller, others keep working."""
    with fail_after(20):
        async with SqliteStore.open(tmp_path / "events.db", transcoder=transcoder()) as store:
            await _check_unstorable_id(store, "\ud800")


@pytest.mark.postgres
async def test_d8_nul_id_on_postgres_is_an_event_store_error(postgres_dsn: str) -> None:
    """PostgreSQL cannot hold the id "a\\x00b": EventStoreError to its caller, others go on."""
    with fail_after(20):
        async with PostgresStore.open(postgres_dsn, transcoder=transcoder()) as store:
            await _check_unstorable_id(store, "a\x00b")


async def test_d8_undecodable_row_is_an_event_store_error_naming_aggregate_and_sequence(
    tmp_path: Path,
) -> None:
    """A corrupt stored payload: load_aggregate raises EventStoreError naming it, every time."""
    path = tmp_path / "events.db"
    with fail_after(20):
        async with (
            SqliteStore.open(path, transcoder=transcoder()) as store,
            open_system(store) as es,
        ):
            await es.execute("x", Append(("a", "b", "c")))
            await es.execute("y", Append(("a",)))
        corrupted = row_sql(
            path,
            "UPDATE events SET payload = '{not json' WHERE aggregate_id = ? AND sequence = 2",
            "x",
        )
        assert corrupted == 1
        options = RuntimeOptions(aggregate_intensity=0)
        async with (
            SqliteStore.open(path, transcoder=transcoder()) as store,
            open_system(store, options=options) as es,
        ):
            for _ in range(2):
                with pytest.raises(EventStoreError) as info:
                    await es.load_aggregate("x")
                message = str(info.value)
                assert "'x'" in message
                assert "sequence 2" in message
            assert (await es.load_aggregate("y")).entity == ("a",)


async def test_d8_aggregate_crashed_names_its_cause() -> None:
    """AggregateCrashed's str() includes its cause's type and message."""
    options = RuntimeOptions(aggregate_intensity=0)
    with fail_after(10):
        async with open_system(MemoryStore(), options=options) as es:
            await es.execute("x", Append(("a",)))
            results: list[outcome.Outcome[Any]] = []

            async def call(command: Any) -> None:
                results.append(await capture(lambda: es.execute("x", command)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, SlowAppend("b", 0.2))
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(call, Boom())
                await trio.testing.wait_all_tasks_blocked()
                for item in "cd":
                    nursery.start_soon(call, Append((item,)))
                    await trio.testing.wait_all_tasks_blocked()
            crashes = [e for e in errors_of(results) if isinstance(e, AggregateCrashed)]
            assert crashes, [result for result in results]
            for crash in crashes:
                assert "RuntimeError" in str(crash)
                assert "boom" in str(crash)


# -- D9: failing queries --


async def test_d9_a_query_that_always_fails_is_stopped_and_reported_not_fatal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A query that always raises: 100 commands succeed, system stays up, stats name it."""

    def broken(aggregate_id: str, envelopes: Any) -> None:
        raise RuntimeError("broken read model")

    query_name = new_name("broken-query")
    with fail_after(3600):
        async with open_system(MemoryStore(), queries=[(query_name, broken)]) as es:
            for number in range(100):
                await es.execute(f"x{number % 5}", Append((str(number),)))
                await trio.sleep(0.05)
            # The query is restarted with back-off before it is given up on: poll for that.
            for _ in range(3000):
                stats = await es.system_stats()
                if stats.failed_queries:
                    break
                await trio.sleep(1)
            assert stats.failed_queries == ("broken-query",)
            await es.execute("x0", Append(("after",)))
            assert stats.total_commands_processed >= 100


async def test_d9_a_batch_that_crashed_a_query_is_redelivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A query that raises once on a batch gets that batch again and ends with every event."""
    calls: list[tuple[int, ...]] = []
    delivered: list[int] = []
    failed: list[tuple[int, ...]] = []

    def flaky(aggregate_id: str, envelopes: Any) -> None:
        batch = tuple(envelope.sequence for envelope in envelopes)
        calls.append(batch)
        if 3 in batch and not failed:
            failed.append(batch)
            raise RuntimeError("flaky read model")
        delivered.extend(batch)

    with fail_after(600):
        async with open_system(MemoryStore(), queries=[(new_name("flaky"), flaky)]) as es:
            for number in range(6):
                await es.execute("x", Append((str(number),)))
            await trio.sleep(60)
            await trio.testing.wait_all_tasks_blocked()
            assert delivered == [1, 2, 3, 4, 5, 6]
            assert calls.count(failed[0]) == 2


# -- D10: several processes on one database --


async def _stale_cache_check(open_a: StoreOpener, open_b: StoreOpener) -> None:
    """B caches X, A writes X, B must see it (load_aggregate, aggregate_stats, execute)."""
    async with (
        open_a() as store_a,
        open_b() as store_b,
        open_system(store_a) as a,
        open_system(store_b) as b,
    ):
        await a.execute("x", Append(("one",)))
        assert (await b.load_aggregate("x")).entity == ("one",)
        await a.execute("x", Append(("two",)))
        aggregate = await b.load_aggregate("x")
        assert (aggregate.entity, aggregate.sequence) == (("one", "two"), 2)
        assert (await b.aggregate_stats("x")).current_sequence == 2
        await b.execute("x", Append(("three",)))
        assert (await b.load_aggregate("x")).entity == ("one", "two", "three")


async def test_d10_two_systems_on_one_sqlite_file_see_each_others_writes(tmp_path: Path) -> None:
    """System B's load_aggregate and aggregate_stats reflect system A's write on one file."""
    path = tmp_path / "events.db"

    def opener() -> AbstractAsyncContextManager[Any]:
        return SqliteStore.open(path, transcoder=transcoder())

    with fail_after(20):
        await _stale_cache_check(opener, opener)


async def _hammer(openers: list[StoreOpener]) -> None:
    """4 systems x 10 callers x 5 increments on one aggregate: no error, 200 events."""
    errors: list[BaseException] = []

    async def caller(es: trio_es.EventSourcing[Any, Any, Any], system: int, number: int) -> None:
        for round_ in range(5):
            try:
                await es.execute("hot", Append((f"{system}.{number}.{round_}",)))
            except Exception as error:
                errors.append(error)

    async def system(index: int, opener: StoreOpener) -> None:
        async with opener() as store, open_system(store) as es, trio.open_nursery() as nursery:
            for number in range(10):
                nursery.start_soon(caller, es, index, number)

    async with trio.open_nursery() as nursery:
        for index, opener in enumerate(openers):
            nursery.start_soon(system, index, opener)
    assert errors == [], Counter(type(error).__name__ for error in errors)
    async with openers[0]() as store, open_system(store) as es:
        events = await es.load_events("hot")
        assert sequences(events) == list(range(1, 201))
        assert len((await es.load_aggregate("hot")).entity) == 200


async def test_d10_four_systems_hammering_one_aggregate_on_sqlite(tmp_path: Path) -> None:
    """4 systems on one SQLite file, 200 increments to one aggregate: no error, count 200."""
    # Three rounds on fresh files: a single round lost a command only 4 times in 5.
    for round_ in range(3):
        path = tmp_path / f"events{round_}.db"

        def opener(path: Path = path) -> AbstractAsyncContextManager[Any]:
            return SqliteStore.open(path, transcoder=transcoder())

        with fail_after(30):
            await _hammer([opener] * 4)


@pytest.mark.postgres
async def test_d10_two_systems_on_one_postgres_database_see_each_others_writes(
    postgres_dsn: str,
) -> None:
    """System B's load_aggregate and aggregate_stats reflect system A's write on one database."""

    def opener() -> AbstractAsyncContextManager[Any]:
        return PostgresStore.open(postgres_dsn, transcoder=transcoder())

    with fail_after(20):
        await _stale_cache_check(opener, opener)


@pytest.mark.postgres
async def test_d10_four_systems_hammering_one_aggregate_on_postgres(postgres_dsn: str) -> None:
    """4 systems on one PostgreSQL database, 200 increments to one aggregate: no error."""

    def opener() -> AbstractAsyncContextManager[Any]:
        return PostgresStore.open(postgres_dsn, transcoder=transcoder())

    with fail_after(30):
        await _hammer([opener] * 4)


# -- D11: gaps --


async def test_d11_a_gap_in_a_stored_stream_is_an_event_store_error(tmp_path: Path) -> None:
    """A deleted row: load_aggregate and load_events raise EventStoreError naming the gap."""
    path = tmp_path / "events.db"
    with fail_after(20):
        async with (
            SqliteStore.open(path, transcoder=transcoder()) as store,
            open_system(store) as es,
        ):
            await es.execute("x", Append(("a", "b", "c")))
        deleted = row_sql(path, "DELETE FROM events WHERE aggregate_id = ? AND sequence = 2", "x")
        assert deleted == 1
        async with (
            SqliteStore.open(path, transcoder=transcoder()) as store,
            open_system(store) as es,
        ):
            for load in (es.load_aggregate, es.load_events):
                with pytest.raises(EventStoreError) as info:
                    await load("x")
                message = str(info.value)
                assert "'x'" in message
                assert re.search(r"\b(sequence|event) 2\b", message), message


# -- D13: a mutating apply and a failed commit --


def mutating_apply(entity: list[str], event: Appended) -> list[str]:
    """An impure apply: appends to the entity in place (the shared empty state excepted)."""
    if not entity:
        entity = []  # never mutate the empty state every aggregate starts from
    entity.append(event.item)
    return entity


@attrs.define
class _FailingCommitStore:
    """Fault injection around a real MemoryStore: chosen write transactions fail on exit.

    ``fail(n, error, skip)`` lets ``skip`` more write transactions commit, then makes the
    next ``n`` raise ``error`` when they exit (nothing of them is written).
    """

    inner: MemoryStore[Any, Any] = attrs.Factory(MemoryStore)
    _skip: int = 0
    _failures: int = 0
    _error: Callable[[], Exception] = TransactionFailed
    failed: int = 0

    def fail(self, n: int, error: Callable[[], Exception], skip: int = 0) -> None:
        self._failures, self._error, self._skip = n, error, skip

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        async with self.inner.transaction() as tx:
            wrote: list[bool] = []
            yield _Tx(tx, wrote)
            if wrote and self._failures:
                if self._skip:
                    self._skip -= 1
                else:
                    self._failures -= 1
                    self.failed += 1
                    raise self._error()

    async def load_events(self, tx: Any, aggregate_id: str, start_from: int) -> Any:
        return await self.inner.load_events(tx.inner, aggregate_id, start_from)

    async def commit_events(self, tx: Any, aggregate: Any, events: Any, metadata: Any) -> Any:
        tx.wrote.append(True)
        return await self.inner.commit_events(tx.inner, aggregate, events, metadata)

    async def load_snapshot(self, tx: Any, aggregate_id: str) -> Any:
        return await self.inner.load_snapshot(tx.inner, aggregate_id)

    async def save_snapshot(self, tx: Any, snapshot: Any) -> None:
        await self.inner.save_snapshot(tx.inner, snapshot)


@attrs.frozen
class _Tx:
    inner: Any
    wrote: list[bool]


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(lambda: TransactionFailed("injected"), id="TransactionFailed"),
        pytest.param(lambda: EventStoreError("injected"), id="EventStoreError"),
    ],
)
@pytest.mark.parametrize("skip", [0, 1])
async def test_d13_mutating_apply_and_failed_commit_keep_cache_equal_to_store(
    error: Callable[[], Exception], skip: int
) -> None:
    """A mutating apply and failing commits: load_aggregate still equals a replay of the store."""
    store = _FailingCommitStore()
    with fail_after(10):
        async with trio_es.open_eventsourcing(
            eventstore=store, handle=handle, apply=mutating_apply, empty_state=[]
        ) as es:
            await es.execute("x", Append(("a",)))
            store.fail(1, error, skip=skip)
            results: list[outcome.Outcome[Any]] = []

            async def call(command: Any) -> None:
                results.append(await capture(lambda: es.execute("x", command)))

            async with trio.open_nursery() as nursery:
                # A slow command first, so that the rest queue up and travel as a batch.
                nursery.start_soon(call, SlowAppend("b", 0.1))
                await trio.testing.wait_all_tasks_blocked()
                for item in "cdef":
                    nursery.start_soon(call, Append((item,)))
                    await trio.testing.wait_all_tasks_blocked()
            assert store.failed == 1
            await es.execute("x", Append(("g",)))
            events = await es.load_events("x")
            replayed: list[str] = []
            for envelope in events:
                replayed = mutating_apply(replayed, envelope.payload)
            aggregate = await es.load_aggregate("x")
            assert aggregate.entity == [e.payload.item for e in events]
            assert (aggregate.entity, aggregate.sequence) == (replayed, len(events))


# -- D10 with real processes: four processes hammering one aggregate --


async def _hammer_with_processes(target: str, tmp_path: Path, store: Any) -> None:
    """Four processes x 8 callers x 6 deposits on one account: no error, all stored once."""
    await _ledger.seed_accounts(store, ["hot"], seed_id=lambda _: "seed")
    logs = [tmp_path / f"hammer-{n}.log" for n in range(4)]
    commands = [
        _ledger.worker_command("hammer:8", target, logs[n], n, n, 6, ["hot"]) for n in range(4)
    ]
    with trio.fail_after(120):
        # Each worker exits non-zero if any error reaches any of its callers.
        await _ledger.run_workers(commands)
    stored = await _ledger.read_everything(store)
    by_command = _ledger.check_ledger(stored)
    acknowledged = {ack["id"] for ack in _ledger.acks(logs)}
    assert len(acknowledged) == 4 * 8 * 6
    assert set(by_command) == acknowledged | {"seed"}
    assert all(len(envelopes) == 1 for key, envelopes in by_command.items() if key != "seed")


async def test_d10_four_processes_hammering_one_aggregate_on_sqlite(tmp_path: Path) -> None:
    """Four real processes on one SQLite file, default options: no caller sees an error."""
    path = tmp_path / "hot.db"
    async with SqliteStore.open(path, transcoder=_bank.bank_transcoder()) as store:
        await _hammer_with_processes(str(path), tmp_path, store)


@pytest.mark.postgres
async def test_d10_four_processes_hammering_one_aggregate_on_postgres(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """Four real processes on one PostgreSQL database, default options: no caller sees an error."""
    async with PostgresStore.open(postgres_dsn, transcoder=_bank.bank_transcoder()) as store:
        await _hammer_with_processes(postgres_dsn, tmp_path, store)
